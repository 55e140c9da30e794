"""The device engine's data on every device, and its stream of batches.

The stream, for a global batch of B and ``steps_per_epoch = N // B``:

* epoch ``e`` is ``jax.random.permutation(fold_in(shuffle_key, e), N)``,
  truncated to ``steps_per_epoch * B`` examples (batches never straddle
  epochs); step ``s`` takes rows ``(s % steps_per_epoch) * B ...`` of epoch
  ``s // steps_per_epoch``;
* example ``j`` of the stream (``j = s * B + row``) is augmented with
  ``fold_in(augment_key, j)``: the crop offsets, then the flip;
* both keys come from ``config.seed`` alone.

So the batch at step ``s`` depends on nothing but ``(seed, s)``: resuming is
exact, and any number of devices or hosts sees the same global batch (the
random draws are threefry's, the same on every backend). The recipes are
the tf.data engine's (``recipes``): digits bilinearly upsampled to 32 (done
once, when the data are loaded), random crop with zero padding, the flip
where the recipe or ``config.flip`` asks for it, ``(x / 255 - mean) /
std``. The streams of the two engines are not the same draws: a run
resumes with the engine it started with.

Reading the data needs no TensorFlow for digits (scikit-learn ships it);
CIFAR-10 comes from tfds, through tf.data where TensorFlow is installed and
through ``tfds.data_source`` (ArrayRecord files) where it is not.
"""

import dataclasses
import functools
import importlib.util
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from absl import logging
import flax
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from ir2net_jax.data.shared import constants, digits, sources
from ir2net_jax.data.shared.specs import DataError, DatasetInfo

__all__ = ["DATASETS", "DeviceArrays", "DeviceInputs", "TooLarge", "can_serve",
           "check_config", "dataset_info", "upsample_bilinear",
           "train_batch", "eval_batch"]


class TooLarge(DataError):
  """The data would take more than ``config.device_data_limit`` of a
  device's memory."""


@dataclasses.dataclass(frozen=True)
class _Dataset:
  """A data set this engine serves: its recipe's defaults."""
  num_classes: int
  padding: int
  flip: bool
  mean: Tuple[float, ...]
  std: Tuple[float, ...]


DATASETS: Dict[str, _Dataset] = {
    "digits": _Dataset(10, constants.DIGITS_PADDING, False,
                       constants.DIGITS_MEAN, constants.DIGITS_STD),
    "cifar10": _Dataset(10, constants.CIFAR_PADDING, True,
                        constants.IMAGENET_MEAN, constants.IMAGENET_STD),
}
IMAGE_SIZE = 32  # both are served at 32 only, as by the tf.data engine
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def tensorflow_installed() -> bool:
  """Whether TensorFlow can be imported (no import is made)."""
  try:
    return importlib.util.find_spec("tensorflow") is not None
  except ImportError:  # an import hook that refuses it
    return False


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The train recipe of one run (static: part of the compiled step).

  Attributes:
    padding: zero padding of the random crop, in pixels.
    flip: mirror left-right with probability 1/2.
    mean: per-channel means, 0..1 scale.
    std: per-channel standard deviations, 0..1 scale.
    dtype: the batch's image dtype, 'float32' or 'bfloat16'.
  """
  padding: int
  flip: bool
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  dtype: str = "float32"


def _reason_not_served(config) -> Optional[str]:
  """Why this engine cannot serve ``config``'s data, or None if it can."""
  name = config.get("dataset")
  if name not in DATASETS:
    return (f"it serves {sorted(DATASETS)} only, not {name!r}")
  if config.get("augment", "auto") != "auto":
    return f"{name} takes augment='auto' only"
  if (config.get("image_size") or IMAGE_SIZE) != IMAGE_SIZE:
    return f"{name} is served at image_size={IMAGE_SIZE} only"
  if config.get("crop_scale") is not None:
    return (f"crop_scale applies to the RandomResizedCrop recipes; {name} is "
            "trained with pad-and-crop (set crop_padding instead)")
  if config.get("shuffle_buffer") is not None:
    return "it shuffles whole splits (shuffle_buffer must be None)"
  if name == "digits":
    for field in ("train_split", "eval_split"):
      if config.get(field) not in ("train", "test", "", None):
        return (f"digits' {field} must be 'train' or 'test' here, not "
                f"{config.get(field)!r} (tf.data serves slices)")
  elif not tensorflow_installed():
    if importlib.util.find_spec("array_record") is None:
      return (f"reading {name} needs TensorFlow, or array_record for "
              "tfds.data_source")
  return None


def can_serve(config) -> bool:
  """Whether ``config``'s data and augmentation are this engine's to serve
  (from the config alone; whether they fit in memory is checked on load)."""
  return _reason_not_served(config) is None


def check_config(config) -> None:
  """Raises DataError, naming the fix, where this engine cannot serve
  ``config``."""
  reason = _reason_not_served(config)
  if reason is not None:
    raise DataError(f"input_engine='device' cannot serve this config: "
                    f"{reason}. Use --config.input_engine=auto (or tf.data).")


def recipe(config) -> Recipe:
  """The run's :class:`Recipe`: the config's flip and padding where it sets
  them, else the data set's."""
  spec = DATASETS[config.dataset]
  flip, padding = config.get("flip"), config.get("crop_padding")
  return Recipe(padding=spec.padding if padding is None else int(padding),
                flip=spec.flip if flip is None else bool(flip),
                mean=spec.mean, std=spec.std,
                dtype=config.get("dtype") or "float32")


def upsample_bilinear(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize with half-pixel centres, as ``tf.image.resize`` does.

  Args:
    images: (N, h, w, C), any real or integer dtype.
    size: output height and width.

  Returns:
    float32 (N, size, size, C), on the scale of ``images``.
  """

  def axis_weights(n_in: int) -> np.ndarray:  # (size, n_in)
    coord = (np.arange(size) + 0.5) * (n_in / size) - 0.5
    coord = np.clip(coord, 0.0, None)
    low = np.minimum(np.floor(coord).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = (coord - low).astype(np.float32)
    weights = np.zeros((size, n_in), np.float32)
    weights[np.arange(size), low] += 1.0 - frac
    weights[np.arange(size), high] += frac
    return weights

  x = images.astype(np.float32)
  rows, cols = axis_weights(x.shape[1]), axis_weights(x.shape[2])
  return np.einsum("yh,nhwc,xw->nyxc", rows, x, cols).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _host_arrays(dataset: str, data_dir: Optional[str], train_split: str,
                 eval_split: str) -> Tuple[np.ndarray, ...]:
  """``(train_images, train_labels, eval_images, eval_labels)`` on the host:
  images (N, 32, 32, C), float32 0..255 for digits (upsampled once), uint8
  for CIFAR-10; labels int32."""
  if dataset == "digits":
    out = []
    for split in (train_split, eval_split):
      images, labels = digits.load_split(split)
      out += [upsample_bilinear(images, IMAGE_SIZE), labels]
    return tuple(out)
  out = []
  for split in (train_split, eval_split):
    out += _tfds_arrays(dataset, data_dir, split)
  return tuple(out)


def _tfds_arrays(name: str, data_dir: Optional[str],
                 split: str) -> Tuple[np.ndarray, np.ndarray]:
  """One tfds split as ``(uint8 images, int32 labels)``."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise DataError(
        f"{name} is not prepared in {builder.data_dir} (data_dir="
        f"{data_dir or 'the tfds default'}); prepare it once with `tfds build "
        f"{name} --data_dir=DIR` (add --file_format=array_record to read it "
        "without TensorFlow) and pass --config.data_dir=DIR.")
  file_format = sources.file_format(builder)
  if file_format != "array_record" and not tensorflow_installed():
    raise DataError(
        f"{name} in {builder.data_dir} is stored as {file_format}, which "
        "only TensorFlow reads: install it (`pip install tensorflow-cpu`), or "
        f"prepare the data again with `tfds build {name} --data_dir=DIR "
        "--file_format=array_record`.")
  try:
    if file_format == "array_record":
      source = builder.as_data_source(split=split)
      examples = source.__getitems__(list(range(len(source))))
      arrays = {k: np.stack([e[k] for e in examples])
                for k in ("image", "label")}
    else:
      ds = builder.as_dataset(split=split, shuffle_files=False)
      batches = list(tfds.as_numpy(ds.batch(4096)))
      arrays = {k: np.concatenate([b[k] for b in batches])
                for k in ("image", "label")}
  except (KeyError, ValueError, NotImplementedError) as e:
    raise DataError(f"cannot read split {split!r} of {name} from "
                    f"{builder.data_dir}: {e}") from e
  return (np.asarray(arrays["image"], np.uint8),
          np.asarray(arrays["label"], np.int32))


def _read(config) -> Tuple[np.ndarray, ...]:
  check_config(config)
  return _host_arrays(config.dataset, config.get("data_dir"),
                      config.get("train_split") or "train",
                      config.get("eval_split") or "test")


def dataset_info(config) -> DatasetInfo:
  """Split sizes, classes and image size (reads the data on first use).

  Raises:
    DataError: see :func:`check_config`; CIFAR-10 not prepared.
  """
  train_images, _, eval_images, _ = _read(config)
  return DatasetInfo(num_train=len(train_images), num_eval=len(eval_images),
                     num_classes=DATASETS[config.dataset].num_classes,
                     image_size=IMAGE_SIZE,
                     train_split=config.get("train_split") or "train",
                     eval_split=config.get("eval_split") or "test")


@flax.struct.dataclass
class DeviceArrays:
  """Both splits, on the devices (replicated). M is padded to whole eval
  batches.

  Attributes:
    train_images: (N, 32, 32, C) uint8, or float32 0..255 (digits).
    train_labels: int32 (N,).
    eval_images: (M, 32, 32, C), as ``train_images``.
    eval_labels: int32 (M,).
    eval_mask: float32 (M,), 0 for padding.
  """
  train_images: jax.Array
  train_labels: jax.Array
  eval_images: jax.Array
  eval_labels: jax.Array
  eval_mask: jax.Array


def _normalize(images: jax.Array, recipe_: Recipe) -> jax.Array:
  """(B, H, W, C) 0..255 -> (B, H, W, 3) normalised, in the recipe's dtype."""
  x = images.astype(jnp.float32)
  x = jnp.broadcast_to(x, x.shape[:-1] + (len(recipe_.mean),))
  x = (x / 255.0 - jnp.asarray(recipe_.mean, jnp.float32)) / jnp.asarray(
      recipe_.std, jnp.float32)
  return x.astype(_DTYPES[recipe_.dtype])


def stream_keys(seed: int) -> Tuple[jax.Array, jax.Array]:
  """The shuffle and augmentation keys of the stream of ``seed``."""
  shuffle_key, augment_key = jax.random.split(jax.random.key(seed))
  return shuffle_key, augment_key


def augment_draws(augment_key: jax.Array, examples: jax.Array,
                  recipe_: Recipe) -> Tuple[jax.Array, jax.Array]:
  """The random choices for stream examples ``examples`` (B,).

  Returns:
    ``(offsets, flips)``: int32 (B, 2) crop offsets (top, left) in
    [0, 2 * padding], and bool (B,) (all False without the flip).
  """

  def draw(example):
    crop_key, flip_key = jax.random.split(jax.random.fold_in(augment_key,
                                                             example))
    offset = jax.random.randint(crop_key, (2,), 0, 2 * recipe_.padding + 1)
    flip = jax.random.bernoulli(flip_key) & recipe_.flip
    return offset, flip

  return jax.vmap(draw)(examples)


def crop_and_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array,
                  padding: int) -> jax.Array:
  """Pads each image with ``padding`` zeros a side, takes the (H, W) window
  at ``offsets`` and mirrors it where ``flips``.

  Args:
    images: (B, H, W, C).
    offsets: int32 (B, 2), top and left in [0, 2 * padding].
    flips: bool (B,).
    padding: pixels of zeros.

  Returns:
    (B, H, W, C), the dtype of ``images``.
  """
  _, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding),
                            (0, 0)))
  crops = jax.vmap(lambda im, o: lax.dynamic_slice(im, (o[0], o[1], 0),
                                                   (h, w, c)))(padded, offsets)
  return jnp.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


def train_batch(arrays: DeviceArrays, step: jax.Array, *, seed: int,
                batch_size: int, steps_per_epoch: int, recipe_: Recipe,
                sharding: Optional[NamedSharding] = None
                ) -> Dict[str, jax.Array]:
  """The global training batch of ``step`` (see the module docstring).

  Traced inside the jitted train step.

  Args:
    arrays: the data on the devices.
    step: int32 scalar, the 0-based index of the batch (``state.step``).
    seed: the data seed.
    batch_size: the global batch size B.
    steps_per_epoch: ``N // B``.
    recipe_: the augmentation.
    sharding: how the batch is split over the devices (None: not at all);
      each device then draws and augments its own rows only.

  Returns:
    ``image`` (B, 32, 32, 3) normalised in the recipe's dtype, ``label``
    int32 (B,).
  """
  split = (lambda x: x) if sharding is None else (
      lambda x: jax.sharding.reshard(x, sharding))
  shuffle_key, augment_key = stream_keys(seed)
  num_train = arrays.train_labels.shape[0]
  epoch, index = jnp.divmod(step, steps_per_epoch)
  order = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch),
                                 num_train)
  rows = split(lax.dynamic_slice_in_dim(order, index * batch_size,
                                        batch_size))
  examples = split(step * batch_size + jnp.arange(batch_size))
  offsets, flips = augment_draws(augment_key, examples, recipe_)
  gather = lambda x: x.at[rows].get(out_sharding=sharding)
  images = crop_and_flip(gather(arrays.train_images), offsets, flips,
                         recipe_.padding)
  return {"image": _normalize(images, recipe_),
          "label": gather(arrays.train_labels)}


def eval_batch(arrays: DeviceArrays, index: jax.Array, *, batch_size: int,
               recipe_: Recipe, sharding: Optional[NamedSharding] = None
               ) -> Dict[str, jax.Array]:
  """Eval batch ``index`` of ``batch_size``: ``image``, ``label``, ``mask``
  (split over the devices as ``sharding`` says)."""
  split = (lambda x: x) if sharding is None else (
      lambda x: jax.sharding.reshard(x, sharding))
  take = lambda x: split(lax.dynamic_slice_in_dim(x, index * batch_size,
                                                  batch_size))
  return {"image": _normalize(take(arrays.eval_images), recipe_),
          "label": take(arrays.eval_labels), "mask": take(arrays.eval_mask)}


def _device_bytes_limit() -> Optional[int]:
  """Memory of one local device, where the backend reports it (not CPUs)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends differ
    return None
  return (stats or {}).get("bytes_limit")


class DeviceInputs:
  """The run's data on the devices, and the batches drawn from them.

  Args:
    config: the run's config (data fields, ``seed``, ``batch_size``,
      ``eval_batch_size``, ``device_data_limit``).
    mesh: the ``('data',)`` mesh: the data are replicated over it, batches
      split along its axis.
    eval_batch_size: the global eval batch size.
    num_classes: the model's outputs; every label is checked against them.

  Raises:
    DataError: see :func:`check_config`; the data would take more than
      ``config.device_data_limit`` of a device's memory; a label outside
      [0, num_classes).
  """

  engine = "device"

  def __init__(self, config, mesh, eval_batch_size: int,
               num_classes: Optional[int] = None):
    train_images, train_labels, eval_images, eval_labels = _read(config)
    self.info = dataset_info(config)
    self.recipe = recipe(config)
    self.batch_size = config.batch_size
    self.steps_per_epoch = len(train_images) // config.batch_size
    if self.steps_per_epoch < 1:
      raise DataError(f"{config.dataset} has {len(train_images)} training "
                      f"examples, fewer than a batch of {config.batch_size}.")
    self.seed = config.seed
    self.eval_batch_size = eval_batch_size
    self.num_eval_batches = -(-len(eval_images) // eval_batch_size)
    pad = self.num_eval_batches * eval_batch_size - len(eval_images)
    mask = np.concatenate([np.ones(len(eval_images), np.float32),
                           np.zeros(pad, np.float32)])
    eval_images = np.concatenate(
        [eval_images, np.zeros((pad,) + eval_images.shape[1:],
                               eval_images.dtype)])
    eval_labels = np.concatenate([eval_labels, np.zeros(pad, np.int32)])
    if num_classes is not None:
      for split, labels in (("train", train_labels), ("eval", eval_labels)):
        if labels.min() < 0 or labels.max() >= num_classes:
          raise DataError(
              f"{config.dataset}'s {split} split has labels "
              f"{labels.min()}..{labels.max()}, outside the model's "
              f"{num_classes} classes; check config.num_classes.")
    host = DeviceArrays(train_images, train_labels, eval_images, eval_labels,
                        mask)
    size = sum(x.nbytes for x in jax.tree.leaves(host))
    limit = _device_bytes_limit()
    fraction = config.get("device_data_limit", 0.25)
    if limit is not None and size > fraction * limit:
      raise TooLarge(
          f"{config.dataset} takes {size / 2**20:.0f} MiB, more than "
          f"device_data_limit={fraction} of a device's {limit / 2**30:.1f} "
          "GiB; raise --config.device_data_limit or use "
          "--config.input_engine=tf.data.")
    self.arrays = jax.device_put(host, NamedSharding(mesh, P()))
    self.sharding = NamedSharding(mesh, P(mesh.axis_names))
    logging.info("input engine 'device': %s, %.1f MiB on each of %d devices",
                 config.dataset, size / 2**20, mesh.size)
    self._draw = None   # host_train_batch's, compiled on first use
    self._eval_batch = jax.jit(functools.partial(
        eval_batch, batch_size=eval_batch_size, recipe_=self.recipe,
        sharding=self.sharding))

  def batch_fn(self) -> Callable[[DeviceArrays, jax.Array], Any]:
    """``(arrays, step) -> global batch``, sharded along ``'data'``, for the
    train step to call (``step.sharded_train_step(..., batch_fn=)``)."""
    return functools.partial(train_batch, seed=self.seed,
                             batch_size=self.batch_size,
                             steps_per_epoch=self.steps_per_epoch,
                             recipe_=self.recipe, sharding=self.sharding)

  def train_batches(self, start_step: int = 0) -> Iterator[DeviceArrays]:
    """What the train step takes in place of a batch, at every step: the
    arrays (the step draws its batch from them and its own step count)."""
    del start_step  # The step's count says where the stream is.
    while True:
      yield self.arrays

  def host_train_batch(self, step: int) -> Dict[str, np.ndarray]:
    """The global batch of ``step`` on the host (tests, benchmarks)."""
    if self._draw is None:
      self._draw = jax.jit(self.batch_fn())
    return jax.device_get(self._draw(self.arrays, jnp.int32(step)))

  def eval_batches(self) -> Iterator[Dict[str, jax.Array]]:
    """Every eval batch (global, sharded), padded; ``mask`` 0 for padding."""
    for index in range(self.num_eval_batches):
      yield self._eval_batch(self.arrays, jnp.int32(index))

  def first_eval_images(self, count: int) -> np.ndarray:
    """The first ``count`` eval images after the eval recipe, (n, 32, 32, 3)
    on the host, n <= count."""
    images = self.arrays.eval_images[:min(count, self.info.num_eval)]
    return np.asarray(jax.device_get(_normalize(images, self.recipe)))
