"""A model's variables: initialised, or only their shapes.

Every place that needs a model's ``{'params', 'batch_stats'}`` (training,
the torch converter, the checkpoint loader) builds them here, from one
forward pass on a (1, S, S, 3) image in evaluation mode.
"""

import functools
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from ir2net_jax.backend import xla_cpu

__all__ = ["init_variables", "abstract_variables"]

Variables = Dict[str, Any]


def _image(image_size: int) -> jax.Array:
  return jnp.zeros((1, image_size, image_size, 3), jnp.float32)


def init_variables(model: nn.Module, image_size: int, seed: int = 0
                   ) -> Variables:
  """``model.init`` on a (1, image_size, image_size, 3) float32 image.

  Args:
    model: any of ``MODELS``' modules.
    image_size: an input height and width the model accepts.
    seed: the initialisation's ``jax.random.key``.

  Returns:
    ``{'params', 'batch_stats'}`` (arrays). It runs once, so it is compiled
    as such (``backend.xla_cpu.jit_run_once``: 3-5x faster on a CPU).
  """
  return xla_cpu.jit_run_once(functools.partial(model.init, train=False),
                              jax.random.key(seed), _image(image_size))


def abstract_variables(model: nn.Module, image_size: int) -> Variables:
  """``init_variables``' tree as ``jax.ShapeDtypeStruct``: nothing is
  computed, allocated or compiled."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           _image(image_size), train=False))
