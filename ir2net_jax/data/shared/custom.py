"""Any image classification data: ``tfds:NAME`` and ``folder:PATH`` specs.

``config.dataset`` may name, besides the registered data sets,

* ``tfds:NAME``: a prepared tfds builder, optionally with config and version
  (``tfds:mnist``, ``tfds:oxford_flowers102:2.1.1``). Its image and label
  features are found from ``info.supervised_keys``, else the features named
  'image' and 'label', else the only ``Image`` and only ``ClassLabel``
  feature; a builder without them is refused. Nothing is downloaded:
  prepare it with ``tfds build NAME --data_dir=DIR`` beforehand.
* ``folder:PATH``: a class-per-subfolder tree, listed as tfds'
  ``ImageFolder`` lists it (``folders``),
  ``PATH/<split>/<class>/*.{jpg,jpeg,png}`` (e.g. ``train/``, ``test/`` or
  ``val/``); classes are the sorted subfolder names of all splits together.
  Splits are served whole (no ``'train[:90%]'``).

Number of classes, splits and stored image size come from the metadata (for
a folder, from the files themselves). Images are decoded to RGB (grey
replicated, alpha dropped) and normalised with ImageNet's mean and std.

Augmentation (``config.augment``): 'cifar' is the CIFAR recipe
(``recipes.small_*``: resize to image_size if needed, pad-and-random-crop,
flip), 'imagenet' the ImageNet recipe (``recipes.large_*``:
random-resized-crop, flip; resize and centre crop for eval). 'auto' takes
'cifar' when every image has one size whose longer side is at most
``SMALL_IMAGE_MAX_SIDE`` (MNIST, CIFAR, SVHN, Tiny ImageNet), 'imagenet'
otherwise. 'cifar' on images of more than one size is refused.

Default eval split ('' ``config.eval_split``): 'test', else 'validation',
else 'val', whichever the data set has first.

Caching and hosts: a data set whose encoded images take at most
``CACHE_MAX_BYTES`` is cached, and every host reads all of it (one global
stream, as for CIFAR-10); a larger one is not, and each host reads its own
slice (as for ImageNet). See ``pipeline``.

Specs are built once per process for each (name, data_dir, augment): a
folder's files are listed (and, for the CIFAR recipe, every image header is
read) only the first time.
"""

import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from ir2net_jax.data.shared import constants, folders, image_files
from ir2net_jax.data.shared.folders import FOLDER_PREFIX, IMAGE_SUFFIXES
from ir2net_jax.data.shared.specs import (  # pylint: disable=g-multiple-import
    DataError, DatasetSpec, normalized_range)
from ir2net_jax.data.shared.tf_recipes import tf_recipe

__all__ = [
    "TFDS_PREFIX", "FOLDER_PREFIX", "AUGMENTS", "SMALL_IMAGE_MAX_SIDE",
    "CACHE_MAX_BYTES", "is_custom", "custom_spec",
    "unprepared_error",
]

TFDS_PREFIX = "tfds:"
AUGMENTS = ("auto", "cifar", "imagenet")
SMALL_IMAGE_MAX_SIDE = 64
CACHE_MAX_BYTES = 1 << 30
UNCACHED_SHUFFLE_BUFFER = 16_384
EVAL_SPLITS = ("test", "validation", "val")
_FOLDER_LAYOUT = ("PATH/train/<class>/*.jpg|*.jpeg|*.png, and PATH/test/ or "
                  "PATH/val/ alike")
_SIZE = Tuple[int, int]


def is_custom(name: str) -> bool:
  """Whether ``name`` is a ``tfds:`` or ``folder:`` data set."""
  return name.startswith((TFDS_PREFIX, FOLDER_PREFIX))


def unprepared_error(tfds_name: str, builder, data_dir: Optional[str]
                     ) -> DataError:
  """The error for a tfds builder that is not prepared in ``data_dir``."""
  where = f"{builder.data_dir} (data_dir={data_dir or 'the tfds default'})"
  return DataError(
      f"{tfds_name} is not prepared in {where}, and this pipeline never "
      f"downloads. On a machine with network, run `tfds build {tfds_name} "
      "--data_dir=DIR`, copy DIR here if needed, then pass "
      "--config.data_dir=DIR.")


@functools.lru_cache(maxsize=64)
def custom_spec(name: str, data_dir: Optional[str],
                augment: str = "auto") -> DatasetSpec:
  """The spec of a ``tfds:NAME`` or ``folder:PATH`` data set.

  Args:
    name: ``config.dataset``.
    data_dir: tfds data directory (``tfds:`` only); None = the tfds default.
    augment: 'auto' | 'cifar' | 'imagenet'; see the module docstring.

  Raises:
    DataError: an unknown or unprepared builder, one that is not image
      classification, a missing or empty folder, an unreadable image, or
      'cifar' for images of more than one size.
  """
  if augment not in AUGMENTS:
    raise DataError(f"augment must be one of {AUGMENTS}; got {augment!r}.")
  if name.startswith(TFDS_PREFIX):
    return _tfds_spec(name[len(TFDS_PREFIX):], data_dir, augment)
  if name.startswith(FOLDER_PREFIX):
    return _folder_spec(name[len(FOLDER_PREFIX):], augment)
  raise DataError(f"{name!r} is neither 'tfds:NAME' nor 'folder:PATH'.")


def _choose_recipe(augment: str, size: Optional[_SIZE], where: str,
                   sizes_found: str) -> str:
  """'cifar' or 'imagenet' (see the module docstring).

  Args:
    augment: ``config.augment``.
    size: (height, width) of every image, None if sizes differ or are not
      fixed.
    where: the data set, for messages.
    sizes_found: why ``size`` is None, for messages.
  """
  if augment == "imagenet":
    return "imagenet"
  if augment == "cifar":
    if size is None:
      raise DataError(
          f"{where}: augment='cifar' needs images of one size, but "
          f"{sizes_found}. Pass --config.augment=imagenet (or 'auto', which "
          "picks it), or resize the images to one size first.")
    return "cifar"
  return ("cifar" if size is not None and max(size) <= SMALL_IMAGE_MAX_SIDE
          else "imagenet")


def _make_spec(*, tfds_name: str, where: str, num_classes: int,
               splits: Dict[str, int], size: Optional[_SIZE],
               cache_bytes: Optional[int], recipe: str, image_key: str,
               label_key: str, folder: Optional[str] = None,
               problems: Tuple[Tuple[str, str], ...] = (),
               class_names: Sequence[str] = ()) -> DatasetSpec:
  """The spec, from what was read of the data set."""
  if num_classes < 1:
    raise DataError(f"{where} has no classes; its label feature names none.")
  cache = cache_bytes is not None and cache_bytes <= CACHE_MAX_BYTES
  num_train = splits.get("train", 0)
  shuffle_buffer = (num_train if cache and num_train
                    else UNCACHED_SHUFFLE_BUFFER)
  if splits:
    eval_split = next((s for s in EVAL_SPLITS if s in splits), "")
  else:  # Sizes not recorded (as under tfds.testing.mock_data).
    eval_split = "test"
  if recipe == "cifar":
    train = tf_recipe("small_train", stored_size=size)
    evaluate = tf_recipe("small_eval", stored_size=size)
    image_size = max(size)
  else:
    train, evaluate = tf_recipe("large_train"), tf_recipe("large_eval")
    image_size = 224
  logging.info("%s: %d classes, splits %s, image size %s, %s recipe, %s",
               where, num_classes, splits or "(not recorded)",
               "x".join(map(str, size)) if size else "varying", recipe,
               "cached" if cache else "not cached")
  return DatasetSpec(
      tfds_name=tfds_name, num_classes=num_classes, image_size=image_size,
      fixed_image_size=False, eval_split=eval_split,
      shuffle_buffer=shuffle_buffer, cache=cache,
      # Images stay encoded until the recipe decodes them to RGB: whatever
      # the stored channels, and a cache holds the compact bytes.
      decoders=(image_key,),
      train_recipe=train, eval_recipe=evaluate,
      value_range=normalized_range(constants.IMAGENET_MEAN,
                                   constants.IMAGENET_STD),
      recipe=recipe, image_key=image_key, label_key=label_key, folder=folder,
      problems=problems, crop="pad" if recipe == "cifar" else "resized",
      class_names=tuple(class_names))


# ------------------------------------------------------------- tfds:NAME ---

def _pick(keys: List[str], preferred: str) -> Optional[str]:
  if preferred in keys:
    return preferred
  return keys[0] if len(keys) == 1 else None


def _feature_keys(info, where: str) -> Tuple[str, str]:
  """(image key, label key) of a tfds builder's features."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = info.features
  images = [k for k, f in features.items()
            if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in features.items()
            if isinstance(f, tfds.features.ClassLabel)]
  supervised = info.supervised_keys
  if (isinstance(supervised, tuple) and len(supervised) == 2
      and supervised[0] in images and supervised[1] in labels):
    return supervised
  image, label = _pick(images, "image"), _pick(labels, "label")
  if image is None or label is None:
    found = ", ".join(f"{k!r}: {type(f).__name__}"
                      for k, f in features.items())
    raise DataError(
        f"{where} is not image classification as this pipeline reads it: it "
        "needs one top-level Image feature and one ClassLabel feature "
        f"(ideally 'image' and 'label'), and has {{{found}}}. Choose an "
        "image classification builder, e.g. tfds:mnist or "
        "tfds:oxford_flowers102.")
  return image, label


def _tfds_spec(name: str, data_dir: Optional[str], augment: str
               ) -> DatasetSpec:
  where = TFDS_PREFIX + name
  if not name:
    raise DataError("dataset='tfds:' names no builder; pass e.g. "
                    "--config.dataset=tfds:mnist.")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (ValueError, AssertionError, KeyError) as e:
    # DatasetNotFoundError (a ValueError) lists every builder: keep line one.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DataError(
        f"{where}: unknown tfds builder or version ({first}). Pass a name "
        "from the tfds catalogue, optionally with config and version, e.g. "
        "--config.dataset=tfds:mnist or tfds:oxford_flowers102:2.1.1.") from e
  if not builder.is_prepared():
    raise unprepared_error(name, builder, data_dir)
  info = builder.info
  image_key, label_key = _feature_keys(info, where)
  image = info.features[image_key]
  if np.dtype(image.np_dtype) != np.uint8:
    raise DataError(f"{where}: image feature {image_key!r} holds "
                    f"{np.dtype(image.np_dtype).name} images; this pipeline "
                    "reads uint8 (8-bit) images only.")
  height, width = image.shape[:2]
  size = (height, width) if height and width else None
  recipe = _choose_recipe(augment, size, where,
                          f"its image feature {image_key!r} has shape "
                          f"{image.shape} (sizes vary)")
  splits = {k: v.num_examples for k, v in info.splits.items()}
  cache_bytes = int(info.dataset_size or 0) or None
  if cache_bytes is None and size and splits.get("train"):
    cache_bytes = splits["train"] * height * width * 3
  return _make_spec(
      tfds_name=name, where=where,
      num_classes=info.features[label_key].num_classes, splits=splits,
      size=size, cache_bytes=cache_bytes, recipe=recipe, image_key=image_key,
      label_key=label_key, class_names=info.features[label_key].names)


# ----------------------------------------------------------- folder:PATH ---

def _common_size(paths: Sequence[str], root: str, skip: Dict[str, str],
                 stop_above: Optional[int]) -> Tuple[Optional[_SIZE], str]:
  """(height, width) shared by all images, from their headers, or None and
  what differs. Stops at the first image with a side above ``stop_above``
  (when given: no recipe needs to know more). Files in ``skip`` and files
  whose header does not read are left out; the latter are added to
  ``skip`` (the run's ``bad_examples`` policy decides)."""
  first, first_path = None, ""
  for path in paths:
    if path in skip:
      continue
    try:
      height, width = image_files.image_size(
          image_files.read_header(path), path)
    except image_files.BadImage as e:
      skip[path] = e.reason
      continue
    if stop_above is not None and max(height, width) > stop_above:
      return None, f"{os.path.relpath(path, root)} is {height}x{width}"
    if first is None:
      first, first_path = (height, width), path
    elif (height, width) != first:
      return None, (f"{os.path.relpath(first_path, root)} is "
                    f"{first[0]}x{first[1]} and {os.path.relpath(path, root)} "
                    f"is {height}x{width}")
  return first, ""


def _folder_spec(path: str, augment: str) -> DatasetSpec:
  where = FOLDER_PREFIX + path
  root = os.path.realpath(os.path.expanduser(path))
  if not path or not os.path.isdir(root):
    raise DataError(f"{where}: no such directory. Point it at a tree "
                    f"{_FOLDER_LAYOUT}.")
  tree = folders.scan(root)
  splits = {k: tree.num_examples(k) for k in tree.splits}
  if not sum(splits.values()):
    found = sorted(os.listdir(root))
    raise DataError(
        f"{where} holds no images: expected {_FOLDER_LAYOUT} (found "
        f"{found or 'nothing'} in {root}).")
  files = [f for split in sorted(splits, key=lambda s: s != "train")
           for f in sorted(tree.splits[split][0])]
  problems = dict(tree.problems)
  if augment == "imagenet":
    size, sizes_found = None, ""
  else:
    size, sizes_found = _common_size(
        files, root, problems,
        SMALL_IMAGE_MAX_SIDE if augment == "auto" else None)
  recipe = _choose_recipe(augment, size, where, sizes_found)
  return _make_spec(
      tfds_name="image_folder", where=where,
      num_classes=len(tree.classes), splits=splits,
      size=size, cache_bytes=tree.total_bytes,
      recipe=recipe, image_key="image", label_key="label", folder=root,
      problems=tuple(sorted(problems.items())), class_names=tree.classes)
