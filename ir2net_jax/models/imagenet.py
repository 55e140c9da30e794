"""ImageNet IR2Net-A/B/C/D: a Bi-Real / ReActNet ResNet-18 (or -34) backbone
with one binary 3x3 conv per block, information recovery by fusion, and the
two training stages. NHWC; returns ``(logits, stage-4 feature map)``.

Submodule names follow the reference's ``state_dict`` (``layer1_0`` for
``layer1.0``) so conversion and the weight-decay rule can read them.
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ir2net_jax.nn.layers import (BinaryConv, CIRec, PReLU,
                                  adaptive_avg_pool, avg_pool, batch_norm,
                                  binary_conv_init, conv, max_pool,
                                  remat_block)

__all__ = ["IR2Net", "FUSIONS", "LAYOUTS"]

# variant -> CIRec (ratio, groups divisor); None is IR2Net-A's plain 1x1 conv.
FUSIONS = {
    "a": None,
    "b": (2, None),
    "c": (4, 16),
    "d": (20, None),
}
LAYOUTS = {18: (4, 4, 4, 4), 34: (6, 8, 12, 6)}


class _Block(nn.Module):
  """``prelu(bn1(binary_conv(x)) + shortcut(x))``.

  The downsample shortcut is AvgPool(2, stride) -> real 1x1 conv -> BN.
  """
  planes: int
  stride: int
  binary_weights: bool
  zero_to_one: bool
  axis_name: Optional[str]
  compute_dtype: Optional[jnp.dtype] = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(batch_norm, train, self.axis_name,
                           dtype=self.dtype)
    out = BinaryConv(self.planes, self.stride,
                     binary_weights=self.binary_weights,
                     zero_to_one=self.zero_to_one,
                     kernel_init=binary_conv_init(True), dtype=self.dtype,
                     compute_dtype=self.compute_dtype, name="binary_conv")(x)
    out = bn("bn1")(out)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = avg_pool(x, 2, self.stride) if self.stride != 1 else x
      x = bn("downsample_bn")(conv(self.planes, 1, name="downsample_conv",
                                   dtype=self.dtype)(x))
    return PReLU(name="prelu")(out + x)


class IR2Net(nn.Module):
  """IR2Net for ImageNet.

  Attributes:
    variant: ``'a'`` (1x1 conv fusion), ``'b'``, ``'c'``, ``'d'`` (CIRec).
    stage: 1 (binary activations, real weights) or 2 (both binary).
    depth: 18 (4 blocks per stage) or 34 ([6, 8, 12, 6]).
    num_classes: classifier outputs.
    information_recovery: fuse pooled shallow features (False: plain head).
    zero_to_one: binarise 0 to +1 instead of 0.
    axis_name: BatchNorm synchronisation axis.
    compute_dtype: operand dtype of the binary convolutions (see BinaryConv).
    num_blocks: blocks per stage, overriding ``depth``'s layout (e.g.
      ``(1, 1, 1, 1)`` for a tiny test model).
    dtype: computation dtype of the convolutions and the classifier (e.g.
      bfloat16); None: the inputs'. Parameters stay float32.
    grouped_conv_by_taps: see ``layers.conv`` (None: on CPU only).
    remat: recompute each residual block in the backward pass instead of
      keeping its activations (same values, less memory).
  """
  variant: str = "a"
  stage: int = 1
  depth: int = 18
  num_classes: int = 1000
  information_recovery: bool = True
  zero_to_one: bool = False
  axis_name: Optional[str] = None
  compute_dtype: Optional[jnp.dtype] = None
  num_blocks: Optional[Sequence[int]] = None
  dtype: Any = None
  grouped_conv_by_taps: Optional[bool] = None
  remat: bool = False

  def setup_check(self):
    if self.variant not in FUSIONS:
      raise ValueError(f"unknown IR2Net variant {self.variant!r}; choose one "
                       f"of {sorted(FUSIONS)}")
    if self.stage not in (1, 2):
      raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
    if self.depth not in LAYOUTS:
      raise ValueError(f"depth must be one of {sorted(LAYOUTS)}, got "
                       f"{self.depth!r}")

  @nn.compact
  def __call__(self, x, train: bool = False):
    """(B, 224, 224, 3) -> ((B, num_classes), (B, 7, 7, 512))."""
    self.setup_check()
    bn = functools.partial(batch_norm, train, self.axis_name,
                           dtype=self.dtype)
    x = PReLU(name="prelu")(bn("bn1")(conv(64, 7, 2, name="conv1",
                                           dtype=self.dtype)(x)))
    shallow = [x]
    x = max_pool(x, 3, 2, 1)
    layout = self.num_blocks or LAYOUTS[self.depth]
    block = remat_block(_Block, self.remat)
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), layout)):
      for i in range(n):
        stride = 2 if (stage > 0 and i == 0) else 1
        x = block(planes, stride, self.stage == 2, self.zero_to_one,
                  self.axis_name, self.compute_dtype, self.dtype,
                  name=f"layer{stage + 1}_{i}")(x, train)
      if stage < 3:
        shallow.append(x)
    feature = x
    if self.information_recovery:
      # Pool the stem and stage 1-3 outputs to the stage-4 size (7 at 224).
      pooled = [adaptive_avg_pool(f, x.shape[1]) for f in shallow]
      x = jnp.concatenate(pooled + [x], axis=-1)
      fusion = FUSIONS[self.variant]
      if fusion is None:
        x = PReLU(name="fprelu")(bn("fbn")(conv(512, 1, name="fusion",
                                                dtype=self.dtype)(x)))
      else:
        ratio, groups_divisor = fusion
        x = CIRec(512, ratio=ratio, groups_divisor=groups_divisor,
                  activation="prelu", axis_name=self.axis_name,
                  dtype=self.dtype,
                  grouped_conv_by_taps=self.grouped_conv_by_taps,
                  name="fusion")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = bn("bn2")(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return logits, feature
