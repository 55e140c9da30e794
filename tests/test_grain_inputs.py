"""The grain input engine against tf.data, and its stream's contract.

What it must mean what tf.data means: the same folder listing (labels and
order), the same pad-and-crop geometry for the same draw, eval images equal
up to the JPEG decoders' rounding, train pixel statistics within a stated
tolerance. What its stream must keep: a resumed stream equal to an
uninterrupted one, worker processes that change nothing, two hosts that read
the rows of one, every example once per epoch.
"""

import functools
import os

import jax
import ml_collections
import numpy as np
from photos import photo, write_tree
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ir2net_jax.configs import digits as digits_config
from ir2net_jax.data import engines
from ir2net_jax.data.grain import grain_inputs, host_recipes
from ir2net_jax.data.shared import constants, digits, folders
from ir2net_jax.data.shared.specs import DataError
from ir2net_jax.data.tf_data import augment, digits_tfds, pipeline
from ir2net_jax.train import parallel

pytestmark = pytest.mark.skipif(not grain_inputs.grain_installed(),
                                reason="grain is not installed")

MEAN = np.array(constants.IMAGENET_MEAN) * 255
STD = np.array(constants.IMAGENET_STD) * 255


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
  """Images of one size (the CIFAR recipe)."""
  return write_tree(tmp_path_factory.mktemp("small"),
                    {"train": 16, "test": 7}, [(40, 40)])


@pytest.fixture(scope="module")
def large_tree(tmp_path_factory):
  """Images of many sizes and aspect ratios (the ImageNet recipe)."""
  sizes = [(96, 128), (128, 96), (83, 85), (150, 100), (77, 131), (120, 120)]
  return write_tree(tmp_path_factory.mktemp("large"),
                    {"train": 16, "test": 7}, sizes, seed=1)


def make_config(dataset, **overrides):
  config = digits_config.get_config("smoke")
  config.dataset = dataset
  config.input_engine = "grain"
  config.input_workers = 0
  config.batch_size = 12
  for key, value in overrides.items():
    config[key] = value
  return config


def open_grain(config, process_index=None, process_count=None,
               eval_batch_size=12, num_classes=3):
  mesh = parallel.data_mesh(jax.devices()[:1])
  return grain_inputs.GrainInputs(config, mesh, eval_batch_size, num_classes,
                                  process_index, process_count)


def test_folder_listing_is_image_folders(tmp_path):
  """Labels and order as tfds' ImageFolder, which tf.data reads: tricky
  class names, upper-case suffixes, files and folders it ignores."""
  root = tmp_path / "tree"
  for split, name, files in [
      ("train", "a", ["x.png", "b.JPG", "c.jpeg", "notes.txt"]),
      ("train", "a-b", ["1.png", "0.png"]), ("train", "A", ["z.png"]),
      ("val", "a", ["q.png"]), ("val", "c", ["k.png", "j.PNG"]),
      ("empty", "a", [])]:
    os.makedirs(root / split / name, exist_ok=True)
    for f in files:
      (root / split / name / f).write_bytes(b"")
  (root / "README").write_text("not a split")
  tree = folders.scan(str(root))
  builder = tfds.folder_dataset.ImageFolder(str(root))
  assert tree.classes == tuple(builder.info.features["label"].names)
  assert sorted(tree.splits) == sorted(builder.info.splits)
  for split, examples in builder._split_examples.items():  # pylint: disable=protected-access
    paths, labels = tree.splits[split]
    assert list(paths) == [e.image_path for e in examples], split
    assert [tree.classes[i] for i in labels] == [e.label for e in examples]
  assert tree.num_examples("empty") == 0 and tree.num_examples("train") == 6


def test_pad_and_crop_geometry_matches_tf_for_the_same_draw():
  """For every offset TF's RandomCrop(padding) draws, the numpy crop at that
  offset is the same window, exactly (pixels coded by their position)."""
  size, padding = 12, 3
  y, x = np.mgrid[0:size, 0:size]
  image = np.stack([y + 1, x + 1, y * size + x + 1], -1).astype(np.uint8)
  seen = set()
  for seed in range(40):
    got = augment.random_crop_with_padding(
        tf.constant(image), tf.constant([seed, 7]), padding).numpy()
    row, col = np.argwhere(got[..., 0] > 0)[0]   # image pixel (y, x) here
    top = int(got[row, col, 0]) - 1 - row + padding
    left = int(got[row, col, 1]) - 1 - col + padding
    np.testing.assert_array_equal(
        host_recipes.pad_and_crop(image, top, left, padding), got)
    seen.add((top, left))
  assert len(seen) > 20   # many offsets, not one


def test_small_recipe_draws_every_offset_and_flips_half(small_tree):
  rng = np.random.default_rng(0)
  image = photo(rng, 40, 40)
  offsets, flips = set(), 0
  for i in range(400):
    got = host_recipes.small_train(image, np.random.default_rng(i), 40, 2)
    r = np.random.default_rng(i)
    top, left = r.integers(0, 5, size=2)
    crop = host_recipes.pad_and_crop(image, top, left, 2)
    flipped = r.random() < 0.5
    np.testing.assert_array_equal(got, crop[:, ::-1] if flipped else crop)
    offsets.add((int(top), int(left)))
    flips += flipped
  assert len(offsets) == 25 and 150 < flips < 250


@pytest.mark.parametrize("tree", ["small_tree", "large_tree"])
def test_eval_images_equal_tf_data_up_to_decoder_rounding(tree, request):
  """The same examples, labels and padding in the same order; pixels within
  the decoders' rounding (measured: mean 0.9-1.1 levels)."""
  root = request.getfixturevalue(tree)
  config = make_config(f"folder:{root}", image_size=32)
  grain_batches = list(open_grain(config).host_eval_batches())
  tf_batches = list(pipeline.eval_iterator(config, global_batch_size=12))
  assert len(grain_batches) == len(tf_batches) == 2
  for ours, theirs in zip(grain_batches, tf_batches):
    np.testing.assert_array_equal(ours["label"], theirs["label"])
    np.testing.assert_array_equal(ours["mask"], theirs["mask"])
    real = theirs["mask"] > 0
    levels = theirs["image"][real] * STD + MEAN
    diff = np.abs(ours["image"][real] - levels).reshape(real.sum(), -1)
    assert diff.mean(1).max() < 2.0, diff.mean(1)
    assert np.all(ours["image"][~real] == 0)


@pytest.mark.parametrize("tree", ["small_tree", "large_tree"])
def test_train_pixel_statistics_match_tf_data(tree, request):
  """Four epochs of each engine's augmentation: per-channel mean and
  standard deviation within 3 levels of 255, the padding's black share
  within 0.02 (measured: within 1.7 levels, 0.004)."""
  root = request.getfixturevalue(tree)
  config = make_config(f"folder:{root}", image_size=32, flip=True)
  inputs = open_grain(config)
  steps = 4 * inputs.train_order().steps_per_epoch
  ours = inputs.host_train_batches(0)
  ours = np.concatenate([grain_inputs.finish_batch(next(ours))["image"]
                         for _ in range(steps)]) * STD + MEAN
  theirs = pipeline.train_iterator(config, global_batch_size=12, seed=0)
  theirs = np.concatenate([next(theirs)["image"] for _ in range(steps)])
  theirs = theirs * STD + MEAN
  np.testing.assert_allclose(ours.mean((0, 1, 2)), theirs.mean((0, 1, 2)),
                             atol=3)
  np.testing.assert_allclose(ours.std((0, 1, 2)), theirs.std((0, 1, 2)),
                             atol=3)
  black = lambda x: np.mean(np.abs(x).sum(-1) < 1)
  assert abs(black(ours) - black(theirs)) < 0.02


@pytest.mark.parametrize("resize", ["host", "device"])
def test_device_finish_is_the_host_recipe(large_tree, resize):
  """The ImageNet recipe's lighting and flip, drawn on the host and applied
  in the jitted finish, give exactly ``host_recipes.imagenet_train``'s
  images (lighting included: the imagenet2012 recipe), with the windows
  resized on the host or on the device (``window_resize``)."""
  config = make_config(f"folder:{large_tree}", image_size=32, flip=True,
                       input_resize=resize)
  inputs = open_grain(config)
  assert inputs.resize == resize
  canvas = host_recipes.canvas_size(32) if resize == "device" else None
  inputs._train_recipe = functools.partial(  # pylint: disable=protected-access
      host_recipes.imagenet_train_parts, image_size=32, scale=(0.08, 1.0),
      flip=True, decoder="auto", with_lighting=True, canvas=canvas)
  order = inputs.train_order()
  batches = inputs.host_train_batches(0)
  finish = jax.jit(inputs.batch_fn())
  flips = shifted = 0
  for step in range(4):
    batch = next(batches)
    assert batch["image"].shape[1] == (canvas or 32)
    flips += int(batch["flip"].sum())
    shifted += int(np.any(batch["shift"] != 0, axis=1).sum())
    got = np.asarray(finish(batch)["image"])
    want = []
    for row in range(order.local_batch):
      index, number = order.locate(step * order.local_batch + row)
      encoded, _ = inputs._train[index]  # pylint: disable=protected-access
      want.append(host_recipes.imagenet_train(encoded, order.rng(number), 32))
    # One level is 0.017 after Normalize: 1e-5 means the same levels (XLA
    # may normalise with a reciprocal, a last-bit difference).
    np.testing.assert_allclose(got, host_recipes.normalize(np.stack(want)),
                               atol=1e-5, rtol=0, err_msg=str(step))
  assert 0 < flips < 48 and 0 < shifted   # both were exercised


def test_stream_resumes_and_worker_processes_change_nothing(large_tree):
  """From step 5 (past an epoch's end: 48 examples, 4 steps an epoch) the
  stream equals the uninterrupted one, with 0 or 2 worker processes."""
  inputs = open_grain(make_config(f"folder:{large_tree}", image_size=32))
  assert inputs.train_order().steps_per_epoch == 4
  whole = inputs.host_train_batches(0)
  whole = [next(whole) for _ in range(9)]
  for workers in (0, 2):
    resumed = inputs.host_train_batches(5, workers=workers)
    for step in range(5, 9):
      batch = next(resumed)
      for key in ("image", "label"):
        np.testing.assert_array_equal(batch[key], whole[step][key],
                                      err_msg=f"{workers} {step} {key}")
  assert not np.array_equal(whole[0]["image"], whole[4]["image"])


def test_two_hosts_read_the_rows_of_one(small_tree):
  config = make_config(f"folder:{small_tree}", image_size=32)
  one = open_grain(config).host_train_batches(3)
  hosts = [open_grain(config, i, 2).host_train_batches(3) for i in range(2)]
  for _ in range(3):
    whole, parts = next(one), [next(h) for h in hosts]
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([p[key] for p in parts]), whole[key])
  evals = [list(open_grain(config, i, 2, 6).host_eval_batches())
           for i in range(2)]
  labels = np.concatenate([b["label"][b["mask"] > 0] for h in evals
                           for b in h])
  np.testing.assert_array_equal(
      labels, folders.scan(str(small_tree)).splits["test"][1])


def test_every_example_once_an_epoch():
  order = grain_inputs.TrainOrder(num_examples=50, global_batch=8,
                                  local_batch=8, rows=0, seed=3)
  for epoch in range(3):
    first = epoch * order.steps_per_epoch * 8
    located = [order.locate(first + i) for i in range(48)]
    indices = [i for i, _ in located]
    assert len(set(indices)) == 48   # 2 of 50 left out, none twice
    assert [n for _, n in located] == list(range(first, first + 48))
  assert order.permutation(0).tolist() != order.permutation(1).tolist()


def test_engine_choice_and_errors(tmp_path, small_tree):
  folder = make_config(f"folder:{small_tree}", input_engine="auto")
  assert engines.resolve_engine(folder) == "grain"
  assert engines.resolve_engine(make_config("digits",
                                            input_engine="auto")) == "device"
  with pytest.raises(DataError, match="device engine"):
    engines.resolve_engine(make_config("digits"))
  # A tfds data set in the TFRecord format tfds writes by default.
  builder = digits_tfds.Ir2netDigits(data_dir=str(tmp_path / "tfrecord"))
  builder.download_and_prepare()
  config = make_config("tfds:ir2net_digits", data_dir=str(tmp_path /
                                                          "tfrecord"))
  with pytest.raises(DataError, match="file_format=array_record"):
    grain_inputs.dataset_info(config)
  config.data_dir = str(tmp_path / "nothing")
  with pytest.raises(DataError, match="not prepared"):
    grain_inputs.dataset_info(config)
  assert grain_inputs.resolve_resize(folder) == (
      "host" if jax.default_backend() == "cpu" else "device")
  with pytest.raises(DataError, match="input_resize='bogus'"):
    grain_inputs.resolve_resize(make_config("digits", input_resize="bogus"))
  with pytest.raises(DataError, match="no split 'valid'"):
    grain_inputs.dataset_info(make_config(f"folder:{small_tree}",
                                          eval_split="valid"))


def test_tfds_array_record_data_source(tmp_path):
  """A tfds builder prepared as ArrayRecord, read with tfds.data_source: the
  same examples and labels as the data themselves (8x8 grey digits, PNG
  encoded, the CIFAR recipe at their own size)."""
  data_dir = str(tmp_path / "ar")
  digits_tfds.Ir2netDigits(data_dir=data_dir).download_and_prepare(
      file_format="array_record")
  config = make_config("tfds:ir2net_digits", data_dir=data_dir, image_size=8,
                       eval_split="test")
  inputs = open_grain(config, eval_batch_size=40, num_classes=10)
  assert (inputs.info.num_train, inputs.info.num_eval) == (
      digits.NUM_TRAIN, digits.NUM_TEST)
  images, labels = [], []
  for batch in inputs.host_eval_batches():
    real = batch["mask"] > 0
    images.append(batch["image"][real])
    labels.append(batch["label"][real])
  images, labels = np.concatenate(images), np.concatenate(labels)
  want_images, want_labels = digits.load_split("test")
  assert np.all(images == images[..., :1])   # grey replicated
  key = lambda im, lb: sorted(zip(lb.tolist(), [i.tobytes() for i in im]))
  assert key(images[..., :1], labels) == key(want_images, want_labels)
  batch = next(inputs.host_train_batches(0))
  assert batch["image"].shape == (12, 8, 8, 3)
  assert batch["image"].dtype == np.uint8
  with pytest.raises(DataError, match=r"label \d, outside the model's 3"):
    for _ in open_grain(config).host_train_batches(0):
      pass   # a label the model cannot output stops the run


def test_closing_the_batches_stops_the_worker_processes(large_tree):
  """What the loop does when it ends, however it ends: closing the placed
  batches closes the host batches under them, even while something still
  holds those (a traceback kept by a notebook does), so no decoding
  process outlives the run."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data.shared import prefetch  # pylint: disable=g-import-not-at-top
  inputs = open_grain(make_config(f"folder:{large_tree}", image_size=32,
                                  input_workers=2))
  before = set(multiprocessing.active_children())
  host = inputs.host_train_batches(0)
  placed = prefetch.prefetch_to_device(
      host, 1, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  assert next(placed)["image"].shape == (12, 32, 32, 3)
  workers = set(multiprocessing.active_children()) - before
  assert len(workers) == 2
  placed.close()
  for worker in workers:
    worker.join(timeout=30)
  assert not workers & set(multiprocessing.active_children())
  del host
