"""Where examples come from: the data set registry and config checks.

``config.dataset`` is a name of :data:`DATASETS`, or ``tfds:NAME`` or
``folder:PATH``, whose spec ``custom`` builds from the data themselves.

Everything that can be wrong with a config is checked here, before any data
is read, and reported as a :class:`DataError`. Importing this module imports
no TensorFlow (every engine reads its settings here); the tf.data engine
reads its splits with ``tf_data.splits``.
"""

import dataclasses
import functools
import importlib.util
import os
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ir2net_jax.data.shared import bad_data, constants, custom, digits, folders
from ir2net_jax.data.shared.prefetch import close_source
from ir2net_jax.data.shared.specs import (  # pylint: disable=g-multiple-import
    Augmentation, DataError, DatasetSpec, augmentation, normalized_range)
from ir2net_jax.data.shared.tf_recipes import tf_recipe

__all__ = [
    "DataError", "DatasetSpec", "DATASETS", "dataset_spec", "Settings",
    "read_settings", "checked_labels", "augmentation", "DTYPES", "file_format",
    "class_names",
]


DATASETS: Dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        tfds_name=digits.TFDS_NAME, num_classes=10, image_size=32,
        fixed_image_size=True, eval_split="test",
        shuffle_buffer=digits.NUM_TRAIN, cache=True, decoders=None,
        train_recipe=tf_recipe("digits_train"),
        eval_recipe=tf_recipe("digits_eval"),
        value_range=normalized_range(constants.DIGITS_MEAN,
                                     constants.DIGITS_STD),
        recipe="digits", flip=False,
        class_names=tuple(str(i) for i in range(10))),
    "cifar10": DatasetSpec(
        tfds_name="cifar10", num_classes=10, image_size=32,
        fixed_image_size=True, eval_split="test", shuffle_buffer=50_000,
        cache=True, decoders=None,
        train_recipe=tf_recipe("cifar10_train"),
        eval_recipe=tf_recipe("cifar10_eval"),
        value_range=normalized_range(constants.IMAGENET_MEAN,
                                     constants.IMAGENET_STD),
        recipe="cifar10",
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog",
                     "frog", "horse", "ship", "truck")),
    "imagenet2012": DatasetSpec(
        tfds_name="imagenet2012", num_classes=1000, image_size=224,
        fixed_image_size=False, eval_split="validation",
        shuffle_buffer=16_384, cache=False,
        decoders=("image",),
        train_recipe=tf_recipe("imagenet_train"),
        eval_recipe=tf_recipe("imagenet_eval"),
        value_range=normalized_range(constants.IMAGENET_MEAN,
                                     constants.IMAGENET_STD),
        recipe="imagenet2012", crop="resized"),
}

DTYPES = ("float32", "bfloat16")


def dataset_spec(name: str, data_dir: Optional[str] = None,
                 augment: str = "auto") -> DatasetSpec:
  """The spec of ``config.dataset``: registered, ``tfds:`` or ``folder:``.

  Args:
    name: a key of :data:`DATASETS`, ``tfds:NAME`` or ``folder:PATH``.
    data_dir: tfds data directory (for ``tfds:``).
    augment: ``config.augment``; registered data sets take 'auto' only (their
      recipes are the reference's).

  Raises:
    DataError: see ``custom.custom_spec``; an unknown name.
  """
  if isinstance(name, str) and custom.is_custom(name):
    return custom.custom_spec(name, data_dir, augment)
  if name not in DATASETS:
    raise DataError(
        f"Unknown dataset {name!r}; choose one of {sorted(DATASETS)}, "
        f"'{custom.TFDS_PREFIX}NAME' (a prepared tfds image classification "
        f"builder) or '{custom.FOLDER_PREFIX}PATH' (PATH/train/<class>/*.jpg) "
        "(--config.dataset=...).")
  if augment != "auto":
    raise DataError(
        f"augment={augment!r} applies to tfds: and folder: data sets; {name} "
        "always uses its reference recipe. Pass --config.augment=auto.")
  return DATASETS[name]


@dataclasses.dataclass(frozen=True)
class Settings:
  """The data fields of a config, checked, with defaults filled in."""
  dataset: str
  spec: DatasetSpec
  data_dir: Optional[str]
  manual_dir: Optional[str]
  image_size: int
  train_split: str
  eval_split: str
  shuffle_buffer: int
  dtype: str
  augmentation: Augmentation
  bad_examples: bad_data.Policy = bad_data.Policy()


def read_settings(config) -> Settings:
  """Reads and checks the data fields of ``config`` (see the package doc).

  Cheap for registered data sets; for ``tfds:`` and ``folder:`` ones the
  first call reads the metadata (and a folder's file list).

  Raises:
    DataError: unknown data set or dtype, or an image size it cannot serve;
      see ``dataset_spec``.
  """
  name = config.get("dataset")
  spec = dataset_spec(name, config.get("data_dir"),
                      config.get("augment") or "auto")
  image_size = config.get("image_size") or spec.image_size
  if spec.fixed_image_size and image_size != spec.image_size:
    raise DataError(f"{name} is served at image_size={spec.image_size} only; "
                    f"got {image_size}.")
  if image_size <= 0:
    raise DataError(f"image_size must be positive; got {image_size}.")
  dtype = config.get("dtype") or "float32"
  if dtype not in DTYPES:
    raise DataError(f"dtype must be one of {list(DTYPES)}; got {dtype!r}.")
  shuffle_buffer = config.get("shuffle_buffer") or spec.shuffle_buffer
  eval_split = config.get("eval_split") or spec.eval_split
  if not eval_split:
    raise DataError(
        f"{name} has no 'test', 'validation' or 'val' split to evaluate on; "
        "name one with --config.eval_split=SPLIT (e.g. 'train[90%:]' and "
        "--config.train_split='train[:90%]' for a tfds builder).")
  return Settings(
      dataset=name, spec=spec, data_dir=config.get("data_dir"),
      manual_dir=config.get("manual_dir"), image_size=int(image_size),
      train_split=config.get("train_split") or "train",
      eval_split=eval_split, shuffle_buffer=int(shuffle_buffer),
      dtype=dtype, augmentation=augmentation(config, spec),
      bad_examples=bad_data.read_policy(config))


def check_files(settings: Settings) -> None:
  """The check before training of a ``folder:`` data set's files: what
  its listing and header check found, under the run's ``bad_examples``
  policy (``bad_data.check_listing``); once per process and policy.

  Raises:
    DataError: see ``bad_data.check_listing``.
  """
  if settings.spec.folder is not None:
    _check_folder(settings.dataset, settings.spec.folder,
                  settings.spec.problems, settings.bad_examples)


def bad_file_tally(settings: Settings) -> bad_data.Tally:
  """A run's tally of bad files, holding what a ``folder:`` listing found
  (see ``bad_data``)."""
  root = settings.spec.folder
  return bad_data.Tally(settings.dataset, settings.bad_examples).preload(
      dict(settings.spec.problems),
      lambda path: os.path.relpath(path, root).split(os.sep)[0])


def skipped_files(settings: Settings) -> Tuple[str, ...]:
  """The files a ``folder:`` listing found bad, which the tf.data engine
  leaves out under ``bad_examples='skip'`` (the grain engine replaces them
  where they are read)."""
  if settings.spec.folder is None or not settings.bad_examples.skip:
    return ()
  return tuple(path for path, _ in settings.spec.problems)


@functools.lru_cache(maxsize=16)
def _check_folder(where: str, root: str, problems, policy: bad_data.Policy
                  ) -> None:
  tree = folders.scan(root)
  bad_data.check_listing(
      where, dict(problems),
      sum(tree.num_examples(split) for split in tree.splits), policy,
      tree.empty_classes)


def checked_labels(batches: Iterator[Dict[str, np.ndarray]], num_classes: int,
                   settings: Settings) -> Iterator[Dict[str, np.ndarray]]:
  """Passes ``batches`` on; raises DataError at a label outside [0,
  num_classes), which would otherwise train silently on a zero target.
  Closing it closes ``batches``."""
  try:
    for batch in batches:
      labels = batch["label"]
      if labels.min() < 0 or labels.max() >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(
            f"{settings.dataset} {settings.train_split!r} has label "
            f"{int(bad[0])}, outside the model's {num_classes} classes "
            f"0..{num_classes - 1}; check the data set in data_dir="
            f"{settings.data_dir!r} and config.num_classes.")
      yield batch
  finally:
    close_source(batches)   # grain's worker processes and shared memory


def file_format(builder) -> str:
  """How a prepared tfds builder stores its data: 'tfrecord' (what tf.data
  reads) or 'array_record' (what ``tfds.data_source`` reads, no
  TensorFlow)."""
  found = builder.info.file_format
  return str(getattr(found, "value", found))


def class_names(config, num_classes: int) -> List[str]:
  """Label ``i``'s name for each of ``num_classes`` labels: the data set's
  (``DatasetSpec.class_names``; ImageNet's WordNet IDs, from
  tensorflow_datasets' list where it is installed), else ``str(i)``.

  Raises:
    DataError: ``config.dataset`` is unknown, or a ``tfds:`` / ``folder:``
      data set is not there (``dataset_spec``).
  """
  spec = dataset_spec(config.get("dataset"), config.get("data_dir"),
                      config.get("augment") or "auto")
  names = list(spec.class_names)
  if not names and spec.tfds_name == "imagenet2012":
    names = _tfds_imagenet_names()
  return [names[i] if i < len(names) else str(i) for i in range(num_classes)]


def _tfds_imagenet_names() -> List[str]:
  """The 1000 WordNet IDs of tfds' imagenet2012 labels, read from the
  tensorflow_datasets package without importing it; [] where it is not
  installed."""
  found = importlib.util.find_spec("tensorflow_datasets")
  for root in (found and found.submodule_search_locations) or ():
    path = os.path.join(root, "datasets", "imagenet2012", "labels.txt")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        return f.read().split()
  return []
