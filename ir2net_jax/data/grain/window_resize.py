"""RandomResizedCrop's resize on the accelerators: exactly Pillow's
antialiased bilinear filter, as jax ops on windows of fixed-size canvases.

The grain engine can leave the resize of each train window to the devices
(``config.input_resize``): the host sends each decoded window unresized at
the top left of a (C, C) canvas (``host_recipes.imagenet_train_parts``)
with the integers Pillow would resize it with, and :func:`resize_windows`
resizes them all in the train step, to the same pixels as
``Image.resize(BILINEAR, box)`` (what the reference and the host recipe
use).

Pillow computes in fixed point: each axis's weights are integers in units
of 2^-22 (``pillow_resize.resize_coefficients`` computes them on the host,
in float64 as Pillow does), each pass sums ``pixel * weight`` in int32 from
2^21, then floors to a level (clipped to [0, 255]); the two passes run in
the order ``pillow_resize.vertical_first`` says. Here each pass is a matrix
product whose operands are exact in bfloat16: the levels (0..255) and the
weights cut into three 8-bit digits, so every product and partial sum is an
integer below 2^24, exact in the float32 accumulators of any backend
(GPUs' tensor cores, TPUs' MXUs, CPUs) in any order of summation; the
digits' sums are then put together in int32. A vertical-first window is
transposed, resized horizontal pass first, and transposed back, which sums
the same products.

Per image at S = 224, C = 336: six (S, C)-by-(C, C or S, 3) products of
bfloat16 digits, about 0.76 GFLOP at bfloat16 rates (on GPUs, cheaper than
one float32 product at full precision); on a CPU it costs more than
Pillow's resize, so ``input_resize='auto'`` keeps the resize on the host
there.
"""

import jax
import jax.numpy as jnp

from ir2net_jax.data.grain.pillow_resize import PRECISION_BITS

__all__ = ["resize_windows"]


def _axis_weights(coefficients, in_size: int):
  """One axis's coefficients as a dense matrix.

  Args:
    coefficients: int32 (S, 1 + K), ``pillow_resize.resize_coefficients``:
      each output pixel's first input pixel, then its K weights.
    in_size: C, the input pixels on this axis.

  Returns:
    int32 (S, C): row ``i`` holds output pixel ``i``'s weights in units of
    2^-22, zeros past the pixels it reads.
  """
  first, taps = coefficients[:, :1], coefficients[:, 1:]
  offset = jnp.arange(in_size)[None, :] - first
  weights = jnp.zeros(offset.shape, jnp.int32)
  for tap in range(taps.shape[1]):
    weights = jnp.where(offset == tap, taps[:, tap:tap + 1], weights)
  return weights


def _pass(weights, levels, spec: str):
  """One of Pillow's passes: ``floor((2^21 + sum(level * weight)) / 2^22)``
  clipped to levels, as int32; ``spec`` contracts the weights' input axis
  with the levels' (the leading ``u`` is the weights' digit)."""
  digits = jnp.stack([(weights >> shift) & 255 for shift in (0, 8, 16)])
  sums = jnp.einsum(spec, digits.astype(jnp.bfloat16),
                    levels.astype(jnp.bfloat16),
                    preferred_element_type=jnp.float32).astype(jnp.int32)
  fixed = (sums[0] + (sums[1] << 8) + (sums[2] << 16)
           + (1 << (PRECISION_BITS - 1)))
  return jnp.clip(fixed >> PRECISION_BITS, 0, 255)


def _resize_one(canvas, coefficients, vertical_first):
  """One canvas -> int32 (S, S, 3) levels, Pillow's two passes."""
  side = canvas.shape[0]
  rows, columns = coefficients[0], coefficients[1]
  image = jnp.where(vertical_first, jnp.swapaxes(canvas, 0, 1), canvas)
  across = _axis_weights(jnp.where(vertical_first, rows, columns), side)
  down = _axis_weights(jnp.where(vertical_first, columns, rows), side)
  resized = _pass(down, _pass(across, image, "ulk,jkc->ujlc"),
                  "uij,jlc->uilc")
  return jnp.where(vertical_first, jnp.swapaxes(resized, 0, 1), resized)


def resize_windows(canvases, coefficients, vertical_first):
  """Resizes each canvas's window to (S, S), to exactly Pillow's pixels.

  Args:
    canvases: uint8 (B, C, C, 3).
    coefficients: int32 (B, 2, S, 1 + K): each canvas's rows' and then
      columns' coefficients (``pillow_resize.resize_coefficients``).
    vertical_first: bool (B,), the order of each window's passes
      (``pillow_resize.vertical_first``).

  Returns:
    uint8 (B, S, S, 3).
  """
  return jax.vmap(_resize_one)(canvases, coefficients,
                               vertical_first).astype(jnp.uint8)
