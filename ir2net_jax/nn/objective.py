"""The IR2Net training objective: two forward passes with information
restriction in between (SPEC section 3).

``two_pass_objective`` is what the train step differentiates; it is also what
the parity tests compare with the reference's recorded training step.
"""

from typing import Any, Callable, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ir2net_jax.nn import losses, restriction
from ir2net_jax.nn.diagnostics import COLLECTION as DIAGNOSTICS

__all__ = ["Aux", "two_pass_objective"]


class Aux(NamedTuple):
  """What one two-pass forward produces besides the loss.

  Attributes:
    logits_clean: (B, K) logits of the clean batch (accuracy is measured here).
    logits_erased: (B, K) logits of the erased batch.
    feature: (B, h, w, C) last feature map of the clean pass.
    mask: (B, H, W) the 0/1 erase mask.
    batch_stats: BatchNorm statistics after both passes (clean first).
    loss_terms: (2,) ``[L(clean), L(erased)]``.
    diagnostics: the clean pass's ``'diagnostics'`` collection (see
      ``ir2net_jax.nn.diagnostics``), or None when not asked for.
  """
  logits_clean: jax.Array
  logits_erased: jax.Array
  feature: jax.Array
  mask: jax.Array
  batch_stats: Any
  loss_terms: jax.Array
  diagnostics: Any = None


def two_pass_objective(
    params: Any,
    batch_stats: Any,
    model: nn.Module,
    images: jax.Array,
    target: jax.Array,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    lam: float = restriction.DEFAULT_LAMBDA,
    restrict: Callable[..., Tuple[jax.Array, jax.Array]] = (
        restriction.information_restriction),
    information_restriction: bool = True,
    diagnostics: bool = False,
) -> Tuple[jax.Array, Aux]:
  """IR2Net loss ``(L(f(x)) + L(f(x * mask))) / 2`` in training mode.

  Args:
    params: the model's trainable parameters.
    batch_stats: its BatchNorm statistics (updated by both passes).
    model: the Flax model, returning ``(logits, feature)``.
    images: (B, H, W, 3) normalised images.
    target: what ``loss_fn`` compares the logits with: (B,) labels or (B, K)
      teacher logits.
    loss_fn: ``(logits, target) -> ()``.
    lam: restriction threshold factor.
    restrict: ``(feature, images, lam) -> (erased, mask)``; the default is the
      paper's attention erasing (tests swap in a hand-made mask).
    information_restriction: False trains on the clean pass alone (ablation).
    diagnostics: collect the clean pass's BNN diagnostics in
      ``Aux.diagnostics`` (the activations the model sees outside training
      too; the erased pass's partly zeroed images are a training-only input).

  Returns:
    ``(loss, Aux)``.
  """
  variables = {"params": params, "batch_stats": batch_stats}
  mutable = ["batch_stats"] + ([DIAGNOSTICS] if diagnostics else [])
  (logits1, feature), state = model.apply(variables, images, train=True,
                                          mutable=mutable)
  sown = state.get(DIAGNOSTICS, {}) if diagnostics else None
  if not information_restriction:
    l1 = loss_fn(logits1, target)
    mask = jnp.ones(images.shape[:3], images.dtype)
    return l1, Aux(logits1, logits1, feature, mask, state["batch_stats"],
                   jnp.stack([l1, l1]), sown)
  erased, mask = restrict(feature, images, lam)
  (logits2, _), state = model.apply(
      {"params": params, "batch_stats": state["batch_stats"]}, erased,
      train=True, mutable=["batch_stats"])
  loss, (l1, l2) = losses.two_pass_loss(loss_fn, logits1, logits2, target)
  return loss, Aux(logits1, logits2, feature, mask, state["batch_stats"],
                   jnp.stack([l1, l2]), sown)
