"""Sign estimators: ``sign`` forward, surrogate gradient backward.

Every estimator here is a ``jax.custom_vjp`` function, so it composes with
``jit``, ``grad``, ``vmap``, ``shard_map`` and ``jax.checkpoint`` and keeps the
dtype of its input (bfloat16 included). The forward pass is the framework
``sign``: ``sign(0) = 0``, as in the reference (``torch.sign``). Pass
``zero_to_one=True`` to map 0 to +1 instead, as larq does.

================  =====================================================
estimator         backward (d output / d input)
================  =====================================================
``approx_sign``   ApproxSign (Bi-Real): ``2 + 2x`` on [-1, 0),
                  ``2 - 2x`` on [0, 1), 0 elsewhere. For activations.
``clipped_ste``   1 on [-1, 1], 0 elsewhere. For weights
                  (``torch.clamp``'s gradient is 1 on the closed interval).
``ste_sign``      1 everywhere (plain straight-through).
``swish_sign``    derivative of SignSwish(beta) (BNN+):
                  ``beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))``.
================  =====================================================

``clipping_range(name)`` is the half-width ``c`` of the window ``|x| <= c``
outside which an estimator's surrogate gradient is 0 (1 for ApproxSign and
clipped STE; None for ``ste_sign`` and ``swish_sign``, whose gradients never
vanish). The BNN diagnostics (``ir2net_jax.nn.diagnostics``) report the
fraction of activations inside it.
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

__all__ = [
    "sign", "approx_sign", "clipped_ste", "ste_sign", "swish_sign",
    "get_estimator", "clipping_range",
]


def sign(x: jax.Array, zero_to_one: bool = False) -> jax.Array:
  """``sign`` in the dtype of ``x``; ``sign(0)`` is 0 unless ``zero_to_one``."""
  if zero_to_one:
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)
  # jnp.sign's value for every input (±0 and NaN pass through), written as
  # selects: XLA:CPU fuses those into the producer but not a sign op.
  one = jnp.ones((), x.dtype)
  return jnp.where(x > 0, one, jnp.where(x < 0, -one, x))


def _with_surrogate(grad_fn: Callable[[jax.Array], jax.Array]):
  """Builds a custom_vjp ``f(x, zero_to_one=False)`` with ``sign`` forward.

  Args:
    grad_fn: maps the input ``x`` to d sign / d x (elementwise, same shape).

  Returns:
    The estimator. ``zero_to_one`` is a static (non-differentiable) argument.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
  def estimator(x, zero_to_one=False):
    return sign(x, zero_to_one)

  def fwd(x, zero_to_one):
    return sign(x, zero_to_one), x

  def bwd(zero_to_one, x, g):
    del zero_to_one
    return (g * grad_fn(x).astype(g.dtype),)

  estimator.defvjp(fwd, bwd)
  return estimator


def _approx_sign_grad(x):
  return jnp.where((x >= -1) & (x < 0), 2 + 2 * x,
                   jnp.where((x >= 0) & (x < 1), 2 - 2 * x, 0)).astype(x.dtype)


def _clipped_grad(x):
  return ((x >= -1) & (x <= 1)).astype(x.dtype)


approx_sign = _with_surrogate(_approx_sign_grad)
approx_sign.__doc__ = "sign forward, ApproxSign backward (binary activations)."

clipped_ste = _with_surrogate(_clipped_grad)
clipped_ste.__doc__ = "sign forward, 1 on [-1, 1] backward (binary weights)."

ste_sign = _with_surrogate(jnp.ones_like)
ste_sign.__doc__ = "sign forward, identity backward."


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def swish_sign(x: jax.Array, beta: float = 5.0,
               zero_to_one: bool = False) -> jax.Array:
  """sign forward, SignSwish(beta) derivative backward (BNN+, larq default 5)."""
  del beta
  return sign(x, zero_to_one)


def _swish_fwd(x, beta, zero_to_one):
  return sign(x, zero_to_one), x


def _swish_bwd(beta, zero_to_one, x, g):
  del zero_to_one
  bx = beta * x
  grad = beta * (2 - bx * jnp.tanh(bx / 2)) / (1 + jnp.cosh(bx))
  return (g * grad.astype(g.dtype),)


swish_sign.defvjp(_swish_fwd, _swish_bwd)


# The windows of the gradients above (tests/test_diagnostics.py checks them
# against the gradients). ApproxSign's gradient is also 0 at |x| = 1 itself.
_CLIPPING_RANGES = {"approx_sign": 1.0, "clipped_ste": 1.0,
                    "ste_sign": None, "swish_sign": None}

_ESTIMATORS = {
    "approx_sign": approx_sign,
    "clipped_ste": clipped_ste,
    "ste_sign": ste_sign,
    "swish_sign": swish_sign,
}


def get_estimator(name: str) -> Callable[..., jax.Array]:
  """Returns the estimator called ``name`` (one of the module's four)."""
  try:
    return _ESTIMATORS[name]
  except KeyError:
    raise ValueError(f"unknown sign estimator {name!r}; choose one of "
                     f"{sorted(_ESTIMATORS)}") from None


def clipping_range(name: str) -> Optional[float]:
  """Half-width ``c`` of the estimator ``name``'s clipping window: its
  surrogate gradient is 0 wherever ``|x| > c``. None: no clipping (the
  gradient is nonzero everywhere: ``ste_sign``, ``swish_sign``)."""
  get_estimator(name)  # an unknown name: the same error
  return _CLIPPING_RANGES[name]
