"""The tf.data recipes, named without importing TensorFlow.

A ``DatasetSpec`` holds its train and eval recipes as :func:`tf_recipe`
partials: ``recipes`` (and TensorFlow with it) is imported when the tf.data
engine first calls one, never when a spec is built or read by another
engine.
"""

import functools
from typing import Any, Callable

__all__ = ["tf_recipe"]


def _call_recipe(name: str, *args, **kwargs):
  from ir2net_jax.data import recipes  # pylint: disable=g-import-not-at-top
  return getattr(recipes, name)(*args, **kwargs)


def tf_recipe(name: str, **bound) -> Callable[..., Any]:
  """``recipes.<name>`` with ``bound`` keyword arguments, importing
  ``recipes`` on the first call."""
  return functools.partial(_call_recipe, name, **bound)
