"""Optimizers and learning-rate schedules of the IR2Net recipes (SPEC §5).

Weight decay is *coupled*, as in PyTorch's SGD and Adam: ``wd * param`` is
added to the gradient before the momentum / moment estimates.
"""

import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ir2net_jax.io import torch_layout

__all__ = ["learning_rate_schedule", "weight_decay_mask", "create_optimizer"]


def learning_rate_schedule(config, steps_per_epoch: int) -> Callable:
  """Cosine decay to 0 over the run, per epoch or per step.

  ``schedule_unit='epoch'`` reproduces PyTorch's ``CosineAnnealingLR`` stepped
  once an epoch (the reference): the rate is constant within an epoch,
  ``lr * (1 + cos(pi * epoch / num_epochs)) / 2``. ``'step'`` decays smoothly.
  ``warmup_epochs`` adds a linear warm-up from 0.
  """
  base, epochs = config.learning_rate, config.num_epochs
  total = epochs * steps_per_epoch
  warmup = int(config.get("warmup_epochs", 0) * steps_per_epoch)
  unit = config.get("schedule_unit", "epoch")
  if unit not in ("epoch", "step"):
    raise ValueError(f"schedule_unit must be 'epoch' or 'step', got {unit!r}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if unit == "epoch":
      progress = jnp.floor(step / steps_per_epoch) / epochs
    else:
      progress = step / total
    lr = base * 0.5 * (1 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
    if warmup > 0:
      lr = lr * jnp.minimum(1.0, (step + 1) / warmup)
    return lr

  return schedule


def weight_decay_mask(params: Any, model: nn.Module, rule: str) -> Any:
  """Which parameters get weight decay, as a tree of bools like ``params``.

  Args:
    params: the model's parameter tree.
    model: the model (its PyTorch key names decide the ``'reference'`` rule).
    rule: ``'all'`` (CIFAR: every parameter) or ``'conv_or_4d'`` (ImageNet:
      the reference's ``p.ndimension() == 4 or 'conv' in name``, applied to
      the PyTorch names: every conv weight, the binary conv weights and the
      BN / PReLU parameters of CIRec's ``primary_conv``. ``cheap_operation``
      has no ``conv`` in its name, so its BN / PReLU get none, whatever the
      SPEC's prose says: the code is the ground truth).
  """
  if rule == "all":
    return jax.tree.map(lambda _: True, params)
  if rule != "conv_or_4d":
    raise ValueError(f"weight_decay_rule must be 'all' or 'conv_or_4d', got "
                     f"{rule!r}")
  flat = flax.traverse_util.flatten_dict(params)
  mask = {path: (jnp.ndim(value) == 4
                 or "conv" in torch_layout.torch_key(model, "params", path))
          for path, value in flat.items()}
  return flax.traverse_util.unflatten_dict(mask)


def create_optimizer(config, params: Any, model: nn.Module,
                     steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam (ImageNet) or SGD with momentum (CIFAR), coupled weight decay.

  Config fields: ``optimizer`` ('adam' | 'sgd'), ``learning_rate``,
  ``momentum``, ``weight_decay``, ``weight_decay_rule``, ``num_epochs``,
  ``schedule_unit``, ``warmup_epochs``.
  """
  schedule = learning_rate_schedule(config, steps_per_epoch)
  parts = []
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(
        config.weight_decay,
        mask=weight_decay_mask(params, model, config.weight_decay_rule)))
  if config.optimizer == "adam":
    parts.append(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8))
  elif config.optimizer == "sgd":
    parts.append(optax.trace(decay=config.momentum, nesterov=False))
  else:
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got "
                     f"{config.optimizer!r}")
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)
