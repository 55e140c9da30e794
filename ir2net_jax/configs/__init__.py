"""The recipes, importable from the installed package.

Each recipe is a module with ``get_config(arg: str = '')``::

  from ir2net_jax import configs
  config = configs.get_config("imagenet:c,stage=2")   # or "digits:smoke"

The command-line tools take the same names where a path is expected
(``ir2net-train --config=digits:smoke``); in a checkout,
``--config=configs/digits.py`` names the same recipe by its file.
"""

import importlib
import os
from typing import List, Sequence

import ml_collections

__all__ = ["ConfigError", "RECIPES", "get_config", "recipe_path",
           "expand_config_flag"]


class ConfigError(ValueError):
  """A config value that cannot work, with what to do instead."""


# Recipes (not ``default`` or ``cifar10_common``, which recipes build on).
RECIPES = ("digits", "cifar10_resnet20", "cifar10_vgg_small",
           "cifar10_resnet18", "imagenet")


def get_config(spec: str) -> ml_collections.ConfigDict:
  """The config of recipe ``spec``, ``'name'`` or ``'name:arg'``.

  Raises:
    ValueError: ``name`` is not one of ``RECIPES``.
  """
  name, _, arg = spec.partition(":")
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; the recipes are "
                     f"{', '.join(RECIPES)}")
  return importlib.import_module(f"{__name__}.{name}").get_config(arg)


def recipe_path(name: str) -> str:
  """The file of recipe ``name`` inside the installed package."""
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; the recipes are "
                     f"{', '.join(RECIPES)}")
  return os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      f"{name}.py")


def expand_config_flag(argv: Sequence[str], flag: str = "config") -> List[str]:
  """``argv`` with ``--config=NAME[:ARG]`` turned into the recipe's file.

  ml_collections' config flags take a file; this lets the console scripts
  take a recipe's name too. A value that is an existing file, or whose name
  is not a recipe, is left as it is (ml_collections reports a bad one).
  """
  out = list(argv)
  prefix = f"--{flag}="
  for i, a in enumerate(out):
    if a.startswith(prefix):
      value = a[len(prefix):]
      name, sep, arg = value.partition(":")
      if name in RECIPES and not os.path.exists(name):
        out[i] = prefix + recipe_path(name) + sep + arg
  return out
