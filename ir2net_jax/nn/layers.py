"""Layers of the IR2Net models, with PyTorch's numerics where they differ.

All layers are NHWC. Convolutions take explicit symmetric padding, because the
reference pads ``p`` pixels on every side (also at stride 2, where XLA's
``'SAME'`` pads asymmetrically).

Mixed precision follows the Flax convention: a layer's ``dtype`` is the dtype
it computes in (None: its inputs' and parameters' dtype), its parameters stay
float32. BatchNorm computes its statistics and normalises in float32 whatever
its ``dtype``; binary convolutions sum in float32 (``kernels``).
"""

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from jax import lax

from ir2net_jax.nn import binarize, diagnostics, kernels
from ir2net_jax.backend import policy

__all__ = [
    "BatchNorm", "batch_norm", "PReLU", "hardtanh", "conv", "BinaryConv", "CIRec",
    "adaptive_avg_pool", "max_pool", "avg_pool", "kaiming_normal",
    "torch_default_conv_init", "ACTIVATIONS", "remat_block",
]

Dtype = Any

# PyTorch's kaiming_normal_ (fan_in, gain sqrt 2), not truncated.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in",
                                                  "normal")
# PyTorch's default Conv2d / Linear weight init, kaiming_uniform_(a=sqrt(5)).
torch_default_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                           "uniform")


def hardtanh(x: jax.Array) -> jax.Array:
  """``clip(x, -1, 1)`` whose gradient is 1 strictly inside, as in PyTorch."""
  one = jnp.ones((), x.dtype)
  return jnp.where(x <= -1, -one, jnp.where(x >= 1, one, x))


class PReLU(nn.Module):
  """Per-channel PReLU, ``x if x > 0 else a_c * x`` (PyTorch ``nn.PReLU(C)``).

  Attributes:
    init_slope: initial slope of every channel (PyTorch: 0.25).
  """
  init_slope: float = 0.25

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., C) -> (..., C)."""
    slope = self.param("negative_slope",
                       nn.initializers.constant(self.init_slope),
                       (x.shape[-1],), jnp.float32)
    return jnp.where(x > 0, x, slope.astype(x.dtype) * x)


class _Hardtanh(nn.Module):
  """Module wrapper so CIRec can take its activation by name."""

  @nn.compact
  def __call__(self, x):
    return hardtanh(x)


ACTIVATIONS = {"hardtanh": _Hardtanh, "prelu": PReLU}


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch's statistics, optionally synchronised over devices.

  Train mode normalises with the biased batch variance and updates the running
  variance with the *unbiased* one (``n / (n - 1)``, n = elements per channel
  over the global batch), ``running = (1 - momentum) running + momentum batch``
  (PyTorch's momentum convention). Flax's ``nn.BatchNorm`` keeps the biased
  variance, which the reference's running statistics would not match.

  Statistics and normalisation are computed in float32 (or wider) whatever
  the input's dtype; only the output is cast to ``dtype``.

  Attributes:
    use_running_average: normalise with the running statistics (eval mode).
    momentum: PyTorch-style momentum (weight of the new batch statistic).
    epsilon: added to the variance.
    axis_name: mapped axis to average the statistics over (global batch).
    dtype: output dtype; None keeps the input's.
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.1
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array,
               use_running_average: Optional[bool] = None) -> jax.Array:
    """(..., C) -> (..., C); statistics over every axis but the last."""
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,),
                            jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,),
                           jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)

    xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if use_ra:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      n = math.prod(x.shape[:-1])
      mean = jnp.mean(xs, axes)
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
        n = n * lax.psum(1, self.axis_name)
      var = jnp.mean(jnp.square(xs - mean), axes)
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        m = self.momentum
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        ra_mean.value = ((1 - m) * ra_mean.value + m * mean).astype(
            ra_mean.value.dtype)
        ra_var.value = ((1 - m) * ra_var.value + m * unbiased).astype(
            ra_var.value.dtype)
    dtype = xs.dtype
    inv = lax.rsqrt(var + self.epsilon)
    y = ((xs - mean.astype(dtype)) * (inv * scale).astype(dtype)
         + bias.astype(dtype))
    return y.astype(self.dtype or x.dtype)


def batch_norm(train: bool, axis_name: Optional[str], name: str,
               dtype: Any = None) -> BatchNorm:
  """``BatchNorm`` as every model uses it: batch statistics when ``train``,
  running ones otherwise."""
  return BatchNorm(use_running_average=not train, axis_name=axis_name,
                   dtype=dtype, name=name)


def conv(features: int, kernel: int, stride: int = 1,
         padding: Optional[int] = None, groups: int = 1,
         kernel_init: Callable = torch_default_conv_init,
         name: Optional[str] = None, dtype: Optional[Dtype] = None,
         grouped_conv_by_taps: Optional[bool] = None) -> nn.Conv:
  """A real-valued bias-free conv with PyTorch's symmetric padding.

  Args:
    features, kernel, stride, groups: as ``torch.nn.Conv2d``.
    padding: pixels on every side; default ``kernel // 2``.
    kernel_init: weight initialiser (HWIO).
    name: module name.
    dtype: computation dtype (parameters stay float32); None: the inputs'.
    grouped_conv_by_taps: weight gradient of a grouped conv tap by tap
      (``kernels.grouped_conv``); None: on the CPU backend only
      (``policy.grouped_conv_by_taps``).
  """
  p = kernel // 2 if padding is None else padding
  if grouped_conv_by_taps is None:
    grouped_conv_by_taps = policy.grouped_conv_by_taps()
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((p, p), (p, p)), feature_group_count=groups,
                 use_bias=False, kernel_init=kernel_init, name=name,
                 dtype=dtype,
                 conv_general_dilated=(kernels.conv_general_dilated_by_taps
                                       if groups > 1 and grouped_conv_by_taps
                                       else None))


def _uniform_0_to(limit: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, 0.0, limit)
  return init


class BinaryConv(nn.Module):
  """3x3 convolution of binarised activations (the block conv of every model).

  Activations are always binarised with ``activation_estimator`` (ApproxSign
  by default). Weights are binarised with ``weight_estimator`` when
  ``binary_weights`` is True (stage 2 and CIFAR) and used as they are when
  False (ImageNet stage 1). No scaling factor, as in the reference.

  Attributes:
    features: output channels.
    strides: spatial stride.
    binary_weights: stage switch (False: stage 1, True: stage 2).
    kernel_size: square kernel size (3 in every IR2Net model).
    activation_estimator, weight_estimator: names in ``binarize``.
    zero_to_one: map sign(0) to +1 instead of 0.
    kernel_init: weight initialiser (HWIO).
    dtype: computation dtype of the activations (parameters stay float32);
      None: the input's and parameters' dtype.
    compute_dtype: dtype of the convolution operands; None is the
      computation dtype. Operands narrower than 32 bits (bfloat16, int8) are
      summed in float32 / int32 and the layer returns those float32 sums:
      ±1 operands make them exact, so with binary weights a narrow dtype
      changes no value, and the BatchNorm after the layer normalises the
      exact sums. 'int8' applies only with binary weights and at least
      ``int8_min_channels`` input channels (XLA's CPU int8 convolution is
      slower than float32 at 16 channels); 'bfloat16' also rounds stage-1
      real weights.
    int8_min_channels: see ``compute_dtype``.

  When the ``'diagnostics'`` collection is mutable the layer sows its BNN
  diagnostics there (``diagnostics.sow_binary_conv``).
  """
  features: int
  strides: int = 1
  binary_weights: bool = True
  kernel_size: int = 3
  activation_estimator: str = "approx_sign"
  weight_estimator: str = "clipped_ste"
  zero_to_one: bool = False
  kernel_init: Callable = kaiming_normal
  dtype: Optional[Dtype] = None
  compute_dtype: Optional[Dtype] = None
  int8_min_channels: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, Cin) -> (B, H', W', features), float32 from narrow operands,
    else the computation dtype."""
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, x.shape[-1], self.features), jnp.float32)
    latent = kernel
    if self.binary_weights:
      # In the parameters' dtype: the clipped-STE window |w| <= 1 is tested
      # before any rounding to the computation dtype.
      kernel = binarize.get_estimator(self.weight_estimator)(kernel,
                                                            self.zero_to_one)
    x, kernel = dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    diagnostics.sow_binary_conv(self, x, latent, self.activation_estimator,
                                self.binary_weights)
    bx = binarize.get_estimator(self.activation_estimator)(x, self.zero_to_one)
    p = k // 2
    operand = jnp.dtype(self.compute_dtype or x.dtype)
    if operand == jnp.int8 and (not self.binary_weights
                                or x.shape[-1] < self.int8_min_channels):
      operand = x.dtype  # real (stage-1) weights have no int8 form
    if operand.itemsize >= 4:
      return kernels.conv_nhwc(bx.astype(operand), kernel.astype(operand),
                               self.strides, p)
    return kernels.low_precision_conv(bx, kernel, self.strides, p,
                                      operand.name)


def binary_conv_init(stage_one_uniform: bool) -> Callable:
  """ImageNet HardBinaryConv init: uniform [0, 0.001); CIFAR: Kaiming normal."""
  return _uniform_0_to(0.001) if stage_one_uniform else kaiming_normal


class _ConvBNAct(nn.Module):
  """conv -> BatchNorm -> activation; submodules ``conv``, ``bn``, ``act``."""
  features: int
  kernel: int
  groups: int
  activation: str
  axis_name: Optional[str]
  kernel_init: Callable
  dtype: Optional[Dtype]
  grouped_conv_by_taps: Optional[bool]

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv(self.features, self.kernel, groups=self.groups,
             kernel_init=self.kernel_init, name="conv", dtype=self.dtype,
             grouped_conv_by_taps=self.grouped_conv_by_taps)(x)
    x = batch_norm(train, self.axis_name, "bn", self.dtype)(x)
    return ACTIVATIONS[self.activation](name="act")(x)


class CIRec(nn.Module):
  """Information recovery fusion module (GhostNet style), as in the reference.

  With ``m = ceil(features / ratio)``: a 1x1 ``primary_conv`` (in -> m, BN,
  activation), a 3x3 grouped ``cheap_operation`` (m -> m (ratio - 1), BN,
  activation), concatenated, and the first ``features`` channels kept.

  Attributes:
    features: output channels ``n``.
    ratio: ``s``.
    groups_divisor: the cheap conv has ``m // groups_divisor`` groups
      (IR2Net-C: 16); None means depthwise, ``m`` groups.
    activation: ``'hardtanh'`` (CIFAR) or ``'prelu'`` (ImageNet).
    axis_name: BatchNorm synchronisation axis.
    kernel_init: conv weight initialiser.
    dtype: computation dtype (see ``conv``).
    grouped_conv_by_taps: see ``conv``.
  """
  features: int
  ratio: int = 2
  groups_divisor: Optional[int] = None
  activation: str = "prelu"
  axis_name: Optional[str] = None
  kernel_init: Callable = torch_default_conv_init
  dtype: Optional[Dtype] = None
  grouped_conv_by_taps: Optional[bool] = None

  @property
  def init_channels(self) -> int:
    return math.ceil(self.features / self.ratio)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, H, W, Cin) -> (B, H, W, features)."""
    m = self.init_channels
    groups = m if self.groups_divisor is None else m // self.groups_divisor
    common = dict(activation=self.activation, axis_name=self.axis_name,
                  kernel_init=self.kernel_init, dtype=self.dtype,
                  grouped_conv_by_taps=self.grouped_conv_by_taps)
    x1 = _ConvBNAct(m, 1, 1, name="primary_conv", **common)(x, train)
    x2 = _ConvBNAct(m * (self.ratio - 1), 3, groups, name="cheap_operation",
                    **common)(x1, train)
    return jnp.concatenate([x1, x2], axis=-1)[..., :self.features]


def remat_block(block: type, remat: bool) -> type:
  """``block`` (a module called as ``block(x, train)``), rematerialised if
  ``remat``: its activations are recomputed in the backward pass instead of
  kept, the same values for less memory. ``train`` stays a Python bool."""
  return nn.remat(block, static_argnums=(2,)) if remat else block


def adaptive_avg_pool(x: jax.Array, output_size: int) -> jax.Array:
  """PyTorch ``AdaptiveAvgPool2d(output_size)`` on NHWC.

  Window ``i`` covers ``[floor(i in / out), ceil((i + 1) in / out))``. When the
  size divides evenly this is a plain average pool.
  """
  b, h, w, c = x.shape
  if h % output_size == 0 and w % output_size == 0:
    kh, kw = h // output_size, w // output_size
    return x.reshape(b, output_size, kh, output_size, kw, c).mean(axis=(2, 4))

  def weights(n):
    rows = []
    for i in range(output_size):
      start = (i * n) // output_size
      end = -((-(i + 1) * n) // output_size)
      rows.append([1.0 / (end - start) if start <= j < end else 0.0
                   for j in range(n)])
    return jnp.asarray(rows, x.dtype)

  return jnp.einsum("bhwc,ph,qw->bpqc", x, weights(h), weights(w))


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
  """PyTorch ``MaxPool2d`` (pads with -inf), NHWC."""
  return nn.max_pool(x, (kernel, kernel), (stride, stride),
                     ((padding, padding), (padding, padding)))


def avg_pool(x: jax.Array, kernel: int, stride: int) -> jax.Array:
  """PyTorch ``AvgPool2d(kernel, stride)`` with no padding, NHWC."""
  b, h, w, c = x.shape
  if kernel == stride and h % kernel == 0 and w % kernel == 0:
    # Tiling windows as a reshaped mean: XLA:CPU fuses it and its gradient,
    # unlike reduce-window and its transpose.
    return x.reshape(b, h // kernel, kernel, w // kernel, kernel, c).mean(
        axis=(2, 4))
  return nn.avg_pool(x, (kernel, kernel), (stride, stride))
