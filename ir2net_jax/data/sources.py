"""Where examples come from: the data set registry, config checks, tfds reads.

``config.dataset`` is a name of :data:`DATASETS`, or ``tfds:NAME`` or
``folder:PATH``, whose spec ``custom`` builds from the data themselves.

Everything that can be wrong with a config is checked here, before any data
is read, and reported as a :class:`DataError`. Importing this module imports
no TensorFlow (every engine reads its settings here); reading a split with
:func:`read_split` is the tf.data engine's and needs it.
"""

import dataclasses
import functools
import os
from typing import Dict, Iterator, Optional, Tuple

from absl import logging
import numpy as np

from ir2net_jax.data import bad_data, constants, custom, digits, folders
from ir2net_jax.data.prefetch import close_source
from ir2net_jax.data.specs import (  # pylint: disable=g-multiple-import
    Augmentation, DataError, DatasetSpec, augmentation, normalized_range)
from ir2net_jax.data.tf_recipes import tf_recipe

__all__ = [
    "DataError", "DatasetSpec", "DATASETS", "dataset_spec", "Settings",
    "read_settings", "checked_labels", "augmentation", "DTYPES", "file_format",
    "open_builder", "HostSplit", "read_split",
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
        recipe="digits", flip=False),
    "cifar10": DatasetSpec(
        tfds_name="cifar10", num_classes=10, image_size=32,
        fixed_image_size=True, eval_split="test", shuffle_buffer=50_000,
        cache=True, decoders=None,
        train_recipe=tf_recipe("cifar10_train"),
        eval_recipe=tf_recipe("cifar10_eval"),
        value_range=normalized_range(constants.IMAGENET_MEAN,
                                     constants.IMAGENET_STD),
        recipe="cifar10"),
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
                  settings.bad_examples)


def bad_file_tally(settings: Settings) -> bad_data.Tally:
  """A run's tally of bad files, holding what a ``folder:`` listing found
  (see ``bad_data``)."""
  tally = bad_data.Tally(settings.dataset, settings.bad_examples)
  if settings.spec.folder is not None:
    tally.preload(custom.folder_problems(settings.spec.folder))
  return tally


def skipped_files(settings: Settings) -> Tuple[str, ...]:
  """The files a ``folder:`` listing found bad, which the tf.data engine
  leaves out under ``bad_examples='skip'`` (the grain engine replaces them
  where they are read)."""
  if settings.spec.folder is None or not settings.bad_examples.skip:
    return ()
  return tuple(sorted(custom.folder_problems(settings.spec.folder)))


@functools.lru_cache(maxsize=16)
def _check_folder(where: str, root: str, policy: bad_data.Policy) -> None:
  tree = folders.scan(root)
  bad_data.check_listing(
      where, custom.folder_problems(root),
      sum(tree.num_examples(split) for split in tree.splits), policy,
      tree.empty_classes)


def open_builder(settings: Settings
                 ) -> Optional["tfds.core.DatasetBuilder"]:
  """Returns the prepared tfds builder, preparing it where that is possible.

  digits is built locally on first use (well under a second). ImageNet is
  prepared from ``manual_dir`` when it is not prepared yet (hours). CIFAR-10
  is never downloaded from here. In a multi-host run, prepare once (e.g. with
  ``dataset_info`` on one host) before all hosts start reading. A
  ``folder:`` data set has none: None (``read_split`` reads its listing).

  Raises:
    DataError: the data set is not prepared and cannot be prepared here.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data import digits_tfds  # pylint: disable=g-import-not-at-top
  data_dir = settings.data_dir
  if settings.spec.folder is not None:
    return None   # read from its listing (read_split), not a builder
  if settings.dataset == "digits":
    builder = digits_tfds.Ir2netDigits(data_dir=data_dir)
    if not builder.is_prepared():
      logging.info("preparing %s in %s", builder.name, builder.data_dir)
      builder.download_and_prepare()
    return builder

  builder = tfds.builder(settings.spec.tfds_name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  where = f"{builder.data_dir} (data_dir={data_dir or 'the tfds default'})"
  if settings.dataset == "imagenet2012":
    manual_dir = settings.manual_dir
    if not manual_dir:
      raise DataError(
          f"imagenet2012 is not prepared in {where}, and it cannot be "
          "downloaded. Pass --config.manual_dir=... pointing at the directory "
          "holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
          "(prepared once into data_dir), or --config.data_dir=... where it "
          "is already prepared.")
    if not os.path.isdir(os.path.expanduser(manual_dir)):
      raise DataError(f"manual_dir {manual_dir!r} is not a directory; it must "
                      "hold the ILSVRC2012 tars.")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir)))
    return builder
  raise custom.unprepared_error(settings.spec.tfds_name, builder, data_dir)


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


@dataclasses.dataclass(frozen=True)
class HostSplit:
  """One host's share of a split.

  Attributes:
    dataset: this host's examples, ``{'image': ..., 'label': int64 ()}``, in
      a deterministic order; ``image`` is uint8 (H, W, C), or a JPEG string
      for ImageNet, or the encoded image for ``tfds:`` and ``folder:``.
    host_counts: number of examples of every host, indexed by process index.
    process_index: this host's index.
  """
  dataset: "tf.data.Dataset"
  host_counts: Tuple[int, ...]
  process_index: int

  @property
  def num_examples(self) -> int:
    """Number of examples of this host."""
    return self.host_counts[self.process_index]


def _as_dataset(builder, split, spec: DatasetSpec) -> "tf.data.Dataset":
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = ({k: tfds.decode.SkipDecoding() for k in spec.decoders}
              if spec.decoders else None)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders=decoders,
                          read_config=tfds.ReadConfig(try_autocache=False))
  return ds.map(lambda ex: {"image": ex[spec.image_key],
                            "label": ex[spec.label_key]})


def _folder_dataset(root: str, split: str, skipped=()) -> "tf.data.Dataset":
  """A ``folder:`` split as tf.data reads it: the files ``folders.scan``
  lists (ImageFolder's examples, labels and order), less ``skipped``, read
  as ``{'image': encoded bytes, 'label': int64 ()}``. File names are bytes
  (any name the file system holds, UTF-8 or not), and nothing is opened
  before it is read: the bad files left out are never touched.

  Raises:
    DataError: the folder has no such split.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tree = folders.scan(root)
  if split not in tree.splits:
    raise DataError(
        f"folder {root} has no split {split!r} (its splits, the "
        f"subfolders holding <class>/ images: {sorted(tree.splits)}); name "
        "one with --config.train_split / --config.eval_split (a folder "
        "serves whole splits only, no slices like 'train[:90%]').")
  paths, labels = tree.splits[split]
  skipped = set(skipped)
  keep = [i for i, path in enumerate(paths) if path not in skipped]
  ds = tf.data.Dataset.from_tensor_slices({
      "path": tf.constant([os.fsencode(paths[i]) for i in keep], tf.string),
      "label": tf.constant(labels[keep], tf.int64)})
  return ds.map(lambda ex: {"image": tf.io.read_file(ex["path"]),
                            "label": ex["label"]})


def _known_host_counts(builder, split: str,
                       process_count: int) -> Optional[Tuple[int, ...]]:
  """Examples per host from the metadata, or None if the metadata has none."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  splits = builder.info.splits
  if not splits:  # Not recorded, as under tfds.testing.mock_data.
    return None
  try:
    return tuple(
        splits[tfds.split_for_jax_process(
            split, process_index=i, process_count=process_count)].num_examples
        for i in range(process_count))
  except (KeyError, ValueError) as e:
    raise DataError(f"Cannot read split {split!r} of {builder.name}: {e} "
                    f"(known splits: {sorted(splits)}); name one with "
                    "--config.train_split / --config.eval_split.") from e


def file_format(builder) -> str:
  """How a prepared tfds builder stores its data: 'tfrecord' (what tf.data
  reads) or 'array_record' (what ``tfds.data_source`` reads, no
  TensorFlow)."""
  found = builder.info.file_format
  return str(getattr(found, "value", found))


_UNKNOWN_CARDINALITY = -2   # tf.data.UNKNOWN_CARDINALITY


def _count(ds: "tf.data.Dataset") -> int:
  n = int(ds.cardinality())
  if n >= 0:
    return n
  return int(ds.reduce(np.int64(0), lambda count, _: count + 1))


def read_split(builder: "tfds.core.DatasetBuilder", split: str,
               spec: DatasetSpec, process_index: int,
               process_count: int, skipped=()) -> HostSplit:
  """Reads this host's slice of ``split``: disjoint slices cover the split.

  Normally each host reads only its own slice
  (``tfds.split_for_jax_process``, sizes differing by at most one). When the
  split sizes are not recorded, or slicing was ignored (both happen under
  ``tfds.testing.mock_data``), or the data set is a folder (served as whole
  splits), every host reads the whole split and keeps every
  ``process_count``-th example instead.

  Args:
    builder: the prepared builder (None for a folder).
    split, spec, process_index, process_count: what to read, for whom.
    skipped: files a folder's listing found bad, left out.

  Raises:
    DataError: ``split`` is not a split of the data set.
  """
  if spec.folder is not None:
    ds = _folder_dataset(spec.folder, split, skipped)
    counts = None
  else:
    counts = _known_host_counts(builder, split, process_count)
  if counts is not None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    host_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count)
    ds = _as_dataset(builder, host_split, spec)
    if int(ds.cardinality()) in (counts[process_index], _UNKNOWN_CARDINALITY):
      return HostSplit(ds, counts, process_index)

  if spec.folder is None:
    ds = _as_dataset(builder, split, spec)
  total = _count(ds)
  counts = tuple(len(range(i, total, process_count))
                 for i in range(process_count))
  return HostSplit(ds.shard(process_count, process_index), counts,
                   process_index)
