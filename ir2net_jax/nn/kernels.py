"""Convolution kernels with custom gradients, used by ``layers``.

Two kernels, both NHWC x HWIO:

* ``low_precision_conv``: a convolution whose operands are cast to a narrow
  dtype (bfloat16, int8) and summed in float32 / int32. For binary (±1)
  operands this is exact. Its backward pass runs the float convolution's
  transposes in the inputs' dtype.
* ``grouped_conv``: a grouped convolution whose weight gradient is a sum of
  per-tap contractions, a CPU speed trick (``policy.Policy``
  ``grouped_conv_by_taps``): XLA:CPU's own weight gradient of a grouped
  convolution is orders of magnitude slower than its FLOPs. GPUs and TPUs
  run ``lax.conv_general_dilated`` as it is.
"""

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_nhwc", "low_precision_conv", "grouped_conv",
           "conv_general_dilated_by_taps"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_nhwc(x: jax.Array, kernel: jax.Array, stride: int, pad: int,
              preferred: Optional[Any] = None) -> jax.Array:
  """NHWC x HWIO convolution with ``pad`` pixels on every side.

  Args:
    x: (B, H, W, Cin).
    kernel: (kh, kw, Cin, Cout).
    stride: spatial stride.
    pad: symmetric padding (PyTorch's ``padding=pad``).
    preferred: accumulation / result dtype (``preferred_element_type``).

  Returns:
    (B, H', W', Cout).
  """
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), dimension_numbers=_NHWC,
      preferred_element_type=preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def low_precision_conv(x: jax.Array, kernel: jax.Array, stride: int,
                       pad: int, dtype: str) -> jax.Array:
  """``conv_nhwc`` with ``dtype`` operands and float32 / int32 accumulation.

  With {-1, 0, +1} operands every product is exact in bfloat16 and int8 and
  every sum is exact in float32 (fan-ins stay far below 2^24) and int32, so
  the result equals the float32 convolution bit for bit. Real operands are
  rounded to ``dtype`` (bfloat16 mixed precision). The backward pass
  multiplies real cotangents, so it runs the convolution's transposes in the
  dtype of ``x`` and ``kernel`` (float32: the plain path's gradients;
  bfloat16: the mixed-precision ones).

  Args:
    x: (B, H, W, Cin), float.
    kernel: (kh, kw, Cin, Cout), the dtype of ``x``.
    stride: spatial stride.
    pad: symmetric padding.
    dtype: operand dtype name, e.g. ``'bfloat16'`` or ``'int8'``.

  Returns:
    (B, H', W', Cout): the sums, not rounded to a narrow dtype: float32, or
    the dtype of ``x`` where that is wider (float64 runs stay float64).
  """
  acc = jnp.int32 if jnp.issubdtype(dtype, jnp.integer) else jnp.float32
  y = conv_nhwc(x.astype(dtype), kernel.astype(dtype), stride, pad,
                preferred=acc)
  return y.astype(jnp.promote_types(x.dtype, jnp.float32))


def _low_precision_fwd(x, kernel, stride, pad, dtype):
  return low_precision_conv(x, kernel, stride, pad, dtype), (x, kernel)


def _low_precision_bwd(stride, pad, dtype, residuals, g):
  del dtype
  x, kernel = residuals
  _, vjp = jax.vjp(lambda a, b: conv_nhwc(a, b, stride, pad), x, kernel)
  return vjp(g.astype(x.dtype))


low_precision_conv.defvjp(_low_precision_fwd, _low_precision_bwd)


def _grouped(x, kernel, strides, padding, groups):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=_NHWC,
                                  feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def grouped_conv(x: jax.Array, kernel: jax.Array, strides: tuple,
                 padding: tuple, groups: int) -> jax.Array:
  """Grouped NHWC x HWIO convolution whose weight gradient is a sum of taps.

  The forward and the input gradient are XLA's. XLA:CPU lowers the *weight*
  gradient of a grouped (e.g. depthwise) convolution to a dilated 3-D
  convolution that is orders of magnitude slower than its FLOPs (270 ms for
  CIRec's depthwise 3x3 on a (128, 8, 8, 24) input); here it is one small
  contraction per kernel tap, with the same value. Only for XLA:CPU: GPUs
  and TPUs have fast grouped weight gradients.

  Args:
    x: (B, H, W, Cin).
    kernel: (kh, kw, Cin / groups, Cout).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).
    groups: feature groups; Cin and Cout divide by it.

  Returns:
    (B, H', W', Cout).
  """
  return _grouped(x, kernel, strides, padding, groups)


def _grouped_fwd(x, kernel, strides, padding, groups):
  return _grouped(x, kernel, strides, padding, groups), (x, kernel)


def _grouped_bwd(strides, padding, groups, residuals, g):
  x, kernel = residuals
  _, vjp_x = jax.vjp(lambda a: _grouped(a, kernel, strides, padding, groups),
                     x)
  # The transpose of the conv written tap by tap: JAX derives the per-tap
  # contractions and, inside shard_map, the sum over devices.
  _, vjp_k = jax.vjp(lambda k: _grouped_by_taps(x, k, strides, padding,
                                                groups), kernel)
  return vjp_x(g)[0], vjp_k(g)[0]


def _grouped_by_taps(x, kernel, strides, padding, groups):
  """The grouped conv as a sum over kernel taps of per-group matmuls."""
  kh, kw, cin_g, cout = kernel.shape
  b, h, w, _ = x.shape
  (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  k = kernel.reshape(kh, kw, cin_g, groups, cout // groups)
  y = 0
  for i in range(kh):
    for j in range(kw):
      xt = lax.slice(xp, (0, i, j, 0),
                     (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1,
                      xp.shape[-1]), (1, sh, sw, 1))
      y = y + jnp.einsum("nhwgi,igo->nhwgo",
                         xt.reshape(b, ho, wo, groups, cin_g), k[i, j])
  return y.reshape(b, ho, wo, cout)


grouped_conv.defvjp(_grouped_fwd, _grouped_bwd)


def conv_general_dilated_by_taps(
    lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
    rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
    precision=None) -> jax.Array:
  """``lax.conv_general_dilated`` for ``nn.Conv``, grouped convs by taps.

  A drop-in for ``nn.Conv(conv_general_dilated=...)``: grouped NHWC
  convolutions go through ``grouped_conv``, everything else through
  ``lax.conv_general_dilated`` unchanged.
  """
  plain = (feature_group_count == 1 or precision is not None
           or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
           or lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                         dimension_numbers)
           != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision)
  return grouped_conv(lhs, rhs, tuple(window_strides),
                      tuple(tuple(p) for p in padding), feature_group_count)
