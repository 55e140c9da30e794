"""Tests of any image classification data: ``tfds:NAME`` and ``folder:PATH``.

``tfds:`` data sets are small builders written here, prepared for real into a
temporary data_dir (the code path a prepared catalogue builder takes), plus
the catalogue's ``mnist`` under ``tfds.testing.mock_data``. Folders are PNG
and JPEG trees written with PIL. No network.
"""

import glob
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from ir2net_jax.train import config_checks, loop
from ir2net_jax import data
from ir2net_jax.configs import default
from ir2net_jax.data.shared import custom, folders, sources
from ir2net_jax.data.tf_data import recipes
import train_utils

# Stored pixel value of every pixel of an example of class c (grey levels),
# so that a batch tells which class each image came from.
_LEVEL = {0: 30, 1: 120, 2: 210}


class Ir2netTestGrey(tfds.core.GeneratorBasedBuilder):
  """MNIST-like: 28x28x1 grey images, 3 classes, 24 train / 9 test."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=3)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(24),
            "test": self._generate_examples(9)}

  def _generate_examples(self, n):
    for i in range(n):
      label = i % 3
      yield i, {"image": np.full((28, 28, 1), _LEVEL[label], np.uint8),
                "label": label}


class Ir2netTestPhotos(tfds.core.GeneratorBasedBuilder):
  """Large RGB JPEGs of varying size under other feature names, 2 classes,
  8 train / 4 validation (no test split)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "photo": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "kind": tfds.features.ClassLabel(names=["day", "night"]),
            "id": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(8),
            "validation": self._generate_examples(4)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      shape = (90 + 10 * i, 120 - 5 * i, 3)
      yield i, {"photo": rng.integers(0, 256, shape, np.uint8),
                "kind": i % 2, "id": str(i)}


class Ir2netTestCaptions(tfds.core.GeneratorBasedBuilder):
  """Not image classification: text and a label."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    yield 0, {"text": "a", "label": 0}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A data_dir with the three builders above prepared."""
  path = str(tmp_path_factory.mktemp("tfds_custom"))
  for builder in (Ir2netTestGrey, Ir2netTestPhotos, Ir2netTestCaptions):
    builder(data_dir=path).download_and_prepare()
  return path


@pytest.fixture(autouse=True)
def fresh_specs():
  """Specs are cached per process; each test builds its own."""
  custom.custom_spec.cache_clear()
  folders.scan.cache_clear()
  yield
  custom.custom_spec.cache_clear()
  folders.scan.cache_clear()


def make_config(dataset, **overrides) -> ml_collections.ConfigDict:
  fields = dict(dataset=dataset, data_dir=None, manual_dir=None,
                image_size=32, train_split="train", eval_split="",
                shuffle_buffer=None, dtype="float32", augment="auto")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def write_tree(root, tree, ext="png", mode="L"):
  """Writes ``tree[split][class] = [(height, width), ...]`` as images whose
  pixels are all ``_LEVEL[class index in sorted order]``."""
  classes = sorted({c for split in tree.values() for c in split})
  for split, by_class in tree.items():
    for name, sizes in by_class.items():
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      level = _LEVEL[classes.index(name)]
      for i, (h, w) in enumerate(sizes):
        pixels = np.full((h, w) if mode == "L" else (h, w, 3), level, np.uint8)
        Image.fromarray(pixels, mode).save(
            os.path.join(root, split, name, f"{i}.{ext}"))
  return str(root)


def stored_levels(images):
  """Undoes the ImageNet normalisation: (N, S, S, 3) -> 0..255 levels."""
  mean = np.asarray(recipes.IMAGENET_MEAN, np.float32)
  std = np.asarray(recipes.IMAGENET_STD, np.float32)
  return (images * std + mean) * 255.0


def all_eval(config, global_batch_size, **kwargs):
  batches = list(data.eval_iterator(config, global_batch_size=global_batch_size,
                                    **kwargs))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def check_train_batch(config, batch_size, size):
  spec = sources.read_settings(config).spec
  batch = next(data.train_iterator(config, global_batch_size=batch_size,
                                   seed=0))
  assert batch["image"].shape == (batch_size, size, size, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  low, high = spec.value_range
  assert low - 1e-5 <= batch["image"].min() < batch["image"].max() <= high + 1e-5
  return batch


# ------------------------------------------------------------ tfds:NAME ---

def test_tfds_grey_small_images_take_the_cifar_recipe(tfds_dir):
  config = make_config("tfds:ir2net_test_grey", data_dir=tfds_dir)
  info = data.dataset_info(config)
  assert (info.num_train, info.num_eval, info.num_classes,
          info.image_size) == (24, 9, 3, 32)
  spec = sources.read_settings(config).spec
  assert (spec.recipe, spec.cache, spec.eval_split) == ("cifar", True, "test")
  check_train_batch(config, 8, 32)
  # Eval: 28x28x1 resized to 32x32, grey replicated to RGB, every example
  # once (9 over batches of 4, padding masked), its level its label's.
  got = all_eval(config, 4)
  assert got["mask"].sum() == 9 and got["image"].shape == (12, 32, 32, 3)
  levels = stored_levels(got["image"][got["mask"] == 1])
  np.testing.assert_allclose(levels, levels[..., :1].repeat(3, -1), atol=1e-3)
  want = np.array([_LEVEL[c] for c in got["label"][got["mask"] == 1]])
  np.testing.assert_allclose(levels, np.broadcast_to(
      want[:, None, None, None], levels.shape), atol=1e-3)
  assert sorted(got["label"][got["mask"] == 1]) == sorted(np.arange(9) % 3)


def test_tfds_forced_imagenet_recipe(tfds_dir):
  config = make_config("tfds:ir2net_test_grey:1.0.0", data_dir=tfds_dir,
                       augment="imagenet", image_size=24)
  assert sources.read_settings(config).spec.recipe == "imagenet"
  check_train_batch(config, 4, 24)


def test_tfds_large_varying_images_take_the_imagenet_recipe(tfds_dir):
  config = make_config("tfds:ir2net_test_photos", data_dir=tfds_dir,
                       image_size=64)
  info = data.dataset_info(config)
  assert (info.num_train, info.num_eval, info.num_classes) == (8, 4, 2)
  assert info.eval_split == "validation"  # there is no test split
  spec = sources.read_settings(config).spec
  assert (spec.recipe, spec.image_key, spec.label_key) == (
      "imagenet", "photo", "kind")
  check_train_batch(config, 4, 64)
  got = all_eval(config, 4)
  assert got["image"].shape == (4, 64, 64, 3) and got["mask"].sum() == 4
  assert sorted(got["label"]) == [0, 0, 1, 1]


def test_tfds_uncached_hosts_read_disjoint_slices(tfds_dir, monkeypatch):
  monkeypatch.setattr(custom, "CACHE_MAX_BYTES", 0)
  config = make_config("tfds:ir2net_test_grey", data_dir=tfds_dir)
  assert not sources.read_settings(config).spec.cache
  hosts = [all_eval(config, 4, process_index=i, process_count=2)
           for i in range(2)]
  assert [h["mask"].sum() for h in hosts] == [5, 4]
  labels = np.concatenate([h["label"][h["mask"] == 1] for h in hosts])
  assert sorted(labels) == sorted(np.arange(9) % 3)
  for i in range(2):
    batch = next(data.train_iterator(config, global_batch_size=8, seed=0,
                                     process_index=i, process_count=2))
    assert batch["image"].shape == (4, 32, 32, 3)


def test_tfds_mock_mnist(tmp_path):
  """The catalogue's mnist under mock_data: 28x28x1, sizes not recorded."""
  builder = tfds.builder("mnist", data_dir=str(tmp_path))
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)
  config = make_config("tfds:mnist", data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=10, data_dir=str(tmp_path)):
    info = data.dataset_info(config)
    assert (info.num_train, info.num_eval, info.num_classes) == (10, 10, 10)
    assert sources.read_settings(config).spec.recipe == "cifar"
    check_train_batch(config, 4, 32)
    assert all_eval(config, 4)["mask"].sum() == 10


def test_tfds_errors(tfds_dir, tmp_path):
  cases = [
      (make_config("tfds:ir2net_no_such_builder"),
       r"unknown tfds builder.*ir2net_no_such_builder.*tfds:mnist"),
      (make_config("tfds:ir2net_test_grey:9.9.9", data_dir=tfds_dir),
       r"unknown tfds builder or version.*9\.9\.9"),
      (make_config("tfds:mnist", data_dir=str(tmp_path)),
       r"not prepared.*tfds build mnist --data_dir=DIR"),
      (make_config("tfds:ir2net_test_captions", data_dir=tfds_dir),
       r"not image classification.*'text': Text"),
      (make_config("tfds:ir2net_test_photos", data_dir=tfds_dir,
                   augment="cifar"),
       r"augment='cifar' needs images of one size.*\(None, None, 3\)"
       r".*--config.augment=imagenet"),
      (make_config("tfds:ir2net_test_photos", data_dir=tfds_dir,
                   eval_split="test"),
       r"split 'test'.*\['train', 'validation'\].*--config.eval_split"),
      (make_config("digits", augment="cifar"), r"reference recipe"),
  ]
  for config, message in cases:
    with pytest.raises(data.DataError, match=message):
      data.dataset_info(config)


# ----------------------------------------------------------- folder:PATH ---

def test_folder_small_images(tmp_path):
  root = write_tree(tmp_path / "pets", {
      "train": {"cat": [(12, 12)] * 4, "ant": [(12, 12)] * 4,
                "bee": [(12, 12)] * 4},
      "val": {"cat": [(12, 12)] * 2, "ant": [(12, 12)], "bee": [(12, 12)]}})
  # An RGB image among the grey ones, and a file that is not an image.
  Image.fromarray(np.full((12, 12, 3), _LEVEL[1], np.uint8)).save(
      os.path.join(root, "val", "bee", "rgb.png"))
  (tmp_path / "pets" / "train" / "cat" / "notes.txt").write_text("skip me")
  config = make_config(f"folder:{root}", image_size=16)
  info = data.dataset_info(config)
  assert (info.num_train, info.num_eval, info.num_classes) == (12, 5, 3)
  spec = sources.read_settings(config).spec
  assert (spec.recipe, spec.eval_split, spec.cache) == ("cifar", "val", True)
  check_train_batch(config, 6, 16)
  got = all_eval(config, 8)
  assert got["mask"].sum() == 5
  levels = stored_levels(got["image"][got["mask"] == 1])
  labels = got["label"][got["mask"] == 1]
  # Classes in sorted order: ant 0, bee 1, cat 2.
  assert sorted(labels) == [0, 1, 1, 2, 2]
  want = np.array([_LEVEL[c] for c in labels], np.float32)
  np.testing.assert_allclose(levels, np.broadcast_to(
      want[:, None, None, None], levels.shape), atol=1e-3)


def test_folder_mixed_or_large_images_take_the_imagenet_recipe(tmp_path):
  root = write_tree(tmp_path / "photos", {
      "train": {"a": [(80, 100), (120, 90)], "b": [(100, 100), (70, 130)]},
      "test": {"a": [(90, 90)], "b": [(60, 140)]}}, ext="jpg", mode="RGB")
  config = make_config(f"folder:{root}", image_size=32)
  assert sources.read_settings(config).spec.recipe == "imagenet"
  info = data.dataset_info(config)
  assert (info.num_train, info.num_eval, info.num_classes) == (4, 2, 2)
  check_train_batch(config, 4, 32)
  assert all_eval(config, 2)["mask"].sum() == 2
  # Small images of two sizes: 'auto' takes the ImageNet recipe too.
  small = write_tree(tmp_path / "small", {
      "train": {"a": [(20, 20)], "b": [(24, 24)]}})
  spec = sources.read_settings(make_config(f"folder:{small}",
                                           eval_split="train")).spec
  assert spec.recipe == "imagenet"


def test_folder_uncached_hosts_read_disjoint_slices(tmp_path, monkeypatch):
  monkeypatch.setattr(custom, "CACHE_MAX_BYTES", 0)
  root = write_tree(tmp_path / "f", {
      "train": {"a": [(8, 8)] * 4, "b": [(8, 8)] * 4},
      "test": {"a": [(8, 8)] * 3, "b": [(8, 8)] * 2}})
  config = make_config(f"folder:{root}")
  hosts = [all_eval(config, 2, process_index=i, process_count=2)
           for i in range(2)]
  assert [h["mask"].sum() for h in hosts] == [3, 2]
  labels = np.concatenate([h["label"][h["mask"] == 1] for h in hosts])
  assert sorted(labels) == [0, 0, 0, 1, 1]


def test_folder_errors(tmp_path):
  empty = tmp_path / "empty"
  (empty / "train" / "cat").mkdir(parents=True)
  train_only = write_tree(tmp_path / "train_only",
                          {"train": {"a": [(8, 8)], "b": [(8, 8)]}})
  with_val = write_tree(tmp_path / "with_val", {
      "train": {"a": [(8, 8)], "b": [(8, 8)]}, "val": {"a": [(8, 8)]}})
  mixed = write_tree(tmp_path / "mixed", {
      "train": {"a": [(8, 8)], "b": [(10, 12)]}, "test": {"a": [(8, 8)]}})
  broken = write_tree(tmp_path / "broken", {
      "train": {"a": [(8, 8)]}, "test": {"a": [(8, 8)]}})
  (tmp_path / "broken" / "train" / "a" / "bad.png").write_bytes(b"not a png")
  cases = [
      (make_config(f"folder:{tmp_path / 'nowhere'}"),
       r"no such directory.*PATH/train/<class>/\*\.jpg"),
      (make_config(f"folder:{empty}"), r"holds no images.*PATH/train/<class>"),
      (make_config(f"folder:{train_only}"),
       r"no 'test', 'validation' or 'val' split.*--config.eval_split"),
      (make_config(f"folder:{with_val}", eval_split="test"),
       r"no split 'test'.*\['train', 'val'\].*--config.eval_split"),
      (make_config(f"folder:{with_val}", train_split="train[:50%]"),
       r"no split 'train\[:50%\]'.*whole splits only"),
      (make_config(f"folder:{mixed}", augment="cifar"),
       r"augment='cifar' needs images of one size.*train/a/0\.png is 8x8 and "
       r"train/b/0\.png is 10x12"),
      (make_config(f"folder:{broken}"), r"bad\.png: not a JPEG, PNG"),
  ]
  for config, message in cases:
    custom.custom_spec.cache_clear()
    with pytest.raises(data.DataError, match=message):
      data.dataset_info(config)


def test_config_checks_accept_the_prefixes():
  config = default.get_config()
  for name in ("digits", "tfds:mnist", "tfds:oxford_flowers102:2.1.1",
               "folder:/data/pets"):
    config.dataset = name
    config_checks.validate_config(config)
  for name in ("", "tfds:", "folder:", "hub:mnist"):
    config.dataset = name
    with pytest.raises(config_checks.ConfigError, match="'tfds:NAME'"):
      config_checks.validate_config(config)
  config.dataset = "digits"
  config.augment = "random"
  with pytest.raises(config_checks.ConfigError, match="augment"):
    config_checks.validate_config(config)


@pytest.mark.slow
def test_train_and_evaluate_on_a_folder(tmp_path):
  """End to end: trains the smoke recipe (its network light,
  ``train_utils.LIGHT``) on a folder, evaluates every image."""
  root = write_tree(tmp_path / "shapes", {
      "train": {"a": [(16, 16)] * 6, "b": [(16, 16)] * 6, "c": [(16, 16)] * 6},
      "val": {"a": [(16, 16)] * 3, "b": [(16, 16)] * 2, "c": [(16, 16)] * 2}})
  config = train_utils.light_digits_config(
      None, dataset=f"folder:{root}", image_size=32, eval_split="",
      num_train_steps=1, num_epochs=1, checkpoint_every_steps=1)
  workdir = str(tmp_path / "work")
  summary = loop.train_and_evaluate(config, workdir)
  assert summary["dataset"] == f"folder:{root}" and summary["steps"] == 1
  counts = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == "eval_count":
          counts[event.step] = float(tf.make_ndarray(v.tensor))
  assert counts == {1: 7.0}  # the 7 val images, each once
  assert 0.0 <= summary["final_eval_top1"] <= 1.0
