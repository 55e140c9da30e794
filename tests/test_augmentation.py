"""The train recipes' flip, crop padding and crop scale as config fields.

Each field changes what it names in every recipe and nothing else (the crops
stay where they were when the flip is turned off); the digits recipe does
not flip, whatever data set it trains on; a crop field that the data set's
recipe does not use is refused before anything runs.
"""

import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ir2net_jax import data
from ir2net_jax.configs import default as default_config
from ir2net_jax.configs import digits as digits_config
from ir2net_jax.data.shared import custom, sources
from ir2net_jax.data.tf_data import recipes
from ir2net_jax.train import config_checks, resume

NOFLIP = recipes.Augmentation(flip=False)
FLIP = recipes.Augmentation(flip=True)
SEEDS = [tf.constant([3, s], tf.int64) for s in range(16)]


def _asymmetric(height, width, channels, seed=0):
  """uint8 pixels whose left-right mirror differs from them."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def _recipes():
  """(name, recipe(seed, augmentation) -> image)."""
  digits = tf.constant(_asymmetric(8, 8, 1))
  cifar = tf.constant(_asymmetric(32, 32, 3))
  png = tf.io.encode_png(_asymmetric(16, 16, 3))
  jpeg = tf.io.encode_jpeg(_asymmetric(48, 64, 3))
  return [
      ("digits", lambda s, a: recipes.digits_train(digits, s, 32, a)),
      ("cifar10", lambda s, a: recipes.cifar10_train(cifar, s, 32, a)),
      ("imagenet2012", lambda s, a: recipes.imagenet_train(jpeg, s, 24, a)),
      ("small", lambda s, a: recipes.small_train(png, s, 16, a,
                                                 stored_size=(16, 16))),
      ("large", lambda s, a: recipes.large_train(jpeg, s, 24, a)),
  ]


@pytest.mark.parametrize("name,recipe", _recipes(),
                         ids=[r[0] for r in _recipes()])
def test_flip_mirrors_the_same_crop_or_nothing(name, recipe):
  mirrored = 0
  for seed in SEEDS:
    plain = recipe(seed, NOFLIP).numpy()
    flipped = recipe(seed, FLIP).numpy()
    assert not np.array_equal(plain, plain[:, ::-1]), name
    if np.array_equal(flipped, plain[:, ::-1]):
      mirrored += 1
    else:
      np.testing.assert_array_equal(flipped, plain, err_msg=name)
  assert 0 < mirrored < len(SEEDS), name


def test_reference_recipes_are_the_defaults():
  """The recipes' own defaults: digits do not flip, the others do."""
  image = tf.constant(_asymmetric(8, 8, 1))
  for seed in SEEDS[:4]:
    np.testing.assert_array_equal(
        recipes.digits_train(image, seed, 32),
        recipes.digits_train(image, seed, 32, NOFLIP))
  cifar = tf.constant(_asymmetric(32, 32, 3))
  for seed in SEEDS[:4]:
    np.testing.assert_array_equal(
        recipes.cifar10_train(cifar, seed, 32),
        recipes.cifar10_train(cifar, seed, 32, FLIP))


def test_zero_padding_is_no_crop():
  no_crop = recipes.Augmentation(flip=False, crop_padding=0)
  digits = tf.constant(_asymmetric(8, 8, 1))
  cifar = tf.constant(_asymmetric(32, 32, 3))
  png = tf.io.encode_png(_asymmetric(16, 16, 3))
  for seed in SEEDS[:4]:
    np.testing.assert_array_equal(recipes.digits_train(digits, seed, 32,
                                                       no_crop),
                                  recipes.digits_eval(digits, 32))
    np.testing.assert_array_equal(recipes.cifar10_train(cifar, seed, 32,
                                                        no_crop),
                                  recipes.cifar10_eval(cifar, 32))
    np.testing.assert_array_equal(
        recipes.small_train(png, seed, 16, no_crop, stored_size=(16, 16)),
        recipes.small_eval(png, 16, stored_size=(16, 16)))
  # A wider padding moves the crops further: some pixels come from it.
  wide = recipes.Augmentation(flip=False, crop_padding=12)
  zeros = [np.mean(recipes.digits_train(digits, s, 32, wide).numpy() == -1.0)
           for s in SEEDS]
  assert max(zeros) > 0.2


def test_crop_scale_one_takes_the_whole_image():
  jpeg = tf.io.encode_jpeg(_asymmetric(40, 40, 3))
  whole = recipes.Augmentation(flip=False, crop_scale=(1.0, 1.0))
  outs = [recipes.large_train(jpeg, s, 24, whole).numpy() for s in SEEDS[:6]]
  assert all(np.array_equal(o, outs[0]) for o in outs)
  default = [recipes.large_train(jpeg, s, 24, NOFLIP).numpy()
             for s in SEEDS[:6]]
  assert not all(np.array_equal(o, default[0]) for o in default)


def _folder(root):
  """A class-per-folder tree of 12x12 images, dark left and bright right."""
  pixels = np.zeros((12, 12), np.uint8)
  pixels[:, 6:] = 250
  for split, count in (("train", 8), ("val", 2)):
    for name in ("a", "b"):
      os.makedirs(os.path.join(root, split, name))
      for i in range(count):
        Image.fromarray(pixels, "L").save(
            os.path.join(root, split, name, f"{i}.png"))
  return root


def _train_images(config, steps=3):
  it = data.train_iterator(config, global_batch_size=8, seed=0)
  return np.concatenate([next(it)["image"] for _ in range(steps)])


def test_digits_recipe_on_a_folder_does_not_flip(tmp_path):
  root = _folder(str(tmp_path / "glyphs"))
  custom.custom_spec.cache_clear()
  for make, flips in ((digits_config.get_config, False),
                      (default_config.get_config, True)):
    config = make()
    config.dataset, config.image_size = f"folder:{root}", 12
    config.crop_padding = 0
    config_checks.validate_config(config)
    assert sources.read_settings(config).augmentation.flip is flips
    images = _train_images(config)
    mirrored = images[:, :, :6].mean(axis=(1, 2, 3)) > images[
        :, :, 6:].mean(axis=(1, 2, 3))
    assert mirrored.any() == flips and not mirrored.all(), make


def test_crop_fields_the_recipe_does_not_use_are_refused(tmp_path):
  config = digits_config.get_config()
  config.crop_scale = (0.35, 1.0)
  with pytest.raises(data.DataError, match="crop_scale applies to the "
                     "RandomResizedCrop recipes.*set crop_padding instead"):
    sources.read_settings(config)
  config = default_config.get_config()
  config.dataset, config.image_size = "imagenet2012", 224
  config.crop_padding = 2
  with pytest.raises(data.DataError, match="crop_padding applies.*"
                     "set crop_scale instead"):
    sources.read_settings(config)
  config.crop_padding = None
  config.crop_scale = (0.35, 1.0)
  assert sources.read_settings(config).augmentation.crop_scale == (0.35, 1.0)


@pytest.mark.parametrize("field,value", [
    ("flip", "yes"), ("crop_padding", -1), ("crop_scale", (0.5, 0.2)),
    ("crop_scale", (0.0, 1.0)), ("crop_scale", (0.5,))])
def test_config_checks_refuse_bad_values(field, value):
  config = digits_config.get_config()
  with config.ignore_type():
    config[field] = value
  with pytest.raises(config_checks.ConfigError, match=field):
    config_checks.validate_config(config)


def test_command_line_overrides_parse(monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv)
  recipe = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs", "imagenet.py")
  argv = ["prog", f"--config={recipe}", "--config.crop_scale=(0.35, 1.0)",
          "--config.flip=False"]
  monkeypatch.setattr("sys.argv", argv)  # config_flags reads overrides there
  fv(argv)
  assert tuple(fv.config.crop_scale) == (0.35, 1.0)
  assert fv.config.flip is False
  assert isinstance(fv.config, ml_collections.ConfigDict)


def test_registered_data_sets_flip_as_config_checks_says():
  for name, spec in sources.DATASETS.items():
    assert spec.flip == (name not in resume.NO_FLIP_DATASETS), name


def _recorded_before_the_fields(workdir, config):
  """``config.json`` as a run from before flip and the crop fields wrote it."""
  resume.record_config(str(workdir), config)
  path = workdir / "config.json"
  recorded = json.loads(path.read_text())
  for field in ("flip", "crop_padding", "crop_scale"):
    del recorded[field]
  path.write_text(json.dumps(recorded))


def test_resume_compares_what_the_flip_does(tmp_path, caplog):
  """An older digits run (which never flipped) resumes with the digits
  config's flip=False; an older run of the digits config on a folder (which
  flipped) does not: that would change its results."""
  old_digits, old_folder = tmp_path / "digits", tmp_path / "folder"
  old_digits.mkdir()
  old_folder.mkdir()
  config = digits_config.get_config("smoke")
  before = config.copy_and_resolve_references()
  before.flip = None
  _recorded_before_the_fields(old_digits, before)
  with caplog.at_level("WARNING"):
    resume.check_resume(str(old_digits), config)
  assert not [r for r in caplog.records if r.levelname == "WARNING"]
  before.dataset = config.dataset = "folder:/data/glyphs"
  _recorded_before_the_fields(old_folder, before)
  with pytest.raises(config_checks.ConfigError,
                     match=r"flip: True \(not recorded.*--config.flip=True\) "
                           r"-> False"):
    resume.check_resume(str(old_folder), config)
  config.flip = True
  resume.check_resume(str(old_folder), config)
