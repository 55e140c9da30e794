"""Where examples come from: the data set registry, config checks, tfds reads.

Everything that can be wrong with a config is checked here, before any data
is read, and reported as a :class:`DataError`.
"""

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ir2net_jax.data import digits, recipes

__all__ = [
    "DataError", "DatasetSpec", "DATASETS", "Settings", "read_settings",
    "open_builder", "HostSplit", "read_split",
]


class DataError(ValueError):
  """A data set is unknown, missing, or asked for in a way we cannot serve."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about one data set.

  Attributes:
    tfds_name: the tfds builder name.
    num_classes: number of labels.
    image_size: default model input size; the only one allowed when
      ``fixed_image_size``.
    fixed_image_size: whether other image sizes are refused.
    eval_split: default evaluation split.
    shuffle_buffer: default shuffle buffer, in examples.
    cache: whether each host's decoded split is small enough to keep in memory.
    decoders: tfds ``decoders`` argument (ImageNet keeps JPEG bytes).
    train_recipe: ``(image, seed, image_size) -> float32 image``.
    eval_recipe: ``(image, image_size) -> float32 image``.
    value_range: smallest and largest normalised pixel value.
  """
  tfds_name: str
  num_classes: int
  image_size: int
  fixed_image_size: bool
  eval_split: str
  shuffle_buffer: int
  cache: bool
  decoders: Optional[Dict[str, Any]]
  train_recipe: Callable[..., tf.Tensor]
  eval_recipe: Callable[..., tf.Tensor]
  value_range: Tuple[float, float]


DATASETS: Dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        tfds_name=digits.Ir2netDigits.name, num_classes=10, image_size=32,
        fixed_image_size=True, eval_split="test",
        shuffle_buffer=digits.NUM_TRAIN, cache=True, decoders=None,
        train_recipe=recipes.digits_train, eval_recipe=recipes.digits_eval,
        value_range=recipes.normalized_range(recipes.DIGITS_MEAN,
                                             recipes.DIGITS_STD)),
    "cifar10": DatasetSpec(
        tfds_name="cifar10", num_classes=10, image_size=32,
        fixed_image_size=True, eval_split="test", shuffle_buffer=50_000,
        cache=True, decoders=None,
        train_recipe=recipes.cifar10_train, eval_recipe=recipes.cifar10_eval,
        value_range=recipes.normalized_range(recipes.IMAGENET_MEAN,
                                             recipes.IMAGENET_STD)),
    "imagenet2012": DatasetSpec(
        tfds_name="imagenet2012", num_classes=1000, image_size=224,
        fixed_image_size=False, eval_split="validation",
        shuffle_buffer=16_384, cache=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        train_recipe=recipes.imagenet_train, eval_recipe=recipes.imagenet_eval,
        value_range=recipes.normalized_range(recipes.IMAGENET_MEAN,
                                             recipes.IMAGENET_STD)),
}

_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}


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
  dtype: tf.DType


def read_settings(config) -> Settings:
  """Reads and checks the data fields of ``config`` (see the package doc).

  Raises:
    DataError: unknown data set or dtype, or an image size it cannot serve.
  """
  name = config.get("dataset")
  if name not in DATASETS:
    raise DataError(f"Unknown dataset {name!r}; choose one of "
                    f"{sorted(DATASETS)} (--config.dataset=...).")
  spec = DATASETS[name]
  image_size = config.get("image_size") or spec.image_size
  if spec.fixed_image_size and image_size != spec.image_size:
    raise DataError(f"{name} is served at image_size={spec.image_size} only; "
                    f"got {image_size}.")
  if image_size <= 0:
    raise DataError(f"image_size must be positive; got {image_size}.")
  dtype = config.get("dtype") or "float32"
  if dtype not in _DTYPES:
    raise DataError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}.")
  shuffle_buffer = config.get("shuffle_buffer") or spec.shuffle_buffer
  return Settings(
      dataset=name, spec=spec, data_dir=config.get("data_dir"),
      manual_dir=config.get("manual_dir"), image_size=int(image_size),
      train_split=config.get("train_split") or "train",
      eval_split=config.get("eval_split") or spec.eval_split,
      shuffle_buffer=int(shuffle_buffer), dtype=_DTYPES[dtype])


def open_builder(settings: Settings) -> tfds.core.DatasetBuilder:
  """Returns the prepared tfds builder, preparing it where that is possible.

  digits is built locally on first use (well under a second). ImageNet is
  prepared from ``manual_dir`` when it is not prepared yet (hours). CIFAR-10
  is never downloaded from here. In a multi-host run, prepare once (e.g. with
  ``dataset_info`` on one host) before all hosts start reading.

  Raises:
    DataError: the data set is not prepared and cannot be prepared here.
  """
  data_dir = settings.data_dir
  if settings.dataset == "digits":
    builder = digits.Ir2netDigits(data_dir=data_dir)
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
  raise DataError(
      f"{settings.spec.tfds_name} is not prepared in {where}, and this "
      "pipeline never downloads. On a machine with network, run "
      f"`tfds build {settings.spec.tfds_name} --data_dir=DIR`, copy DIR here "
      "if needed, then pass --config.data_dir=DIR.")


@dataclasses.dataclass(frozen=True)
class HostSplit:
  """One host's share of a split.

  Attributes:
    dataset: this host's examples, ``{'image': ..., 'label': int64 ()}``, in
      a deterministic order; ``image`` is uint8 (H, W, C), or a JPEG string
      for ImageNet.
    host_counts: number of examples of every host, indexed by process index.
    process_index: this host's index.
  """
  dataset: tf.data.Dataset
  host_counts: Tuple[int, ...]
  process_index: int

  @property
  def num_examples(self) -> int:
    """Number of examples of this host."""
    return self.host_counts[self.process_index]


def _as_dataset(builder, split, decoders) -> tf.data.Dataset:
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(try_autocache=False))
  return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})


def _known_host_counts(builder, split: str,
                       process_count: int) -> Optional[Tuple[int, ...]]:
  """Examples per host from the metadata, or None if the metadata has none."""
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
                    f"(known splits: {sorted(splits)}).") from e


def _count(ds: tf.data.Dataset) -> int:
  n = int(ds.cardinality())
  if n >= 0:
    return n
  return int(ds.reduce(np.int64(0), lambda count, _: count + 1))


def read_split(builder: tfds.core.DatasetBuilder, split: str,
               spec: DatasetSpec, process_index: int,
               process_count: int) -> HostSplit:
  """Reads this host's slice of ``split``: disjoint slices cover the split.

  Normally each host reads only its own slice
  (``tfds.split_for_jax_process``, sizes differing by at most one). When the
  split sizes are not recorded, or slicing was ignored (both happen under
  ``tfds.testing.mock_data``), every host reads the whole split and keeps
  every ``process_count``-th example instead.
  """
  counts = _known_host_counts(builder, split, process_count)
  if counts is not None:
    host_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count)
    ds = _as_dataset(builder, host_split, spec.decoders)
    if int(ds.cardinality()) in (counts[process_index],
                                 tf.data.UNKNOWN_CARDINALITY):
      return HostSplit(ds, counts, process_index)

  ds = _as_dataset(builder, split, spec.decoders)
  total = _count(ds)
  counts = tuple(len(range(i, total, process_count))
                 for i in range(process_count))
  return HostSplit(ds.shard(process_count, process_index), counts,
                   process_index)
