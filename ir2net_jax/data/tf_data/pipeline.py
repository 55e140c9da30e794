"""tf.data pipelines: infinite resumable training batches, padded eval batches.

Training determinism. For a given ``seed`` the batch at step ``s`` depends on
nothing but ``s``. The examples are read as a *stream* of batches:

* data sets small enough to cache (digits, CIFAR-10): every host reads the
  whole split and the stream is the global one, of ``global_batch_size``
  examples a step; each host keeps its own rows of every global batch
  (host ``h`` of ``n`` keeps rows ``h * B .. (h + 1) * B - 1``). The global
  batch is thus the same whatever the number of hosts: a run on two hosts
  trains exactly like a run on one with the same global batch;
* ImageNet: each host reads only its own slice of the split (files are not
  shuffled; tfds shuffled the examples when it wrote them) and the stream is
  that host's, of ``B`` examples a step; the global batch depends on the
  number of hosts;
* epoch ``e`` of a stream is a shuffle seeded by ``(seed, stream, e)``
  (``reshuffle_each_iteration=False``), truncated to ``steps_per_epoch``
  batches, so that batches never straddle epochs;
* example ``i`` of epoch ``e`` is augmented with stateless ops seeded by
  ``(seed, stream, e * examples_per_epoch + i)``.

Starting at ``start_step`` therefore means starting at epoch
``start_step // steps_per_epoch`` and skipping ``start_step % steps_per_epoch``
batches' worth of examples before they are augmented, which yields exactly the
batches an iterator started at 0 yields from that step on. The ImageNet
shuffle buffer mixes within its window only; with the file order fixed, an
epoch is not a uniform permutation of the whole split (CIFAR-10 and digits are
cached and shuffled whole).
"""

import functools
from typing import Callable, Dict, Iterator, Optional, Set, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow as tf

from ir2net_jax.data.shared import bad_data, folders, sources
from ir2net_jax.data.shared.prefetch import close_source
from ir2net_jax.data.shared.sources import DataError
from ir2net_jax.data.shared.specs import DatasetInfo
from ir2net_jax.data.tf_data import folder_reads, recipes, splits

__all__ = ["DatasetInfo", "dataset_info", "train_iterator", "eval_iterator"]

Batch = Dict[str, np.ndarray]


@functools.cache
def _hide_accelerators_from_tf() -> None:
  """Keeps TF off GPUs and TPUs, which belong to JAX; once per process."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except ValueError:  # No such device type in this TF build.
      pass
    except RuntimeError as e:  # TF's devices were initialised already.
      logging.warning("Could not hide %s devices from TensorFlow: %s", kind, e)


def _process_layout(process_index: Optional[int],
                    process_count: Optional[int]) -> Tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if count < 1 or not 0 <= index < count:
    raise DataError(f"Need 0 <= process_index < process_count; got "
                    f"process_index={index}, process_count={count}.")
  return index, count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise DataError(f"global_batch_size={global_batch_size} must be a positive "
                    f"multiple of process_count={process_count}.")
  return global_batch_size // process_count


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # Parallelism comes from parallel map calls; one thread per op avoids
  # oversubscription (as the Flax ImageNet example does).
  options.threading.max_intra_op_parallelism = 1
  return options


def _open(config, global_batch_size, process_index, process_count,
          prepare_once: bool = False):
  """Checks everything cheap first, then opens the builder."""
  settings = sources.read_settings(config)
  index, count = _process_layout(process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, count)
  _hide_accelerators_from_tf()
  sources.check_files(settings)
  if prepare_once and jax.process_count() > 1:
    # Process 0 prepares a missing data set alone; the others wait, then find
    # it prepared (a shared data_dir) or prepare their own (a local one).
    if jax.process_index() == 0:
      splits.open_builder(settings)
    multihost_utils.sync_global_devices("ir2net_jax.data: prepared")
  return settings, splits.open_builder(settings), index, count, local_batch


def dataset_info(config) -> DatasetInfo:
  """Split sizes, classes and image size of the data set ``config`` names.

  Prepares digits (and ImageNet from ``manual_dir``) if needed. In a
  multi-host run every process must call it (before reading any data):
  process 0 prepares, the others wait for it, so a shared ``data_dir`` is
  prepared once.

  Raises:
    DataError: see ``sources.read_settings`` and ``splits.open_builder``.
  """
  settings, builder, _, _, _ = _open(config, 1, 0, 1, prepare_once=True)
  spec = settings.spec
  num_train, num_eval = (
      splits.read_split(builder, split, spec, 0, 1,
                        sources.skipped_files(settings)).num_examples
      for split in (settings.train_split, settings.eval_split))
  return DatasetInfo(num_train=num_train, num_eval=num_eval,
                     num_classes=spec.num_classes,
                     image_size=settings.image_size,
                     train_split=settings.train_split,
                     eval_split=settings.eval_split)


def _shuffle_and_augment_keys(seed: int, process_index: int) -> Tuple[int, int]:
  """Two 63-bit keys from (seed, process); numpy's SeedSequence is stable."""
  state = np.random.SeedSequence([seed, process_index]).generate_state(
      2, np.uint64)
  return int(state[0] >> 1), int(state[1] >> 1)


def train_iterator(config, *, global_batch_size: int, seed: int,
                   start_step: int = 0, process_index: Optional[int] = None,
                   process_count: Optional[int] = None,
                   num_classes: Optional[int] = None,
                   bad_files: Optional[bad_data.Tally] = None
                   ) -> Iterator[Batch]:
  """Infinite training batches of this host, from ``start_step`` on.

  Args:
    config: ConfigDict with the data fields (see the package docstring).
    global_batch_size: batch size summed over all hosts.
    seed: data seed: shuffling and augmentation.
    start_step: index of the first batch to yield; resuming at step k yields
      exactly what a fresh iterator yields from its k-th batch on.
    process_index: this host, default ``jax.process_index()``.
    process_count: number of hosts, default ``jax.process_count()``.
    num_classes: if given, every batch's labels are checked (numpy, on the
      host) to lie in [0, num_classes), the model's outputs.
    bad_files: the run's tally of a ``folder:`` data set's bad files, which
      counts those met while reading (default: a new one).

  Returns:
    An iterator of dicts of host-local numpy arrays, with
    ``B = global_batch_size // process_count``:
    ``image`` (B, S, S, 3) float32 or bfloat16 (``config.dtype``), normalised;
    ``label`` int32 (B,).

  Raises:
    DataError: bad config, missing data, or fewer examples per host than a
      batch; while iterating, a label outside [0, num_classes), or a bad
      file (see ``folder_reads.with_policy``).
  """
  if start_step < 0:
    raise DataError(f"start_step must be >= 0; got {start_step}.")
  settings, builder, index, count, local_batch = _open(
      config, global_batch_size, process_index, process_count)
  if settings.spec.cache:  # The global stream; this host keeps its rows.
    source = splits.read_split(builder, settings.train_split, settings.spec,
                               0, 1, sources.skipped_files(settings))
    stream_batch, rows = global_batch_size, index * local_batch
  else:  # This host's stream, all of it.
    source = splits.read_split(builder, settings.train_split, settings.spec,
                               index, count, sources.skipped_files(settings))
    stream_batch, rows = local_batch, 0
  # The same on every host (host slices differ by at most one example), and
  # equal to num_train // global_batch_size.
  steps_per_epoch = min(source.host_counts) // stream_batch
  if steps_per_epoch == 0:
    raise DataError(
        f"{settings.train_split!r} has {min(source.host_counts)} examples"
        f"{' on a host' if source.host_counts[1:] else ''}, fewer than its "
        f"batch of {stream_batch}.")

  def make(step, guard=None):
    return _train_dataset(source, settings, stream_batch, rows, local_batch,
                          steps_per_epoch, seed, step, guard)

  batches = _read_errors(make, start_step, source, settings,
                         settings.train_split, bad_files)
  if num_classes is None:
    return batches
  return sources.checked_labels(batches, num_classes, settings)


def _train_dataset(source: splits.HostSplit, settings: sources.Settings,
                   stream_batch: int, rows: int, local_batch: int,
                   steps_per_epoch: int, seed: int, start_step: int,
                   guard: Optional[Set[int]] = None) -> tf.data.Dataset:
  """The batched training dataset; see the module docstring.

  Args:
    source: the examples of the stream.
    settings: the data settings.
    stream_batch: examples per step in the stream.
    rows: the first of the ``local_batch`` rows of each stream batch that
      this host keeps.
    local_batch: this host's batch size.
    steps_per_epoch: batches per epoch.
    seed: the data seed.
    start_step: the first batch to yield.
    guard: a ``folder:`` split's positions to read guarded (see
      ``folder_reads.read``).
  """
  per_epoch = steps_per_epoch * stream_batch
  start_epoch, start_batch = divmod(start_step, steps_per_epoch)
  shuffle_key, augment_key = _shuffle_and_augment_keys(
      seed, source.process_index)
  examples = source.dataset.cache() if settings.spec.cache else source.dataset

  def epoch_examples(epoch):
    shuffle_seed = tf.random.stateless_uniform(
        [], seed=tf.stack([tf.constant(shuffle_key, tf.int64), epoch]),
        minval=0, maxval=2**62, dtype=tf.int64)
    ds = examples.shuffle(settings.shuffle_buffer, seed=shuffle_seed,
                          reshuffle_each_iteration=False)
    skip = tf.where(epoch == start_epoch, start_batch * stream_batch, 0)
    # filter rather than take: the cache is kept only if read to the end.
    ds = ds.enumerate().skip(tf.cast(skip, tf.int64))
    ds = ds.filter(lambda i, _: i < per_epoch)
    if local_batch < stream_batch:  # Before augmenting: only this host's rows.
      ds = ds.filter(lambda i, _: tf.logical_and(
          i % stream_batch >= rows, i % stream_batch < rows + local_batch))
    return ds.map(lambda i, ex: (epoch * per_epoch + i, ex))

  def preprocess(example_index, example):
    example_seed = tf.stack([tf.constant(augment_key, tf.int64), example_index])

    def decode(image, label):
      image = recipes.apply(settings.spec.train_recipe, image, example_seed,
                            settings.image_size, settings.augmentation)
      return {"image": tf.cast(image, settings.dtype),
              "label": tf.cast(label, tf.int32)}

    if source.files is None:
      return decode(example["image"], example["label"])
    size = settings.image_size
    return folder_reads.read(
        source.files, example["position"], decode,
        folder_reads.MAX_REPLACEMENTS if settings.bad_examples.skip else 1,
        {"image": tf.zeros([size, size, 3], settings.dtype),
         "label": tf.constant(0, tf.int32)}, guard)

  ds = tf.data.Dataset.counter(start_epoch).flat_map(epoch_examples)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  return _batched(ds, local_batch, source.files is not None and guard is None)


def eval_iterator(config, *, global_batch_size: int,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None,
                  bad_files: Optional[bad_data.Tally] = None
                  ) -> Iterator[Batch]:
  """One pass over the eval split, padded so every example counts once.

  Every host yields the same number of batches, ``ceil(max examples per host
  / B)``; examples that pad a host's last batches have ``mask == 0``, an
  all-zero image and label 0. Order is deterministic; no augmentation.

  Args:
    config: ConfigDict with the data fields (see the package docstring).
    global_batch_size: batch size summed over all hosts.
    process_index: this host, default ``jax.process_index()``.
    process_count: number of hosts, default ``jax.process_count()``.
    bad_files: as for :func:`train_iterator`; under 'skip' a bad file's
      example is left out (``mask`` 0).

  Returns:
    A finite iterator of dicts of host-local numpy arrays,
    ``B = global_batch_size // process_count``: ``image`` (B, S, S, 3)
    float32 or bfloat16, ``label`` int32 (B,), ``mask`` float32 (B,), 1 for a
    real example and 0 for padding.

  Raises:
    DataError: bad config or missing data.
  """
  settings, builder, index, count, local_batch = _open(
      config, global_batch_size, process_index, process_count)
  source = splits.read_split(builder, settings.eval_split, settings.spec,
                             index, count, sources.skipped_files(settings))
  num_batches = -(-max(source.host_counts) // local_batch)
  size = settings.image_size

  def decode(image, label):
    image = recipes.apply(settings.spec.eval_recipe, image, size)
    return {"image": tf.ensure_shape(tf.cast(image, settings.dtype),
                                     [size, size, 3]),
            "label": tf.cast(label, tf.int32),
            "mask": tf.constant(1.0, tf.float32)}

  pad = {"image": tf.zeros([size, size, 3], settings.dtype),
         "label": tf.constant(0, tf.int32),
         "mask": tf.constant(0.0, tf.float32)}
  padding = num_batches * local_batch - source.num_examples

  def make(first_batch, guard=None):
    if source.files is None:
      ds = source.dataset.map(lambda ex: decode(ex["image"], ex["label"]),
                              num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
      ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(padding))
    else:  # A bad file is left out of the accuracy (mask 0) or stops the run.
      positions = source.dataset.map(lambda ex: ex["position"]).concatenate(
          tf.data.Dataset.from_tensors(tf.constant(-1, tf.int64)).repeat(
              padding)).skip(first_batch * local_batch)
      filler = {**pad, "bad": tf.constant(b""), "failed": tf.constant(False),
                "bad_position": tf.constant(-1, tf.int64)}
      ds = positions.map(
          lambda p: tf.cond(p < 0, lambda: filler, lambda: folder_reads.read(
              source.files, p, decode, 1, pad, guard)),
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _batched(ds, local_batch, source.files is not None and guard is None)

  return _read_errors(make, 0, source, settings, settings.eval_split,
                      bad_files)


def _batched(ds: tf.data.Dataset, local_batch: int,
             one_batch: bool) -> tf.data.Dataset:
  """``ds`` in batches, prefetched; ``one_batch``: only the first, not
  prefetched (``folder_reads.with_policy`` reads a batch with every example
  guarded that way, and nothing more should be read guarded)."""
  ds = ds.batch(local_batch, drop_remainder=True)
  if one_batch:
    return ds.take(1).with_options(_options())
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _read_errors(make: Callable, start: int, source: splits.HostSplit,
                 settings: sources.Settings, split: str,
                 bad_files: Optional[bad_data.Tally]) -> Iterator[Batch]:
  """The batches of ``make(k, guard)`` (the batched dataset from batch
  ``k`` on) from ``start`` on; a bad file is named, and handled as the
  policy says, by ``folder_reads`` for a ``folder:`` data set, else named
  by the data set's name."""
  if source.files is None:
    return _named_errors(make(start).as_numpy_iterator(), settings)
  if bad_files is None:
    bad_files = sources.bad_file_tally(settings)
  listed = len(folders.scan(settings.spec.folder).splits[split][0])
  return folder_reads.with_policy(make, start, bad_files, split, listed)


def _named_errors(batches: Iterator[Batch],
                  settings: sources.Settings) -> Iterator[Batch]:
  """Passes ``batches`` of prepared (tfds) data on; a decoder's error
  becomes a DataError that names the data set (TensorFlow's message names
  no record). Closing it closes ``batches``."""
  try:
    yield from batches
  except tf.errors.InvalidArgumentError as e:
    raise DataError(
        f"{settings.dataset}: an image failed to decode in the tf.data "
        f"engine ({folder_reads.error_words(e)}); check the prepared data "
        f"in data_dir={settings.data_dir!r}.") from None
  finally:
    close_source(batches)
