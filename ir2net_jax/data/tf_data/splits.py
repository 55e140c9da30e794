"""How the tf.data engine reads a split.

The prepared tfds builder (:func:`open_builder`, which prepares digits and
ImageNet where it can), or a ``folder:`` tree's listing, and this host's
share of a split (:func:`read_split`).
"""

import dataclasses
import os
from typing import Optional, Tuple

from absl import logging
import numpy as np

from ir2net_jax.data.shared import custom, folders
from ir2net_jax.data.shared.sources import Settings
from ir2net_jax.data.shared.specs import DataError, DatasetSpec

__all__ = ["open_builder", "HostSplit", "read_split"]


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
  from ir2net_jax.data.tf_data import digits_tfds  # pylint: disable=g-import-not-at-top
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


@dataclasses.dataclass(frozen=True)
class HostSplit:
  """One host's share of a split.

  Attributes:
    dataset: this host's examples, ``{'image': ..., 'label': int64 ()}``, in
      a deterministic order; ``image`` is uint8 (H, W, C), or a JPEG string
      for ImageNet, or the encoded image for ``tfds:`` and ``folder:``.
    host_counts: number of examples of every host, indexed by process index.
    process_index: this host's index.
    files: a ``folder:`` split's listing, ``(paths string (N,), labels
      int64 (N,))``; its ``dataset`` is then ``{'position': int64 (),
      'label': int64 ()}``, places in the listing, read by
      ``folder_reads.read``. None for other data sets.
  """
  dataset: "tf.data.Dataset"
  host_counts: Tuple[int, ...]
  process_index: int
  files: Optional[Tuple["tf.Tensor", "tf.Tensor"]] = None

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


def _folder_dataset(root: str, split: str, skipped=()):
  """A ``folder:`` split as tf.data reads it: the files ``folders.scan``
  lists (ImageFolder's examples, labels and order), less ``skipped``, as
  ``(dataset of {'position': int64 (), 'label': int64 ()}, (paths, labels))``.
  File names are bytes (any name the file system holds, UTF-8 or not), and
  nothing is opened before it is read: the bad files left out are never
  touched.

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
  files = (tf.constant([os.fsencode(paths[i]) for i in keep], tf.string),
           tf.constant(labels[keep], tf.int64))
  ds = tf.data.Dataset.from_tensor_slices({
      "position": tf.range(len(keep), dtype=tf.int64), "label": files[1]})
  return ds, files


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
  files = None
  if spec.folder is not None:
    ds, files = _folder_dataset(spec.folder, split, skipped)
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
                   process_index, files)
