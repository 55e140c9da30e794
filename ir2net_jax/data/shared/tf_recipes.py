"""The tf.data recipes, named without importing TensorFlow.

A ``DatasetSpec`` holds its train and eval recipes as :class:`TfRecipe`s:
the name of a ``tf_data.recipes`` function with its bound keyword
arguments. The tf.data engine runs them (``tf_data.recipes.apply``,
importing TensorFlow); a spec built or read by another engine imports none.
"""

import dataclasses
from typing import Any, Tuple

__all__ = ["TfRecipe", "tf_recipe"]


@dataclasses.dataclass(frozen=True)
class TfRecipe:
  """A tf.data recipe by name.

  Attributes:
    name: the function of ``tf_data.recipes``.
    bound: its keyword arguments fixed by the data set, ``(name, value)``
      pairs.
  """
  name: str
  bound: Tuple[Tuple[str, Any], ...] = ()


def tf_recipe(name: str, **bound) -> TfRecipe:
  """``tf_data.recipes.<name>`` with ``bound`` keyword arguments."""
  return TfRecipe(name, tuple(sorted(bound.items())))
