"""CIFAR-10 IR2Net models (1-bit weights and activations): ResNet-20,
VGG-Small, ResNet-18. NHWC; each returns ``(logits, last feature map)``.

Submodule names follow the reference's ``state_dict`` names (``layer1_0`` for
``layer1.0``) so that conversion and the weight-decay rule can read them.
"""

from typing import Any, ClassVar, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from ir2net_jax.nn.layers import (BatchNorm, BinaryConv, CIRec,
                                  adaptive_avg_pool, batch_norm, conv,
                                  hardtanh, kaiming_normal, max_pool,
                                  remat_block)

__all__ = ["ResNet20", "VGGSmall", "ResNet18"]


class _Block(nn.Module):
  """Fields and sublayers shared by the CIFAR residual blocks."""
  planes: int
  stride: int
  zero_to_one: bool
  axis_name: Optional[str]
  compute_dtype: Optional[str] = None
  dtype: Any = None

  def binary_conv(self, stride: int, name: str) -> BinaryConv:
    return BinaryConv(self.planes, stride, binary_weights=True,
                      zero_to_one=self.zero_to_one, dtype=self.dtype,
                      compute_dtype=self.compute_dtype, name=name)

  def bn(self, train: bool, name: str) -> BatchNorm:
    return batch_norm(train, self.axis_name, name, self.dtype)


class _BasicBlock20(_Block):
  """ResNet-20 block: two binary convs, each with its own shortcut (Bi-Real).

  ``h = hardtanh(bn1(conv1(x)) + shortcut(x))``,
  ``out = hardtanh(bn2(conv2(h)) + h)``; the shortcut is "option A".
  """

  @nn.compact
  def __call__(self, x, train):
    out = self.bn(train, "bn1")(self.binary_conv(self.stride, "conv1")(x))
    if self.stride != 1 or x.shape[-1] != self.planes:
      pad = self.planes // 4
      shortcut = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0),
                                             (pad, pad)))
    else:
      shortcut = x
    h = hardtanh(out + shortcut)
    out = self.bn(train, "bn2")(self.binary_conv(1, "conv2")(h))
    return hardtanh(out + h)


class _CifarResNet(nn.Module):
  """The CIFAR ResNets' body: a real 3x3 stem, binary residual stages, CIRec
  over the pooled outputs of every stage, a global mean, BN and a linear
  classifier. Each network sets the class constants below.

  Attributes: as ``ResNet20``.
  """
  num_classes: int = 10
  information_recovery: bool = True
  zero_to_one: bool = False
  axis_name: Optional[str] = None
  num_blocks: Sequence[int] = ()
  compute_dtype: Optional[str] = None
  dtype: Any = None
  grouped_conv_by_taps: Optional[bool] = None
  remat: bool = False

  BLOCK: ClassVar[Any] = None   # the residual block's module class
  PLANES: ClassVar[Sequence[int]] = ()   # channels per stage; stem: first
  POOL: ClassVar[int] = 0       # side of each stage's pooled output
  FUSION: ClassVar[Tuple[int, int]] = (0, 0)   # CIRec's channels, ratio

  @nn.compact
  def __call__(self, x, train: bool = False):
    """(B, 32, 32, 3) -> ((B, num_classes), (B, POOL, POOL, PLANES[-1]))."""
    out = hardtanh(batch_norm(train, self.axis_name, "bn1", self.dtype)(
        conv(self.PLANES[0], 3, kernel_init=kaiming_normal, name="conv1",
             dtype=self.dtype)(x)))
    pooled = [adaptive_avg_pool(out, self.POOL)]
    block = remat_block(self.BLOCK, self.remat)
    for stage, (planes, n) in enumerate(zip(self.PLANES, self.num_blocks)):
      for i in range(n):
        stride = 2 if (stage > 0 and i == 0) else 1
        out = block(planes, stride, self.zero_to_one, self.axis_name,
                    self.compute_dtype, self.dtype,
                    name=f"layer{stage + 1}_{i}")(out, train)
      if stage < len(self.PLANES) - 1:
        pooled.append(adaptive_avg_pool(out, self.POOL))
    feature = out
    if self.information_recovery:
      channels, ratio = self.FUSION
      out = CIRec(channels, ratio=ratio, activation="hardtanh",
                  axis_name=self.axis_name, kernel_init=kaiming_normal,
                  dtype=self.dtype,
                  grouped_conv_by_taps=self.grouped_conv_by_taps,
                  name="fusion")(jnp.concatenate(pooled + [out], axis=-1),
                                 train)
    # The reference applies avg_pool2d to the last (POOL x POOL) map: a
    # global mean.
    out = jnp.mean(out, axis=(1, 2))
    out = batch_norm(train, self.axis_name, "bn2", self.dtype)(out)
    logits = nn.Dense(self.num_classes, kernel_init=kaiming_normal,
                      dtype=self.dtype, name="linear")(out)
    return logits, feature


class ResNet20(_CifarResNet):
  """CIFAR ResNet-20 1W1A with information recovery (CIRec 128 -> 64, s = 4).

  Attributes:
    num_classes: classifier outputs.
    information_recovery: fuse pooled shallow features (False: plain head).
    zero_to_one: binarise 0 to +1 instead of 0.
    axis_name: BatchNorm synchronisation axis.
    num_blocks: blocks per stage.
    compute_dtype: operand dtype of the binary convolutions (see BinaryConv).
    dtype: computation dtype of the convolutions and the classifier (e.g.
      bfloat16); None: the inputs'. Parameters stay float32.
    grouped_conv_by_taps: see ``layers.conv`` (None: on CPU only).
    remat: recompute each residual block in the backward pass instead of
      keeping its activations (same values, less memory).
  """
  num_blocks: Sequence[int] = (3, 3, 3)

  BLOCK = _BasicBlock20
  PLANES = (16, 32, 64)
  POOL = 8
  FUSION = (64, 4)


class VGGSmall(nn.Module):
  """CIFAR VGG-Small 1W1A with information recovery (CIRec 640 -> 512, s = 32).

  Attributes: as ``ResNet20``, less ``num_blocks`` and ``remat`` (VGG-Small
  has no residual blocks).
  """
  num_classes: int = 10
  information_recovery: bool = True
  zero_to_one: bool = False
  axis_name: Optional[str] = None
  compute_dtype: Optional[str] = None
  dtype: Any = None
  grouped_conv_by_taps: Optional[bool] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    """(B, 32, 32, 3) -> ((B, num_classes), (B, 4, 4, 512))."""
    # The reference initialises VGG convs with N(0, sqrt(2 / fan_out)).
    init = nn.initializers.variance_scaling(2.0, "fan_out",
                                            "normal")
    x = hardtanh(batch_norm(train, self.axis_name, "bn0", self.dtype)(
        conv(128, 3, kernel_init=init, name="conv0", dtype=self.dtype)(x)))
    fx = adaptive_avg_pool(x, 4)
    for i, (planes, pool) in enumerate(
        [(128, True), (256, False), (256, True), (512, False), (512, True)], 1):
      x = BinaryConv(planes, 1, binary_weights=True,
                     zero_to_one=self.zero_to_one, kernel_init=init,
                     dtype=self.dtype, compute_dtype=self.compute_dtype,
                     name=f"conv{i}")(x)
      if pool:
        x = max_pool(x, 2, 2, 0)
      x = hardtanh(batch_norm(train, self.axis_name, f"bn{i}", self.dtype)(x))
    feature = x
    if self.information_recovery:
      x = CIRec(512, ratio=32, activation="hardtanh", axis_name=self.axis_name,
                kernel_init=init, dtype=self.dtype,
                grouped_conv_by_taps=self.grouped_conv_by_taps,
                name="fusion")(jnp.concatenate([fx, x], axis=-1), train)
    # Flatten in (C, H, W) order, as the reference's NCHW ``view`` does, so a
    # converted ``fc`` weight lines up.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    logits = nn.Dense(self.num_classes,
                      kernel_init=nn.initializers.normal(0.01),
                      bias_init=nn.initializers.zeros, dtype=self.dtype,
                      name="fc")(x)
    return logits, feature


class _BasicBlock18(_Block):
  """CIFAR ResNet-18 block: ``hardtanh(bn2(conv2(hardtanh(bn1(conv1 x)))) +
  shortcut(x))``; the downsample shortcut is a real 1x1 conv + BN."""

  @nn.compact
  def __call__(self, x, train):
    out = hardtanh(self.bn(train, "bn1")(
        self.binary_conv(self.stride, "conv1")(x)))
    out = self.bn(train, "bn2")(self.binary_conv(1, "conv2")(out))
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = self.bn(train, "shortcut_bn")(
          conv(self.planes, 1, self.stride, kernel_init=kaiming_normal,
               name="shortcut_conv", dtype=self.dtype)(x))
    return hardtanh(out + x)


class ResNet18(_CifarResNet):
  """CIFAR ResNet-18 1W1A with information recovery (CIRec 1024 -> 512, s = 20).

  Attributes: as ``ResNet20``.
  """
  num_blocks: Sequence[int] = (2, 2, 2, 2)

  BLOCK = _BasicBlock18
  PLANES = (64, 128, 256, 512)
  POOL = 4
  FUSION = (512, 20)
