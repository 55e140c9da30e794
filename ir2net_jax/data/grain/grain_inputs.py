"""The grain engine's records, stream and batches.

The stream, the same on any number of hosts and workers:

* one global order: epoch ``e`` is a permutation of the split drawn from
  ``(seed, e)``, truncated to ``steps_per_epoch * global_batch`` examples,
  so batches never straddle epochs;
* the global batch of step ``s`` is the next ``global_batch`` examples of
  that order, and host ``h`` of ``n`` reads and decodes only its rows
  ``h * B .. (h + 1) * B - 1`` (``B = global_batch / n``). ImageNet's global
  batch is thus the same whatever the number of hosts, as CIFAR's is;
* the example at position ``i`` of epoch ``e`` is augmented with a numpy
  Generator seeded by ``(seed, e * examples_per_epoch + i)``.

So the batch at step ``s`` depends on ``(seed, s)`` only: a run resumed at
``s`` reads exactly what an uninterrupted one reads from ``s`` on, and the
number of worker processes (``config.input_workers``) changes the speed,
never the batches.

The recipes are ``host_recipes``' numpy ones, which mean what the tf.data
recipes mean (same crops, flips, lighting and resize; pixels equal up to the
decoders' rounding). Batches leave the host as uint8 (a quarter of float32's
bytes); :meth:`GrainInputs.batch_fn` (:func:`finish_batch`) converts and
normalises them on the devices, inside the train step, and applies there the
ImageNet recipe's lighting and flip, which the host only draws. With
``config.input_resize='device'`` (what 'auto' means on accelerators) the
RandomResizedCrop windows leave the host unresized too, on fixed-size
canvases, and are resized there (``window_resize``) to exactly the pixels
the host would make: a fifth less work per image on the host, about twice
the bytes per batch, the same batches.
"""

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ir2net_jax.data.grain import host_recipes, window_resize
from ir2net_jax.data.shared import (bad_data, constants, folders, image_files,
                                    sources)
from ir2net_jax.data.shared.prefetch import close_source
from ir2net_jax.data.shared.specs import DataError, DatasetInfo

__all__ = ["grain_installed", "check_config", "dataset_info", "TrainOrder",
           "Records", "open_records", "recipe_kind", "RESIZES",
           "resolve_resize", "finish_batch", "GrainInputs", "default_workers"]

Batch = Dict[str, np.ndarray]
RESIZES = ("auto", "host", "device")
# Never reached: a train stream has no end (grain's datasets need one).
_ENDLESS = 1 << 60


@functools.cache
def grain_installed() -> bool:
  """Whether grain imports here."""
  try:
    import grain  # pylint: disable=g-import-not-at-top,unused-import
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def recipe_kind(settings: sources.Settings) -> str:
  """'small' (pad and crop) or 'large' (RandomResizedCrop)."""
  spec = settings.spec
  if spec.recipe == "digits":
    raise DataError(
        "digits are served by the device engine (or tf.data), not grain: "
        "pass --config.input_engine=device (or auto).")
  return "small" if spec.crop == "pad" else "large"


def check_config(config) -> sources.Settings:
  """The data settings, checked for this engine (cheap: reads no data).

  Raises:
    DataError: grain is not installed, or the data set is not one it serves.
  """
  if not grain_installed():
    raise DataError("input_engine='grain' needs grain and array_record: "
                    "`pip install grain array_record` (or "
                    "--config.input_engine=auto).")
  settings = sources.read_settings(config)
  recipe_kind(settings)
  resolve_resize(config)
  return settings


class Records:
  """One split as a random-access source: ``records[i] -> (image, label)``,
  the image encoded (bytes) or a uint8 array, the label an int.

  Picklable: what grain's worker processes receive is the recipe to open it
  (a file list, or a tfds name, split and data_dir), not an open file.
  """

  def __init__(self, open_fn: Callable[[], Tuple[Any, Callable]],
               length: int, name_fn: Callable[[int], str]):
    self._open_fn = open_fn
    self._length = length
    self._opened = None
    self.name = name_fn   # index -> the file (or record) it reads

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    if self._opened is None:
      self._opened = self._open_fn()
    source, read = self._opened
    return read(source, int(index))

  def __getstate__(self):
    return {**self.__dict__, "_opened": None}


def _read_file(source, index):
  paths, labels = source
  return image_files.read_file(paths[index]), int(labels[index])


def _open_folder(root, split):
  return folders.scan(root).splits[split], _read_file


def _folder_name(root, split, index):
  return folders.scan(root).splits[split][0][index]


def _record_name(name, split, index):
  return f"{name} {split}[{index}]"


def _read_tfds(keys, source, index):
  example = source[index]
  return example[keys[0]], int(example[keys[1]])


def _open_tfds(name, split, data_dir, image_key, label_key):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(
      name, split=split, data_dir=data_dir, download=False,
      decoders={image_key: tfds.decode.SkipDecoding()})
  return source, functools.partial(_read_tfds, (image_key, label_key))


def _tfds_builder(settings: sources.Settings):
  """The prepared ArrayRecord builder of a tfds data set."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, data_dir = settings.spec.tfds_name, settings.data_dir
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{name}: cannot open the tfds builder in data_dir="
                    f"{data_dir!r}: {e}") from e
  fix = (f"`tfds build {name} --data_dir=DIR --file_format=array_record` "
         "(on a machine with the data), or --config.input_engine=tf.data")
  if not builder.is_prepared():
    raise DataError(f"{name} is not prepared in {builder.data_dir} "
                    f"(data_dir={data_dir or 'the tfds default'}); the grain "
                    f"engine reads ArrayRecord data prepared with {fix}.")
  file_format = sources.file_format(builder)
  if file_format != "array_record":
    raise DataError(f"{name} in {builder.data_dir} is stored as "
                    f"{file_format}; the grain engine reads ArrayRecord: "
                    f"prepare it with {fix}.")
  return builder


def open_records(settings: sources.Settings, split: str) -> Records:
  """``split`` of the configured data set as :class:`Records`.

  Raises:
    DataError: no such split; data not prepared as ArrayRecord.
  """
  spec = settings.spec
  if spec.folder is not None:
    tree = folders.scan(spec.folder)
    if split not in tree.splits:
      raise DataError(
          f"folder {spec.folder} has no split {split!r} (its splits, the "
          f"subfolders holding <class>/ images: {sorted(tree.splits)}); name "
          "one with --config.train_split / --config.eval_split (a folder "
          "serves whole splits only, no slices like 'train[:90%]').")
    return Records(functools.partial(_open_folder, spec.folder, split),
                   tree.num_examples(split),
                   functools.partial(_folder_name, spec.folder, split))
  builder = _tfds_builder(settings)
  opener = functools.partial(_open_tfds, spec.tfds_name, split,
                             settings.data_dir, spec.image_key,
                             spec.label_key)
  try:
    length = len(opener()[0])
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"Cannot read split {split!r} of {builder.name}: {e} "
                    f"(known splits: {sorted(builder.info.splits)}); name "
                    "one with --config.train_split / --config.eval_split."
                    ) from e
  return Records(opener, length, functools.partial(
      _record_name, spec.tfds_name, split))


def dataset_info(config) -> DatasetInfo:
  """Split sizes, classes and image size, as this engine reads them.

  Raises:
    DataError: see :func:`check_config` and :func:`open_records`.
  """
  settings = check_config(config)
  sources.check_files(settings)
  return _info(settings, *(open_records(settings, split) for split in
                           (settings.train_split, settings.eval_split)))


def _info(settings: sources.Settings, train: "Records",
          evaluate: "Records") -> DatasetInfo:
  return DatasetInfo(num_train=len(train), num_eval=len(evaluate),
                     num_classes=settings.spec.num_classes,
                     image_size=settings.image_size,
                     train_split=settings.train_split,
                     eval_split=settings.eval_split)


# ------------------------------------------------------------ the recipes --

def _recipes(settings: sources.Settings, decoder: str,
             canvas: Optional[int] = None):
  """``(train(image, rng) -> dict, eval(image) -> uint8 (S, S, 3))``.

  The CIFAR recipe's train examples are finished on the host: ``{'image':
  uint8 (S, S, 3)}``. The ImageNet recipe's leave the lighting and the flip
  (drawn here, in the reference's order) to the device, where they cost
  nothing: ``{'image': the crop, 'shift': int32 (3,), 'flip': bool}``, and
  with ``canvas`` the resize too (``host_recipes.imagenet_train_parts``).
  """
  size, aug, spec = settings.image_size, settings.augmentation, settings.spec
  if recipe_kind(settings) == "small":
    padding = aug.crop_padding
    if padding is None:
      padding = (constants.CIFAR_PADDING if spec.recipe == "cifar10"
                 else constants.small_padding(size))
    return (functools.partial(_small_train, image_size=size, padding=padding,
                              flip=aug.flip),
            functools.partial(host_recipes.small_eval, image_size=size))
  return (functools.partial(host_recipes.imagenet_train_parts,
                            image_size=size, scale=aug.crop_scale,
                            flip=aug.flip, decoder=decoder,
                            with_lighting=spec.recipe == "imagenet2012",
                            canvas=canvas),
          functools.partial(host_recipes.imagenet_eval, image_size=size,
                            decoder=decoder))


def _small_train(image, rng, **kwargs) -> Batch:
  return {"image": host_recipes.small_train(image, rng, **kwargs)}


def resolve_resize(config) -> str:
  """Where the grain engine resizes RandomResizedCrop windows: 'host' or
  'device' (``config.input_resize``; 'auto' is 'device' on accelerators and
  'host' on CPUs, where the device's resize would cost more than the
  host's)."""
  name = config.get("input_resize") or "auto"
  if name not in RESIZES:
    raise DataError(f"input_resize={name!r} is not one of {RESIZES} "
                    "(--config.input_resize=auto).")
  if name == "auto":
    return "host" if jax.default_backend() == "cpu" else "device"
  return name


def finish_batch(batch: Batch, dtype=np.float32) -> Batch:
  """A host batch made a model input, on the device (or the host): the
  windows resized, the lighting shift and the flip applied where the batch
  carries them, then ``ToTensor`` + ``Normalize``.

  Args:
    batch: ``image`` uint8 (B, S, S, 3), ``label`` (B,), optionally
      ``shift`` int32 (B, 3), ``flip`` bool (B,), ``mask`` (B,); or
      ``image`` uint8 canvases (B, C, C, 3) with their ``resize`` int32
      (B, 2, S, 1 + K) and ``vertical_first`` bool (B,)
      (``window_resize``).
    dtype: of the images out.

  Returns:
    ``image`` (B, S, S, 3) in ``dtype``, normalised, and the batch's
    ``label`` (and ``mask``).
  """
  images = batch["image"]
  if "resize" in batch:
    images = window_resize.resize_windows(images, batch["resize"],
                                          batch["vertical_first"])
  if "shift" in batch:
    images = host_recipes.shift_levels(images, batch["shift"][:, None, None])
  if "flip" in batch:
    flip = batch["flip"][:, None, None, None]
    images = jnp.where(flip, images[:, :, ::-1], images)
  out = {k: v for k, v in batch.items()
         if k not in ("image", "shift", "flip", "resize", "vertical_first")}
  out["image"] = host_recipes.normalize(images, dtype=dtype)
  return out


# -------------------------------------------------------------- the order --

@functools.lru_cache(maxsize=8)   # on every example's path
def _keys(seed: int) -> Tuple[int, int]:
  """The shuffle and augmentation keys of ``seed`` (numpy's SeedSequence is
  stable across versions and machines)."""
  state = np.random.SeedSequence([seed, 0x6772]).generate_state(2, np.uint64)
  return int(state[0] >> 1), int(state[1] >> 1)


@dataclasses.dataclass(frozen=True)
class TrainOrder:
  """Which example, augmented with which seed, sits at each position of a
  host's stream (see the module docstring).

  Attributes:
    num_examples: examples in the split.
    global_batch: examples per step, all hosts together.
    local_batch: this host's rows of each global batch.
    rows: the first of them.
    seed: the data seed.
  """
  num_examples: int
  global_batch: int
  local_batch: int
  rows: int
  seed: int

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.global_batch

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: int64 (num_examples,)."""
    return _permutation(self.num_examples, _keys(self.seed)[0], epoch)

  def locate(self, position: int, attempt: int = 0) -> Tuple[int, int]:
    """``(example index, example number)`` of this host's ``position``-th
    example; the number (its place in the run's global stream) seeds its
    augmentation. ``attempt`` k > 0: the example k places further along the
    epoch's whole permutation (cyclically), the replacement of a bad
    file, with the same number."""
    step, row = divmod(position, self.local_batch)
    epoch, batch = divmod(step, self.steps_per_epoch)
    i = batch * self.global_batch + self.rows + row
    per_epoch = self.steps_per_epoch * self.global_batch
    order = self.permutation(epoch)
    return int(order[(i + attempt) % len(order)]), epoch * per_epoch + i

  def rng(self, number: int) -> np.random.Generator:
    return np.random.default_rng([_keys(self.seed)[1], number])


@functools.lru_cache(maxsize=2)
def _permutation(num_examples: int, key: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([key, epoch]).permutation(num_examples)


# Bad files met by one example, recorded in its batch for the main process
# to log and count (-1: none); more in a row are replaced but not recorded.
BAD_SLOTS = 4
# Replacements tried for one example before the run stops.
_MAX_REPLACEMENTS = 64


def _read(records: Records, index: int, recipe, *args):
  """``(recipe(image, *args), label)`` of example ``index``.

  Raises:
    BadImage: the file cannot be read or decoded, named.
  """
  try:
    image, label = records[index]
    return recipe(image, *args), label
  except image_files.BadImage as e:   # the decoders' checks name no file
    raise image_files.BadImage(records.name(index), e.reason) from None
  except Exception as e:  # pylint: disable=broad-except
    if not bad_data.is_bad_data(e):
      raise
    raise image_files.BadImage(records.name(index),
                               image_files.describe_error(e)) from None


def _bad_slots(found) -> np.ndarray:
  out = np.full(BAD_SLOTS, -1, np.int64)
  out[:len(found[:BAD_SLOTS])] = found[:BAD_SLOTS]
  return out


class _TrainExample:
  """position -> {'image': uint8 (S, S, 3), 'label': int32 (), 'bad': int64
  (BAD_SLOTS,)}. Under the 'skip' policy an example that fails to read is
  replaced by the next one of its epoch's order, augmented with the draws
  of its own position: the stream stays a function of (seed, step)."""

  def __init__(self, records: Records, order: TrainOrder, recipe,
               skip: bool):
    self._records, self._order, self._recipe = records, order, recipe
    self._skip = skip

  def __call__(self, position: int) -> Batch:
    bad = []
    for attempt in range(_MAX_REPLACEMENTS):
      index, number = self._order.locate(int(position), attempt)
      try:
        out, label = _read(self._records, index, self._recipe,
                           self._order.rng(number))
      except image_files.BadImage:
        if not self._skip:
          raise
        bad.append(index)
        continue
      return {**out, "label": np.int32(label), "bad": _bad_slots(bad)}
    raise DataError(f"{_MAX_REPLACEMENTS} bad files in a row (the first: "
                    f"{self._records.name(bad[0])}); check the data with "
                    "ir2net-check-data.")


class _EvalExample:
  """position -> one padded eval example, ``mask`` 0 past the host's end
  (and, under the 'skip' policy, for a file that fails to read)."""

  def __init__(self, records: Records, start: int, count: int, recipe,
               image_size: int, skip: bool):
    self._records, self._start, self._count = records, start, count
    self._recipe, self._size, self._skip = recipe, image_size, skip

  def __call__(self, position: int) -> Batch:
    position = int(position)
    padding = {"image": np.zeros((self._size, self._size, 3), np.uint8),
               "label": np.int32(0), "mask": np.float32(0)}
    if position >= self._count:
      return {**padding, "bad": _bad_slots([])}
    index = self._start + position
    try:
      image, label = _read(self._records, index, self._recipe)
    except image_files.BadImage:
      if not self._skip:
        raise
      return {**padding, "bad": _bad_slots([index])}
    return {"image": image, "label": np.int32(label), "mask": np.float32(1),
            "bad": _bad_slots([])}


def default_workers() -> int:
  """``input_workers=-1``: one process per core this process may use, none
  (threads only) on hosts of fewer than 4 cores."""
  cores = len(os.sched_getaffinity(0)) if hasattr(
      os, "sched_getaffinity") else (os.cpu_count() or 1)
  return cores if cores >= 4 else 0


def _iterate(dataset, workers: int, threads: int) -> Iterator[Batch]:
  """Batches of a grain MapDataset, in order: made by ``workers`` processes
  of one thread each, or (``workers=0``) by ``threads`` threads of this
  process."""
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():   # grain reads its flags; outside absl.app
    flags.FLAGS.mark_as_parsed()    # (tests, notebooks) take their defaults
  threads = 1 if workers > 0 else threads
  stream = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=2 * threads))
  if workers > 0:
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=2))
  return iter(stream)


class GrainInputs:
  """The grain engine behind ``engines.open_inputs``' interface: uint8 host
  batches, placed on the devices ``config.prefetch`` steps ahead and
  normalised there (:meth:`batch_fn`, inside the train step)."""

  engine = "grain"

  def __init__(self, config, mesh, eval_batch_size: int,
               num_classes: Optional[int] = None,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    self.settings = check_config(config)
    self._config, self._mesh = config, mesh
    self._num_classes = num_classes
    self._index = (jax.process_index() if process_index is None
                   else process_index)
    self._count = (jax.process_count() if process_count is None
                   else process_count)
    self._train = open_records(self.settings, self.settings.train_split)
    self._eval = open_records(self.settings, self.settings.eval_split)
    self.info = _info(self.settings, self._train, self._eval)
    large = recipe_kind(self.settings) == "large"
    self.resize = resolve_resize(config) if large else "host"
    size = self.settings.image_size
    self._train_recipe, self._eval_recipe = _recipes(
        self.settings, host_recipes.resolve_decoder("auto"),
        host_recipes.canvas_size(size) if self.resize == "device" else None)
    workers = config.get("input_workers")
    self.workers = default_workers() if workers in (None, -1) else workers
    self._threads = max(1, min(8, default_workers() or os.cpu_count() or 1))
    self._eval_batch = self._local(eval_batch_size)
    self._finish = jax.jit(self.batch_fn())
    sources.check_files(self.settings)
    self._skip = self.settings.bad_examples.skip
    self.bad_files = sources.bad_file_tally(self.settings)
    logging.info("grain: %d worker processes, %s decoding, train windows "
                 "resized on the %s", self.workers,
                 host_recipes.resolve_decoder("auto"), self.resize)

  def _local(self, global_batch: int) -> int:
    if global_batch < 1 or global_batch % self._count:
      raise DataError(f"global_batch_size={global_batch} must be a positive "
                      f"multiple of process_count={self._count}.")
    return global_batch // self._count

  def train_order(self) -> TrainOrder:
    local = self._local(self._config.batch_size)
    order = TrainOrder(num_examples=len(self._train),
                       global_batch=self._config.batch_size,
                       local_batch=local, rows=self._index * local,
                       seed=self._config.seed)
    if order.steps_per_epoch == 0:
      raise DataError(f"{self.settings.train_split!r} has {len(self._train)} "
                      f"examples, fewer than a batch of "
                      f"{self._config.batch_size}.")
    return order

  def host_train_batches(self, start_step: int = 0,
                         workers: Optional[int] = None) -> Iterator[Batch]:
    """This host's train batches from ``start_step`` on, on the host:
    ``image`` uint8 (B, S, S, 3), ``label`` int32 (B,), and for the
    ImageNet recipe ``shift`` int32 (B, 3) and ``flip`` bool (B,), which
    :func:`finish_batch` applies (and with ``resize == 'device'`` the
    windows on canvases, ``image`` uint8 (B, C, C, 3), ``resize`` int32
    (B, 2, S, 1 + K), ``vertical_first`` bool (B,), which it resizes)."""
    import grain  # pylint: disable=g-import-not-at-top
    order = self.train_order()
    first = start_step * order.local_batch
    dataset = grain.MapDataset.range(first, first + _ENDLESS).map(
        _TrainExample(self._train, order, self._train_recipe,
                      self._skip)).batch(order.local_batch,
                                         drop_remainder=True)
    batches = self._tallied(
        _iterate(dataset, self.workers if workers is None else workers,
                 self._threads), self._train, self.settings.train_split)
    if self._num_classes is None:
      return batches
    return sources.checked_labels(batches, self._num_classes, self.settings)

  def host_eval_batches(self) -> Iterator[Batch]:
    """This host's eval batches, padded (``mask`` 0): every host yields
    ``ceil(max examples per host / B)`` of them."""
    import grain  # pylint: disable=g-import-not-at-top
    parts = np.array_split(np.arange(len(self._eval)), self._count)
    mine = parts[self._index]
    batches = -(-max(len(p) for p in parts) // self._eval_batch)
    dataset = grain.MapDataset.range(batches * self._eval_batch).map(
        _EvalExample(self._eval, int(mine[0]) if len(mine) else 0,
                     len(mine), self._eval_recipe,
                     self.settings.image_size, self._skip)).batch(
                         self._eval_batch)
    return self._tallied(_iterate(dataset, self.workers, self._threads),
                         self._eval, self.settings.eval_split)

  def _tallied(self, batches: Iterator[Batch], records: Records,
               split: str) -> Iterator[Batch]:
    """``batches`` without their ``bad`` rows, whose files are logged and
    counted in :attr:`bad_files`. Closing it closes ``batches``."""
    try:
      for batch in batches:
        for index in np.unique(batch.pop("bad")):
          if index >= 0:
            name = records.name(int(index))
            self.bad_files.add(name, bad_data.reason(name), split,
                               len(records))
        yield batch
    finally:
      close_source(batches)

  def batch_fn(self) -> Callable[[Batch, Any], Batch]:
    """``(host batch, step) -> batch``: :func:`finish_batch` in the
    config's dtype (the train step's and the eval's first op)."""
    dtype = jnp.dtype(self.settings.dtype)

    def finish(batch, step=None):
      del step   # a host batch is the step's already
      return finish_batch(batch, dtype)
    return finish

  def _placed(self, batches):
    from ir2net_jax.data.shared.prefetch import prefetch_to_device  # pylint: disable=g-import-not-at-top
    return prefetch_to_device(batches, self._config.prefetch,
                              jax.sharding.NamedSharding(
                                  self._mesh, jax.sharding.PartitionSpec(
                                      self._mesh.axis_names)))

  def train_batches(self, start_step: int = 0) -> Iterator:
    return self._placed(self.host_train_batches(start_step))

  def eval_batches(self) -> Iterator:
    for batch in self._placed(self.host_eval_batches()):
      yield self._finish(batch)

  def first_eval_images(self, count: int) -> np.ndarray:
    images = []
    for index in range(len(self._eval)):
      if len(images) == count:
        break
      try:
        images.append(_read(self._eval, index, self._eval_recipe)[0])
      except image_files.BadImage:
        if not self._skip:
          raise
    images = np.stack(images)
    return np.asarray(host_recipes.normalize(
        images, dtype=np.dtype(self.settings.dtype)))
