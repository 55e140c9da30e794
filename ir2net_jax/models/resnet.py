"""Real-valued ResNets in torchvision's layout (NHWC): the teacher
(ResNet-34) and the float baselines (ResNet-18 / -34, ``float_resnet``)."""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ir2net_jax.nn.layers import batch_norm, conv, max_pool, remat_block

__all__ = ["TorchvisionResNet"]


class _BasicBlock(nn.Module):
  """torchvision BasicBlock: relu(bn2(conv2(relu(bn1(conv1 x)))) + id)."""
  planes: int
  stride: int
  axis_name: Optional[str]
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(batch_norm, train, self.axis_name,
                           dtype=self.dtype)
    out = nn.relu(bn("bn1")(conv(self.planes, 3, self.stride, name="conv1",
                                 dtype=self.dtype)(x)))
    out = bn("bn2")(conv(self.planes, 3, name="conv2", dtype=self.dtype)(out))
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = bn("downsample_bn")(conv(self.planes, 1, self.stride,
                                   name="downsample_conv",
                                   dtype=self.dtype)(x))
    return nn.relu(out + x)


class TorchvisionResNet(nn.Module):
  """torchvision's ``resnet18`` / ``resnet34`` (by ``num_blocks``; default
  ResNet-34); returns ``(logits, stage-4 feature map)``.

  Attributes:
    num_classes: classifier outputs.
    num_blocks: blocks per stage: ``(3, 4, 6, 3)`` ResNet-34, ``(2, 2, 2,
      2)`` ResNet-18.
    axis_name: BatchNorm synchronisation axis (the teacher normally runs in
      eval mode, where it is unused).
    dtype: computation dtype of the convolutions and the classifier (e.g.
      bfloat16); None: the inputs'. Parameters stay float32.
    remat: recompute each residual block in the backward pass instead of
      keeping its activations (when the network is trained).
  """
  num_classes: int = 1000
  num_blocks: Sequence[int] = (3, 4, 6, 3)
  axis_name: Optional[str] = None
  dtype: Any = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    """(B, 224, 224, 3) -> ((B, num_classes), (B, 7, 7, 512))."""
    x = conv(64, 7, 2, name="conv1", dtype=self.dtype)(x)
    x = batch_norm(train, self.axis_name, "bn1", self.dtype)(x)
    x = max_pool(nn.relu(x), 3, 2, 1)
    block = remat_block(_BasicBlock, self.remat)
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512),
                                            self.num_blocks)):
      for i in range(n):
        stride = 2 if (stage > 0 and i == 0) else 1
        x = block(planes, stride, self.axis_name, self.dtype,
                  name=f"layer{stage + 1}_{i}")(x, train)
    feature = x
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      name="fc")(jnp.mean(x, axis=(1, 2)))
    return logits, feature
