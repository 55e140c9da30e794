"""A model's evaluation pass traced for shapes only, with a Flax method
interceptor watching its modules (which binary convolutions it calls, and
what takes their outputs)."""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["trace_eval"]


def trace_eval(model: nn.Module, variables, image_size: int,
               interceptor: Callable) -> None:
  """Runs ``model.apply(variables, (1, S, S, 3) zeros, train=False)``
  abstractly (``jax.eval_shape``: nothing is computed) under
  ``nn.intercept_methods(interceptor)``."""
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v: model.apply(
        v, jnp.zeros((1, image_size, image_size, 3)), train=False),
                   variables)
