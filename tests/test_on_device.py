"""The on-device input engine against its contract and against tf.data.

Contract (``data.device.on_device``): the batch at step s depends on (seed, s)
only, whatever the devices; every example once per epoch; the recipe is the
tf.data engine's (pad and crop, the flip where asked, the normalisation),
so the same raw image gives the same eval input, and the train inputs have
the same pixel statistics.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from ir2net_jax import data
from ir2net_jax.data.device import on_device
from ir2net_jax.data.shared import digits
from ir2net_jax.data.shared.specs import DataError
from ir2net_jax.data.tf_data import recipes
from ir2net_jax.train import parallel
from tests import train_utils


def _config(data_dir: str = "unused", **overrides):
  return train_utils.tiny_digits_config(data_dir, **overrides)


@functools.lru_cache(maxsize=None)
def _inputs(devices: int, seed: int = 0, **overrides):
  config = _config(seed=seed, **dict(overrides))
  mesh = parallel.data_mesh(jax.devices()[:devices])
  return on_device.DeviceInputs(config, mesh, eval_batch_size=48,
                                num_classes=10)


def test_upsample_is_tf_image_resize_bilinear():
  images, _ = digits.load_split("test")
  ours = on_device.upsample_bilinear(images[:64], 32)
  tfs = tf.image.resize(images[:64], [32, 32], method="bilinear").numpy()
  np.testing.assert_allclose(ours, tfs, atol=1e-3)   # on the 0..255 scale


def test_eval_inputs_are_the_tf_data_recipes():
  raw, labels = digits.load_split("test")
  inputs = _inputs(1)
  ours = inputs.first_eval_images(20)
  theirs = np.stack([recipes.digits_eval(tf.constant(x), 32).numpy()
                     for x in raw[:20]])
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  batch = jax.device_get(next(inputs.eval_batches()))
  np.testing.assert_array_equal(batch["label"], labels[:48])
  # CIFAR's recipe on uint8 images: ToTensor + Normalize(ImageNet).
  cifar = on_device.recipe(_config(dataset="cifar10", flip=None))
  image = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
  np.testing.assert_allclose(
      on_device._normalize(jnp.asarray(image), cifar),
      np.stack([recipes.cifar10_eval(tf.constant(x), 32) for x in image]),
      atol=1e-5)


def test_crop_and_flip_is_pad_then_window_then_mirror():
  rng = np.random.default_rng(1)
  images = rng.integers(1, 256, (6, 32, 32, 3)).astype(np.float32)
  offsets = rng.integers(0, 9, (6, 2)).astype(np.int32)
  flips = np.array([0, 1, 0, 1, 1, 0], bool)
  out = np.asarray(on_device.crop_and_flip(jnp.asarray(images), offsets,
                                           flips, 4))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i, (top, left) in enumerate(offsets):
    want = padded[i, top:top + 32, left:left + 32]
    np.testing.assert_array_equal(out[i], want[:, ::-1] if flips[i] else want)


def test_draws_are_uniform_and_the_flip_is_the_configs():
  key = on_device.stream_keys(0)[1]
  examples = jnp.arange(8000)
  recipe = on_device.recipe(_config(dataset="cifar10", flip=None))
  offsets, flips = map(np.asarray, on_device.augment_draws(key, examples,
                                                           recipe))
  assert offsets.min() == 0 and offsets.max() == 8
  counts = np.bincount(offsets.reshape(-1), minlength=9)
  assert np.all(np.abs(counts / counts.sum() - 1 / 9) < 0.01), counts
  assert abs(flips.mean() - 0.5) < 0.02
  assert recipe.flip and recipe.padding == 4   # CIFAR-10's own recipe
  # digits do not flip; flip=True turns it on without moving any crop.
  no_flip = on_device.recipe(_config(flip=None))
  assert not no_flip.flip and no_flip.padding == 2
  flipped = on_device.recipe(_config(flip=True))
  o1, f1 = on_device.augment_draws(key, examples[:64], no_flip)
  o2, f2 = on_device.augment_draws(key, examples[:64], flipped)
  np.testing.assert_array_equal(o1, o2)
  assert not np.any(f1) and np.any(f2)


def test_batch_depends_on_seed_and_step_only_whatever_the_devices():
  one, eight = _inputs(1), _inputs(8)
  for step in (0, 1, 88, 89, 500):   # 89 steps an epoch
    a, b = one.host_train_batch(step), eight.host_train_batch(step)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(one.host_train_batch(0)["image"],
                            one.host_train_batch(1)["image"])
  assert not np.array_equal(one.host_train_batch(0)["image"],
                            _inputs(1, seed=1).host_train_batch(0)["image"])
  # Laid out along 'data': each device holds its own rows.
  batch = jax.jit(eight.batch_fn())(eight.arrays, jnp.int32(3))
  assert batch["image"].sharding.spec[0] == "data"
  assert len(batch["image"].addressable_shards) == 8
  assert batch["image"].addressable_shards[0].data.shape == (2, 32, 32, 3)


def test_each_example_once_an_epoch():
  inputs = _inputs(1)
  arrays = inputs.arrays.replace(
      train_labels=jnp.arange(digits.NUM_TRAIN, dtype=jnp.int32))
  draw = jax.jit(inputs.batch_fn())
  spe = inputs.steps_per_epoch
  for epoch in (0, 1):
    seen = np.concatenate([np.asarray(draw(arrays, jnp.int32(s))["label"])
                           for s in range(epoch * spe, (epoch + 1) * spe)])
    assert len(np.unique(seen)) == len(seen) == spe * inputs.batch_size
  assert not np.array_equal(np.asarray(draw(arrays, jnp.int32(0))["label"]),
                            np.asarray(draw(arrays, jnp.int32(spe))["label"]))


@pytest.mark.slow
def test_train_pixel_statistics_match_tf_datas(tmp_path):
  """One epoch of each engine: the same examples, other random crops."""
  config = _config(data_dir=str(tmp_path / "tfds"))
  inputs = _inputs(1)
  ours = np.concatenate([inputs.host_train_batch(s)["image"]
                         for s in range(inputs.steps_per_epoch)])
  it = data.train_iterator(config, global_batch_size=config.batch_size,
                           seed=0, process_index=0, process_count=1)
  theirs = np.concatenate([next(it)["image"]
                           for _ in range(inputs.steps_per_epoch)])
  assert ours.shape == theirs.shape
  for stat in (np.mean, np.std):
    assert abs(stat(ours) - stat(theirs)) < 0.01, (stat(ours), stat(theirs))
  # The zero padding shows in the border rows as often in both.
  border = lambda x: np.mean(x[:, 0] == x.min())
  assert abs(border(ours) - border(theirs)) < 0.03


def test_engine_choice_and_errors():
  assert data.resolve_engine(_config()) == "device"
  assert data.resolve_engine(_config(input_engine="tf.data")) == "tf.data"
  assert data.resolve_engine(_config(shuffle_buffer=100)) == "tf.data"
  assert data.resolve_engine(_config(dataset="imagenet2012",
                                     image_size=224)) == "tf.data"
  with pytest.raises(DataError, match="imagenet2012.*input_engine=auto"):
    data.resolve_engine(_config(dataset="imagenet2012", image_size=224,
                                input_engine="device"))
  with pytest.raises(DataError, match="train_split"):
    data.resolve_engine(_config(input_engine="device",
                                train_split="train[:50%]"))
  with pytest.raises(DataError, match="not one of"):
    data.resolve_engine(_config(input_engine="dali"))


def test_labels_outside_the_model_are_refused():
  config = _config()
  with pytest.raises(DataError, match="outside the model's 5 classes"):
    on_device.DeviceInputs(config, parallel.data_mesh(jax.devices()[:1]),
                           eval_batch_size=48, num_classes=5)


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
@pytest.mark.parametrize("tensorflow", [True, False])
def test_tfds_splits_read_with_and_without_tensorflow(tmp_path, monkeypatch,
                                                      file_format, tensorflow):
  """How CIFAR-10 reaches the devices: ArrayRecord files through
  ``as_data_source`` (with or without TensorFlow), TFRecord files through
  tf.data (TensorFlow needed, else an error with the fix); both give the
  split's examples and labels. A tfds builder prepared here stands in for
  CIFAR-10 (8x8 grey digits, PNG encoded)."""
  from ir2net_jax.data.tf_data import digits_tfds  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / file_format)
  digits_tfds.Ir2netDigits(data_dir=data_dir).download_and_prepare(
      file_format=file_format)
  monkeypatch.setattr(on_device, "tensorflow_installed", lambda: tensorflow)
  read = lambda: on_device._tfds_arrays(  # pylint: disable=protected-access
      "ir2net_digits", data_dir, "test")
  if file_format == "tfrecord" and not tensorflow:
    with pytest.raises(DataError, match="--file_format=array_record"):
      read()
    return
  images, labels = read()
  want_images, want_labels = digits.load_split("test")
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  key = lambda im, lb: sorted(zip(lb.tolist(), [i.tobytes() for i in im]))
  assert key(images, labels) == key(want_images, want_labels)
