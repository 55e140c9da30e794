"""Every IR2Net architecture, selectable by name.

>>> model = create_model("ir2net_c", stage=2)
>>> variables = model.init(key, images, train=False)
>>> logits, feature = model.apply(variables, images, train=False)
"""

from typing import Any, Callable, Dict

import flax.linen as nn

from ir2net_jax.models.cifar import ResNet18, ResNet20, VGGSmall
from ir2net_jax.models.float_resnet import float_resnet
from ir2net_jax.models.imagenet import IR2Net
from ir2net_jax.models.resnet import TorchvisionResNet
from ir2net_jax.models.variables import abstract_variables, init_variables

__all__ = ["create_model", "MODELS", "ResNet20", "VGGSmall", "ResNet18",
           "IR2Net", "TorchvisionResNet", "init_variables",
           "abstract_variables"]


def _ir2net(variant: str, depth: int = 18) -> Callable[..., nn.Module]:
  def make(**kwargs):
    return IR2Net(variant=variant, depth=depth, **kwargs)
  return make


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet20": ResNet20,
    "cifar_vgg_small": VGGSmall,
    "cifar_resnet18": ResNet18,
    **{f"ir2net_{v}": _ir2net(v) for v in "abcd"},
    **{f"ir2net_{v}_resnet34": _ir2net(v, 34) for v in "abcd"},
    "teacher_resnet34": TorchvisionResNet,
    # Real-valued students: the benchmark's float baselines.
    "float_resnet18": float_resnet(18),
    "float_resnet34": float_resnet(34),
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds the model called ``name`` (a key of ``MODELS``).

  Args:
    name: e.g. ``'cifar_resnet20'``, ``'ir2net_a'``, ``'teacher_resnet34'``.
    **kwargs: module attributes, e.g. ``stage=2``, ``num_classes=10``,
      ``information_recovery=False``, ``axis_name='data'``.

  Raises:
    ValueError: unknown name or attribute.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  try:
    return MODELS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for model {name!r}: {e}") from None
