"""The benchmarked recipes and their configs, with ``--config.*`` overrides
parsed by ml_collections' config flags."""

import dataclasses
import importlib
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import ml_collections
from absl import flags
from ml_collections import config_flags

__all__ = ["UsageError", "Recipe", "RECIPES", "BASELINE", "apply_overrides",
           "recipe_config"]

BASELINE = "float_resnet18"


class UsageError(ValueError):
  """A command line or config the benchmark cannot run, with the fix."""


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A benchmarked recipe.

  Attributes:
    config_module: module with ``get_config(arg)``, e.g. ``ir2net_jax.configs.imagenet``.
    config_arg: its argument, e.g. ``'a,stage=2'``.
    batch_size: default global batch of the benchmark (not the recipe's).
    num_classes: the data set's classes (the benchmark reads no data).
    fields: ``(field, value)`` pairs set on the config after ``get_config``.
  """
  config_module: str
  config_arg: str
  batch_size: int
  num_classes: int
  fields: Tuple[Tuple[str, Any], ...] = ()


def _float_baseline(model: str) -> Recipe:
  """A real-valued network on the IR2Net ImageNet recipe, trained alone:
  plain cross-entropy on the labels, one pass, no teacher."""
  return Recipe("ir2net_jax.configs.imagenet", "a,stage=1", 16, 1000, (
      ("name", model), ("model", model), ("loss", "cross_entropy"),
      ("information_restriction", False)))


RECIPES: Dict[str, Recipe] = {
    "cifar_resnet20": Recipe("ir2net_jax.configs.cifar10_resnet20", "", 128, 10),
    "cifar_vgg_small": Recipe("ir2net_jax.configs.cifar10_vgg_small", "", 128, 10),
    "cifar_resnet18": Recipe("ir2net_jax.configs.cifar10_resnet18", "", 128, 10),
    **{f"ir2net_{v}_stage{s}": Recipe("ir2net_jax.configs.imagenet", f"{v},stage={s}",
                                      16, 1000)
       for v in "ad" for s in (1, 2)},
    BASELINE: _float_baseline("float_resnet18"),
    "float_resnet34": _float_baseline("float_resnet34"),
}


CONFIG_ARG = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _has_field(config: ml_collections.ConfigDict, path: str) -> bool:
  node = config
  for name in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      return False
    node = node[name]
  return True


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str], where: str = "config") -> None:
  """Applies ``--config.FIELD=VALUE`` arguments to ``config``, in place.

  The arguments are parsed by ml_collections' config flags against this
  config, so values take the field's type (tuples as ``'(1,1,1)'``, booleans
  as ``true`` / ``false`` or ``--config.X`` / ``--noconfig.X``).

  Args:
    config: a recipe's config.
    overrides: command-line arguments, each ``--config.FIELD=VALUE`` (or
      ``--config.FIELD VALUE``).
    where: names the config in errors, e.g. the recipe.

  Raises:
    UsageError: a field the config lacks, a value of the wrong type, or an
      argument that is no ``--config.`` override.
  """
  if not overrides:
    return
  for arg in overrides:
    path = CONFIG_ARG.match(arg)
    if path and not _has_field(config, path.group(1)):
      raise UsageError(f"{where}: {arg}: the config has no field "
                       f"{path.group(1)!r}; ir2net_jax/configs/default.py lists them")
  argv = ["benchmark", *overrides]
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict("config", config, flag_values=values,
                                    sys_argv=argv, lock_config=False)
    rest = values(argv, known_only=True)
  except (flags.Error, TypeError, ValueError) as e:  # a value of wrong type
    raise UsageError(f"{where}: {e}") from None
  except (AttributeError, KeyError) as e:  # a field of a field, say
    raise UsageError(f"{where}: {' '.join(overrides)}: {e!r}") from None
  if rest[1:]:
    raise UsageError(f"{where}: not --config.FIELD=VALUE overrides: {rest[1:]}")


def _tiny_blocks(model: str) -> Optional[Tuple[int, ...]]:
  """One block per stage for ``model``; None if it has no ``num_blocks``."""
  if model == "cifar_vgg_small":
    return None
  return (1, 1, 1) if model == "cifar_resnet20" else (1, 1, 1, 1)


def recipe_config(name: str, batch_size: Optional[int] = None,
                  image_size: Optional[int] = None, tiny: bool = False,
                  overrides: Sequence[str] = (), remat: bool = False
                  ) -> ml_collections.ConfigDict:
  """The config of recipe ``name`` with the benchmark's changes.

  Args:
    name: a key of ``RECIPES``.
    batch_size: global batch; default the recipe's benchmark batch.
    image_size: input height and width; default the recipe's.
    tiny: one block per stage (student and teacher) and, for the ImageNet
      recipes, 32x32 images: for tests.
    overrides: ``--config.FIELD=VALUE`` arguments (:func:`apply_overrides`),
      applied last.
    remat: set ``config.remat`` (rematerialised residual blocks).

  Raises:
    UsageError: unknown recipe, bad override, or ``remat`` where the config
      has no such field.
  """
  if name not in RECIPES:
    raise UsageError(f"unknown recipe {name!r}; choose from {list(RECIPES)}")
  recipe = RECIPES[name]
  config = importlib.import_module(recipe.config_module).get_config(
      recipe.config_arg)
  config.update(dict(recipe.fields))
  if config.num_classes <= 0:
    config.num_classes = recipe.num_classes
  config.batch_size = batch_size or recipe.batch_size
  if tiny:
    blocks = _tiny_blocks(config.model)
    if blocks:
      config.model_kwargs.num_blocks = blocks
    # Every recipe, so that one --config.teacher_kwargs override fits all.
    config.teacher_kwargs.num_blocks = (1, 1, 1, 1)
    if config.dataset == "imagenet2012":
      config.image_size = 32
  if image_size:
    config.image_size = image_size
  if remat:
    if "remat" not in config:
      raise UsageError("--remat: the config has no field 'remat' (it comes "
                       "with the models' rematerialisation); leave --remat "
                       "out")
    config.remat = True
  apply_overrides(config, overrides, where=name)
  return config
