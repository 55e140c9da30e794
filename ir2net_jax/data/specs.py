"""What the input pipeline knows about a data set, and its error type.

Shared by the registry of named data sets (``sources``) and the specs built
for any image classification data (``custom``).
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["DataError", "DatasetInfo", "DatasetSpec"]


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
    decoders: tfds ``decoders`` argument (ImageNet keeps JPEG bytes).
    train_recipe: ``(image, seed, image_size, augmentation) -> float32
      image`` (``augmentation``: a ``recipes.Augmentation``).
    eval_recipe: ``(image, image_size) -> float32 image``.
    value_range: smallest and largest normalised pixel value.
    recipe: name of the augmentation recipe, for logs and tests:
      'digits', 'cifar10', 'imagenet2012' (the named data sets' own), or
      'cifar' / 'imagenet' (the recipes for any data, see ``custom``).
    image_key: the builder's image feature.
    label_key: the builder's label feature.
    folder: root of a class-per-subfolder tree, read with tfds' ImageFolder
      (which serves whole splits only: no ``'train[:90%]'``); None for a tfds
      builder.
    flip: whether the train recipe flips unless the config says otherwise.
    crop: the train recipe's crop: 'pad' (pad and random crop:
      ``config.crop_padding`` applies) or 'resized' (RandomResizedCrop:
      ``config.crop_scale`` applies).
  """
  tfds_name: str
  num_classes: int
  image_size: int
  fixed_image_size: bool
  eval_split: str
  shuffle_buffer: int
  cache: bool
  decoders: Optional[Dict[str, Any]]
  train_recipe: Callable[..., Any]
  eval_recipe: Callable[..., Any]
  value_range: Tuple[float, float]
  recipe: str = ""
  image_key: str = "image"
  label_key: str = "label"
  folder: Optional[str] = None
  flip: bool = True
  crop: str = "pad"
