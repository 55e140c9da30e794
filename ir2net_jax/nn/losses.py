"""Losses of the two training recipes (SPEC section 4).

Softmax and the losses compute in float32 (float64 under x64) whatever the
logits' dtype: bfloat16 logits are cast up first.
"""

import jax
import jax.numpy as jnp
import optax

__all__ = ["cross_entropy", "distribution_loss", "two_pass_loss"]


def _at_least_float32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy, (B, K) logits and (B,) int labels -> ()."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      _at_least_float32(logits), labels))


def distribution_loss(logits: jax.Array,
                      teacher_logits: jax.Array) -> jax.Array:
  """ReActNet's DistributionLoss, ``mean_b(-sum softmax(t) log_softmax(s))``.

  Args:
    logits: (B, K) student logits.
    teacher_logits: (B, K) frozen teacher logits (no gradient flows to them).

  Returns:
    () the batch mean, temperature 1.
  """
  target = jax.nn.softmax(
      _at_least_float32(jax.lax.stop_gradient(teacher_logits)), axis=-1)
  log_p = jax.nn.log_softmax(_at_least_float32(logits), axis=-1)
  return jnp.mean(-jnp.sum(target * log_p, axis=-1))


def two_pass_loss(loss_fn, logits_clean, logits_erased, target):
  """IR2Net's training loss ``(L(clean) + L(erased)) / 2``.

  Returns:
    ``(loss, (L(clean), L(erased)))``.
  """
  l1 = loss_fn(logits_clean, target)
  l2 = loss_fn(logits_erased, target)
  return (l1 + l2) / 2, (l1, l2)
