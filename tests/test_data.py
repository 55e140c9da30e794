"""Tests of ir2net_jax.data: tfds pipelines, augmentations, prefetch, errors.

digits is built for real into a temporary data_dir; cifar10 and imagenet2012
run under ``tfds.testing.mock_data`` (no network, no real data), with their
metadata written to a temporary data_dir so that they count as prepared.
"""

import collections
import dataclasses
import hashlib
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ir2net_jax import data
from ir2net_jax.data.shared import digits, sources
from ir2net_jax.data.tf_data import augment, digits_tfds, recipes

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(**overrides) -> ml_collections.ConfigDict:
  fields = dict(dataset="digits", data_dir=None, manual_dir=None,
                image_size=32, train_split="train", eval_split="test",
                shuffle_buffer=2048, dtype="float32")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def image_digest(image: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """A data_dir holding the prepared ir2net_digits."""
  path = str(tmp_path_factory.mktemp("tfds_digits"))
  data.dataset_info(make_config(data_dir=path))  # Prepares on first use.
  return path


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
  """A data_dir with cifar10's and imagenet2012's metadata, for mock_data."""
  path = str(tmp_path_factory.mktemp("tfds_mock"))
  for name in ("cifar10", "imagenet2012"):
    builder = tfds.builder(name, data_dir=path)
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
  return path


def indexed_cifar10(num_examples: int):
  """A mock ``_as_dataset``: example i has label i and every pixel i % 256."""
  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    def example(i):
      return {"id": tf.strings.as_string(i),
              "image": tf.fill([32, 32, 3], tf.cast(i % 256, tf.uint8)),
              "label": i}
    return tf.data.Dataset.range(num_examples).map(example)
  return as_dataset


# ---------------------------------------------------------------- digits ---

def test_digits_builder_has_fixed_splits(digits_dir):
  from sklearn.datasets import load_digits
  builder = digits_tfds.Ir2netDigits(data_dir=digits_dir)
  assert builder.info.splits["train"].num_examples == digits.NUM_TRAIN == 1437
  assert builder.info.splits["test"].num_examples == digits.NUM_TEST == 360
  test = list(builder.as_dataset(split="test").as_numpy_iterator())
  target = load_digits().target
  assert sorted(ex["label"] for ex in test) == sorted(target[::5])
  images = np.stack([ex["image"] for ex in test])
  assert images.shape == (360, 8, 8, 1) and images.dtype == np.uint8
  assert images.max() == 255 and images.min() == 0


def test_digits_read_without_scikit_learn_equal_load_digits(monkeypatch):
  """The bundled CSV read directly (no scikit-learn import) gives exactly
  ``load_digits()``'s examples, scaled; so does the fallback through
  ``load_digits`` where the file is not found."""
  from sklearn.datasets import load_digits
  want = load_digits()
  want_images = np.round(want.images * (255 / 16)).astype(np.uint8)
  for split, keep in (("train", np.arange(1797) % 5 != 0),
                      ("test", np.arange(1797) % 5 == 0)):
    for bundled in (True, False):
      digits._load_digits.cache_clear()
      if not bundled:
        monkeypatch.setattr(digits, "_bundled_csv", lambda: None)
      images, labels = digits.load_split(split)
      monkeypatch.undo()
      np.testing.assert_array_equal(images[..., 0], want_images[keep])
      np.testing.assert_array_equal(labels, want.target[keep])
      assert images.dtype == np.uint8 and labels.dtype == np.int32
  assert digits._bundled_csv() is not None   # the fast path was the one tested
  digits._load_digits.cache_clear()


def test_dataset_info(digits_dir):
  info = data.dataset_info(make_config(data_dir=digits_dir))
  assert info == data.DatasetInfo(num_train=1437, num_eval=360,
                                  num_classes=10, image_size=32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_batches_shapes_dtypes_ranges(digits_dir, dtype):
  config = make_config(data_dir=digits_dir, dtype=dtype)
  batch = next(data.train_iterator(config, global_batch_size=64, seed=0))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (64, 32, 32, 3)
  assert batch["image"].dtype == np.dtype(dtype)
  assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  image = batch["image"].astype(np.float32)
  assert image.min() >= -1.0 and image.max() <= 1.0  # mean 0.5, std 0.5
  assert image.min() == -1.0 and image.max() > 0.9
  assert set(batch["label"]) <= set(range(10))
  # Grey digits: the three channels are equal.
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_train_is_deterministic_per_seed(digits_dir):
  config = make_config(data_dir=digits_dir)
  def batches(seed):
    return take(data.train_iterator(config, global_batch_size=32, seed=seed), 3)
  first = batches(0)
  assert_same_batches(first, batches(0))
  other = batches(1)
  assert not np.array_equal(first[0]["label"], other[0]["label"])
  assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_train_resumes_exactly_at_any_step(digits_dir):
  config = make_config(data_dir=digits_dir)
  steps_per_epoch = 1437 // 128  # 11
  fresh = take(data.train_iterator(config, global_batch_size=128, seed=3), 24)
  # Epochs differ: reshuffled and re-augmented.
  assert not np.array_equal(fresh[0]["label"],
                            fresh[steps_per_epoch]["label"])
  for start in (5, steps_per_epoch, 2 * steps_per_epoch - 1):
    resumed = data.train_iterator(config, global_batch_size=128, seed=3,
                                  start_step=start)
    assert_same_batches(take(resumed, 24 - start), fresh[start:])


@pytest.mark.slow
def test_train_is_deterministic_across_processes(digits_dir):
  """A restarted process (fresh TF state) resumes with the same batches."""
  config = make_config(data_dir=digits_dir)
  expected = next(data.train_iterator(config, global_batch_size=16, seed=5,
                                      start_step=13))
  script = (
      "import sys, numpy as np, ml_collections\n"
      "from ir2net_jax import data\n"
      f"config = ml_collections.ConfigDict({config.to_dict()!r})\n"
      "b = next(data.train_iterator(config, global_batch_size=16, seed=5,"
      " start_step=13))\n"
      "np.save(sys.argv[1], b['image'])\n")
  out = os.path.join(digits_dir, "other_process.npy")
  subprocess.run([sys.executable, "-c", script, out], check=True, cwd=_REPO,
                 capture_output=True, env={**os.environ, "PYTHONPATH": _REPO})
  np.testing.assert_array_equal(np.load(out), expected["image"])


def test_eval_counts_every_example_once(digits_dir):
  from sklearn.datasets import load_digits
  config = make_config(data_dir=digits_dir)
  reference = None
  for process_count, global_batch in ((1, 64), (3, 96), (7, 70)):
    hosts = [list(data.eval_iterator(config, global_batch_size=global_batch,
                                     process_index=i,
                                     process_count=process_count))
             for i in range(process_count)]
    assert len({len(batches) for batches in hosts}) == 1  # Same everywhere.
    batches = [b for host in hosts for b in host]
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    assert mask.sum() == 360
    assert sorted(labels[mask == 1]) == sorted(load_digits().target[::5])
    np.testing.assert_array_equal(images[mask == 0], 0.0)
    real = collections.Counter(image_digest(x) for x in images[mask == 1])
    if reference is None:
      reference = real
      # Deterministic: a second pass gives the same batches.
      again = list(data.eval_iterator(config, global_batch_size=global_batch,
                                      process_index=0, process_count=1))
      assert_same_batches(hosts[0], again)
    assert real == reference  # Host slices are disjoint and cover the split.


# --------------------------------------------------------------- cifar10 ---

def test_cifar10_batches(mock_dir):
  config = make_config(dataset="cifar10", data_dir=mock_dir)
  with tfds.testing.mock_data(num_examples=20, data_dir=mock_dir):
    assert data.dataset_info(config).num_train == 20
    train = next(data.train_iterator(config, global_batch_size=8, seed=0))
    evals = list(data.eval_iterator(config, global_batch_size=8))
  low, high = recipes.normalized_range(recipes.IMAGENET_MEAN,
                                       recipes.IMAGENET_STD)
  assert train["image"].shape == (8, 32, 32, 3)
  assert train["image"].dtype == np.float32
  assert low - 1e-5 <= train["image"].min()
  assert train["image"].max() <= high + 1e-5
  # Zero padding of the random crop, normalised, is -mean/std.
  assert np.isclose(train["image"][..., 0], -0.485 / 0.229).any()
  assert len(evals) == 3 and sum(b["mask"].sum() for b in evals) == 20
  assert evals[0]["image"].shape == (8, 32, 32, 3)


def _indexed_cifar10_labels(mock_dir, num_examples, global_batch,
                            process_count, steps):
  """Labels (example indices) of ``steps`` batches of each host."""
  config = make_config(dataset="cifar10", data_dir=mock_dir)
  with tfds.testing.mock_data(as_dataset_fn=indexed_cifar10(num_examples),
                              data_dir=mock_dir):
    return [np.stack([b["label"] for b in take(data.train_iterator(
        config, global_batch_size=global_batch, seed=0, process_index=host,
        process_count=process_count), steps)]) for host in range(process_count)]


def test_cached_data_global_batch_is_the_same_on_any_number_of_hosts(
    mock_dir):
  """Small data sets: hosts split one global stream, so two hosts together
  train on exactly one host's batches; epochs are permutations."""
  num_examples, global_batch, steps_per_epoch = 42, 8, 5  # 42 // 8
  one, = _indexed_cifar10_labels(mock_dir, num_examples, global_batch, 1,
                                 2 * steps_per_epoch)
  two = _indexed_cifar10_labels(mock_dir, num_examples, global_batch, 2,
                                2 * steps_per_epoch)
  assert two[0].shape == (2 * steps_per_epoch, global_batch // 2)
  np.testing.assert_array_equal(np.concatenate(two, axis=1), one)
  epochs = one.reshape(2, steps_per_epoch * global_batch)
  for epoch in epochs:
    assert len(set(epoch)) == len(epoch) == 40  # No repeats in an epoch.
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled.


def test_uncached_data_hosts_read_their_own_slices(mock_dir, monkeypatch):
  """Large data sets (ImageNet): each host reads and shuffles only its slice."""
  monkeypatch.setitem(sources.DATASETS, "cifar10", dataclasses.replace(
      sources.DATASETS["cifar10"], cache=False))
  num_examples, local_batch, steps_per_epoch = 42, 4, 5  # 21 per host.
  seen = _indexed_cifar10_labels(mock_dir, num_examples, 2 * local_batch, 2,
                                 2 * steps_per_epoch)
  host_examples = {h: set(range(h, num_examples, 2)) for h in range(2)}
  for host, labels in enumerate(seen):
    epochs = labels.reshape(2, steps_per_epoch * local_batch)
    for epoch in epochs:
      assert len(set(epoch)) == len(epoch) == 20  # No repeats in an epoch.
      assert set(epoch) <= host_examples[host]
    assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled.
  assert not host_examples[0] & host_examples[1]
  assert host_examples[0] | host_examples[1] == set(range(num_examples))


# ---------------------------------------------------------- imagenet2012 ---

def test_imagenet_batches(mock_dir):
  config = make_config(dataset="imagenet2012", data_dir=mock_dir,
                       image_size=224, eval_split="validation",
                       shuffle_buffer=16)
  with tfds.testing.mock_data(num_examples=6, data_dir=mock_dir):
    info = data.dataset_info(config)
    train = take(data.train_iterator(config, global_batch_size=2, seed=0), 2)
    evals = list(data.eval_iterator(config, global_batch_size=4))
  assert info.num_classes == 1000 and info.image_size == 224
  low, high = recipes.normalized_range(recipes.IMAGENET_MEAN,
                                       recipes.IMAGENET_STD)
  for batch in train + evals:
    assert batch["image"].shape[1:] == (224, 224, 3)
    assert low - 1e-5 <= batch["image"].min()
    assert batch["image"].max() <= high + 1e-5
    assert ((0 <= batch["label"]) & (batch["label"] < 1000)).all()
  assert [b["mask"].tolist() for b in evals] == [[1, 1, 1, 1], [1, 1, 0, 0]]


def _jpeg(height: int, width: int, seed: int = 0) -> tf.Tensor:
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  return tf.io.encode_jpeg(pixels)


def test_random_resized_crop_window_within_scale_and_ratio():
  shape = tf.constant([300, 200, 3], tf.int32)
  windows = np.stack([
      augment.random_resized_crop_window(shape, tf.constant([7, s])).numpy()
      for s in range(50)])
  y, x, h, w = windows.T
  assert (y >= 0).all() and (x >= 0).all()
  assert (y + h <= 300).all() and (x + w <= 200).all()
  area = h * w / (300 * 200)
  assert (area >= 0.08 - 0.01).all() and (area <= 1).all()
  ratio = w / h
  assert (ratio >= 3 / 4 - 0.05).all() and (ratio <= 4 / 3 + 0.05).all()
  assert len({tuple(win) for win in windows}) > 40


def test_fused_decode_and_crop_output():
  jpeg = _jpeg(60, 90)
  crop = lambda s: augment.decode_and_random_resized_crop(
      jpeg, tf.constant([1, s]), 224).numpy()
  image = crop(0)
  assert image.shape == (224, 224, 3) and image.dtype == np.float32
  np.testing.assert_array_equal(image, np.round(image))
  assert image.min() >= 0 and image.max() <= 255
  np.testing.assert_array_equal(image, crop(0))
  assert not np.array_equal(image, crop(1))
  train = recipes.imagenet_train(jpeg, tf.constant([1, 0]), 64)
  assert train.shape == (64, 64, 3)


def test_eval_resize_and_center_crop():
  assert recipes.eval_resize_size(224) == 256
  resized = augment.resize_shorter_side(tf.zeros([300, 400, 3], tf.uint8), 256)
  assert resized.shape == (256, 341, 3)  # int(256 * 400 / 300), as torchvision.
  flat = tf.io.encode_jpeg(tf.fill([300, 400, 3], tf.constant(100, tf.uint8)))
  image = augment.decode_resize_and_center_crop(flat, 224, 256).numpy()
  assert image.shape == (224, 224, 3)
  assert np.abs(image - 100).max() <= 2  # JPEG round trip.
  grid = tf.reshape(tf.range(16), [4, 4, 1])
  np.testing.assert_array_equal(augment.center_crop(grid, 2)[..., 0],
                                [[5, 6], [9, 10]])


def test_lighting_shifts_all_pixels_by_a_small_constant():
  image = tf.fill([8, 8, 3], 128.0)
  seeds = [tf.constant([0, s]) for s in range(20)]
  # |offset_c| <= sum_j |eigvec_cj| eigval_j |alpha_j|, alpha ~ N(0, 0.1).
  bound = np.abs(recipes.IMAGENET_PCA_EIGVEC) @ np.array(
      recipes.IMAGENET_PCA_EIGVAL) * 0.1 * 6
  for seed in seeds:
    delta = augment.lighting(image, seed, 0.1, recipes.IMAGENET_PCA_EIGVAL,
                             recipes.IMAGENET_PCA_EIGVEC).numpy() - 128.0
    np.testing.assert_allclose(delta, np.broadcast_to(delta[0, 0], delta.shape))
    assert (np.abs(delta[0, 0]) <= bound).all() and np.any(delta != 0)
  # The reference's uint8 round trip: each channel stays or drops one level.
  changes = np.stack([recipes.pil_lighting(image, s).numpy()[0, 0] - 128.0
                      for s in seeds])
  assert set(np.unique(changes)) == {-1.0, 0.0}
  black = recipes.pil_lighting(tf.zeros([2, 2, 3]), seeds[0]).numpy()
  np.testing.assert_array_equal(black, 0.0)  # Clipped at 0, as the reference.


def test_random_crop_with_padding_and_flip():
  image = tf.reshape(tf.range(32 * 32 * 3, dtype=tf.float32) + 1, [32, 32, 3])
  crops = [augment.random_crop_with_padding(image, tf.constant([0, s]), 4)
           for s in range(10)]
  assert all(c.shape == (32, 32, 3) for c in crops)
  assert any(np.any(c.numpy() == 0) for c in crops)  # Zero padding shows.
  flips = [augment.random_flip_left_right(image, tf.constant([0, s])).numpy()
           for s in range(10)]
  assert any(np.array_equal(f, image.numpy()[:, ::-1]) for f in flips)
  assert any(np.array_equal(f, image.numpy()) for f in flips)


# --------------------------------------------------------------- prefetch ---

def test_prefetch_to_device_keeps_order_and_values():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  n = len(jax.devices())
  batches = [{"image": np.full((2 * n, 3), i, np.float32),
              "label": np.arange(2 * n, dtype=np.int32) + i} for i in range(5)]
  for size in (0, 2):
    out = list(data.prefetch_to_device(iter(batches), size, sharding))
    assert len(out) == 5
    for got, want in zip(out, batches):
      assert isinstance(got["image"], jax.Array)
      assert got["image"].sharding == sharding
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])


# ----------------------------------------------------------------- errors ---

def test_unknown_dataset_lists_choices():
  with pytest.raises(data.DataError, match="cifar10.*digits.*imagenet2012"):
    data.dataset_info(make_config(dataset="mnist"))


@pytest.mark.parametrize("dataset", ["digits", "cifar10"])
def test_wrong_image_size(dataset):
  with pytest.raises(data.DataError, match="image_size=32"):
    data.train_iterator(make_config(dataset=dataset, image_size=64),
                        global_batch_size=8, seed=0)


def test_bad_dtype_and_batch_size(digits_dir):
  with pytest.raises(data.DataError, match="dtype"):
    data.dataset_info(make_config(dtype="float16"))
  with pytest.raises(data.DataError, match="multiple of process_count=3"):
    data.eval_iterator(make_config(data_dir=digits_dir), global_batch_size=8,
                       process_index=0, process_count=3)
  with pytest.raises(data.DataError, match="fewer than its batch"):
    data.train_iterator(make_config(data_dir=digits_dir),
                        global_batch_size=4096, seed=0)


def test_unknown_split(digits_dir):
  with pytest.raises(data.DataError, match="validation"):
    data.eval_iterator(make_config(data_dir=digits_dir,
                                   eval_split="validation"),
                       global_batch_size=8)


def test_imagenet_missing_without_manual_dir(tmp_path):
  config = make_config(dataset="imagenet2012", image_size=224,
                       data_dir=str(tmp_path), eval_split="validation")
  with pytest.raises(data.DataError, match="--config.manual_dir="):
    data.train_iterator(config, global_batch_size=8, seed=0)
  config.manual_dir = str(tmp_path / "no_such_dir")
  with pytest.raises(data.DataError, match="ILSVRC2012"):
    data.eval_iterator(config, global_batch_size=8)


def test_cifar10_missing_says_how_to_prepare(tmp_path):
  config = make_config(dataset="cifar10", data_dir=str(tmp_path))
  with pytest.raises(data.DataError, match="tfds build cifar10"):
    data.dataset_info(config)
