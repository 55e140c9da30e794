"""Real-valued ResNet-18 / -34 trained as students: the benchmark's float
baselines (the same torchvision layout as the teacher,
``resnet.TorchvisionResNet``).

``train.step.build_model`` passes every student the binary networks' options
(``information_recovery``, ``zero_to_one``, ``compute_dtype``) and CIRec's
grouped-convolution kernel choice (``grouped_conv_by_taps``); a real-valued
ResNet has no binary layer, no information recovery and no grouped
convolution, so they are dropped here and every other attribute (``dtype``,
``remat``, ...) reaches ``TorchvisionResNet``.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn

from ir2net_jax.models.resnet import TorchvisionResNet

__all__ = ["LAYOUTS", "float_resnet"]

LAYOUTS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
_BINARY_ONLY = ("information_recovery", "zero_to_one", "compute_dtype",
                "grouped_conv_by_taps")


def float_resnet(depth: int) -> Callable[..., nn.Module]:
  """Constructor of torchvision's ``resnet{depth}`` taking student kwargs.

  Args:
    depth: 18 or 34; ``num_blocks=`` still overrides its layout (tests).

  Returns:
    ``make(**kwargs) -> TorchvisionResNet`` module with ``LAYOUTS[depth]``
    blocks.
  """
  layout: Sequence[int] = LAYOUTS[depth]

  def make(**kwargs: Any) -> nn.Module:
    for name in _BINARY_ONLY:
      kwargs.pop(name, None)
    kwargs.setdefault("num_blocks", layout)
    return TorchvisionResNet(**kwargs)

  return make
