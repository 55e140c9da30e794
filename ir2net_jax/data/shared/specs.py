"""What the input engines know about a data set, and its error type.

Shared by the registry of named data sets (``sources``), the specs built
for any image classification data (``custom``) and every engine. Imports no
TensorFlow (a spec's tf.data recipes are ``tf_recipes.TfRecipe`` names).
"""

import dataclasses
from typing import Optional, Tuple

from ir2net_jax.data.shared.constants import CROP_SCALE
from ir2net_jax.data.shared.tf_recipes import TfRecipe

__all__ = ["DataError", "DatasetInfo", "DatasetSpec", "Augmentation",
           "REFERENCE", "normalized_range", "augmentation"]


class DataError(ValueError):
  """A data set is unknown, missing, or asked for in a way we cannot serve."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Sizes of a configured data set (all hosts together).

  Attributes:
    num_train: examples in the train split.
    num_eval: examples in the eval split.
    num_classes: number of labels.
    image_size: height and width of the model's input images.
    train_split: the training split read (``config.train_split`` resolved).
    eval_split: the evaluation split read ('' in ``config.eval_split``
      resolved to the data set's own).
  """
  num_train: int
  num_eval: int
  num_classes: int
  image_size: int
  train_split: str = "train"
  eval_split: str = "test"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about one data set.

  Attributes:
    tfds_name: the tfds builder name, with a version where one was given
      (``'mnist'``, ``'oxford_flowers102:2.1.1'``).
    num_classes: number of labels.
    image_size: default model input size; the only one allowed when
      ``fixed_image_size``.
    fixed_image_size: whether other image sizes are refused.
    eval_split: default evaluation split; '' where the data set has no
      obvious one (``config.eval_split`` must then name it).
    shuffle_buffer: default shuffle buffer, in examples.
    cache: whether each host's decoded split is small enough to keep in memory
      (then every host reads the whole training split: one global stream).
    decoders: the features tfds leaves encoded (``SkipDecoding``: ImageNet's
      JPEG bytes; any image of ``tfds:`` and ``folder:`` data), for the
      recipe to decode; None decodes every feature.
    train_recipe: the tf.data engine's ``(image, seed, image_size,
      augmentation) -> float32 image`` (``augmentation``: an
      :class:`Augmentation`), by name (``tf_data.recipes.apply`` runs it).
    eval_recipe: ``(image, image_size) -> float32 image``, by name.
    value_range: smallest and largest normalised pixel value.
    recipe: name of the augmentation recipe, for logs and tests:
      'digits', 'cifar10', 'imagenet2012' (the named data sets' own), or
      'cifar' / 'imagenet' (the recipes for any data, see ``custom``).
    image_key: the builder's image feature.
    label_key: the builder's label feature.
    folder: the real path of a class-per-subfolder tree (``folders``;
      whole splits only: no ``'train[:90%]'``); None for a tfds builder.
    problems: ``(path, what is wrong)`` of a folder's files that its
      listing and header check found bad (see ``bad_data``).
    flip: whether the train recipe flips unless the config says otherwise.
    crop: the train recipe's crop: 'pad' (pad and random crop:
      ``config.crop_padding`` applies) or 'resized' (RandomResizedCrop:
      ``config.crop_scale`` applies).
    class_names: label ``i``'s name, where the data set names its classes
      (a folder's subfolders, a tfds builder's label names); see
      ``sources.class_names``.
  """
  tfds_name: str
  num_classes: int
  image_size: int
  fixed_image_size: bool
  eval_split: str
  shuffle_buffer: int
  cache: bool
  decoders: Optional[Tuple[str, ...]]
  train_recipe: TfRecipe
  eval_recipe: TfRecipe
  value_range: Tuple[float, float]
  recipe: str = ""
  image_key: str = "image"
  label_key: str = "label"
  folder: Optional[str] = None
  problems: Tuple[Tuple[str, str], ...] = ()
  flip: bool = True
  crop: str = "pad"
  class_names: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The random choices of a train recipe that a config may change.

  Attributes:
    flip: mirror left-right with probability 1/2.
    crop_padding: zero padding of the pad-and-crop recipes (digits, CIFAR and
      'cifar' for any data); None: the recipe's own (2 for digits, 4 at 32
      pixels for CIFAR, in proportion at other sizes).
    crop_scale: (min, max) area fraction of RandomResizedCrop (ImageNet and
      'imagenet' for any data).
  """
  flip: bool = True
  crop_padding: Optional[int] = None
  crop_scale: Tuple[float, float] = CROP_SCALE


REFERENCE = Augmentation()


def normalized_range(mean: Tuple[float, ...],
                     std: Tuple[float, ...]) -> Tuple[float, float]:
  """Smallest and largest value a normalised 0..255 image can take."""
  lows = [(0.0 - m) / s for m, s in zip(mean, std)]
  highs = [(1.0 - m) / s for m, s in zip(mean, std)]
  return min(lows), max(highs)


_CROP_FIELDS = {"pad": ("crop_padding", "pad-and-crop"),
                "resized": ("crop_scale", "RandomResizedCrop")}


def augmentation(config, spec: DatasetSpec) -> Augmentation:
  """The train recipe's flip, padding and scale: the config's where it sets
  them, else the data set's recipe's (the same for every engine).

  Raises:
    DataError: a crop field that the data set's recipe does not use (it
      would change nothing).
  """
  for crop, (field, what) in _CROP_FIELDS.items():
    if crop != spec.crop and config.get(field) is not None:
      used, used_what = _CROP_FIELDS[spec.crop]
      raise DataError(
          f"{field} applies to the {what} recipes, but {config.get('dataset')}"
          f" is trained with the {spec.recipe or spec.tfds_name} recipe "
          f"({used_what}): set {used} instead, or leave {field} unset "
          f"(--config.{field}=None).")
  flip = config.get("flip")
  scale = config.get("crop_scale")
  return Augmentation(
      flip=spec.flip if flip is None else bool(flip),
      crop_padding=config.get("crop_padding"),
      crop_scale=CROP_SCALE if scale is None else tuple(
          float(v) for v in scale))
