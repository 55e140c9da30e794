"""The numpy + Pillow ImageNet recipes against tf.data's and torchvision's
rules: the same window gives the same crop (up to the decoders' rounding),
eval images match, reduced-size decoding changes pixels by rounding only."""

import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ir2net_jax.data import augment, pil_recipes, recipes
from ir2net_jax.tools.benchmark import decoders


@pytest.fixture(scope="module")
def jpegs():
  return decoders.imagenet_like_jpegs(12, seed=3)


def _levels(a, b):
  """Mean and max absolute difference, in grey levels."""
  d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return d.mean(), d.max()


def test_same_window_same_crop_as_tf_decode_and_crop(jpegs):
  for i, jpeg in enumerate(jpegs):
    h, w = tf.image.extract_jpeg_shape(jpeg).numpy()[:2]
    window = (h // 5, w // 7, h // 2 + i, w // 2)
    ours = pil_recipes.decode_window(jpeg, lambda *_: window, 224,
                                     reduced=False)
    crop = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    theirs = augment.to_pixel_levels(tf.image.resize(
        crop, [224, 224], method="bilinear", antialias=True)).numpy()
    mean, _ = _levels(ours, theirs)
    assert mean < 1.5, (i, mean)


def test_eval_matches_tf_data_eval(jpegs):
  for jpeg in jpegs:
    ours = pil_recipes.normalize(pil_recipes.imagenet_eval(jpeg, 224,
                                                           reduced=False))
    theirs = recipes.imagenet_eval(tf.constant(jpeg), 224).numpy()
    mean, _ = _levels(ours * 58.0, theirs * 58.0)   # ~ grey levels
    assert mean < 1.5, mean


def test_reduced_size_decoding_differs_by_rounding_only(jpegs):
  large = [j for j in jpegs if Image.open(io.BytesIO(j)).size[0] >= 1000]
  assert large, "the spread of sizes has large images"
  for jpeg in large:
    full = pil_recipes.imagenet_eval(jpeg, 224, reduced=False)
    reduced = pil_recipes.imagenet_eval(jpeg, 224, reduced=True)
    mean, _ = _levels(full, reduced)
    assert 0 < mean < 3.0, mean   # decoded smaller, resized alike


def test_window_sampler_is_torchvisions():
  rng = np.random.default_rng(0)
  windows = [pil_recipes.random_resized_crop_window(375, 500, rng)
             for _ in range(4000)]
  top, left, h, w = map(np.array, zip(*windows))
  assert np.all((top >= 0) & (left >= 0) & (top + h <= 375)
                & (left + w <= 500))
  area = h * w / (375 * 500)
  ratio = w / h
  assert area.min() >= 0.075 and area.max() <= 1.0
  assert np.all((ratio > 0.74) & (ratio < 1.35))
  # log-uniform ratio: log ratios centred on 0 (tf.data's is uniform)
  assert abs(np.mean(np.log(ratio))) < 0.01
  # a window that cannot fit falls back to the centre crop, ratio clamped
  assert pil_recipes.random_resized_crop_window(
      10, 1000, np.random.default_rng(0), scale=(0.99, 1.0)) == (
          0, 500 - 7, 10, 13)


def test_train_is_deterministic_per_draw_and_flips_only_when_asked(jpegs):
  make = lambda seed, **kw: pil_recipes.imagenet_train(
      jpegs[0], np.random.default_rng(seed), 64, **kw)
  np.testing.assert_array_equal(make(5), make(5))
  assert not np.array_equal(make(5), make(6))
  flips = [not np.array_equal(make(s), make(s, flip=False))
           for s in range(20)]
  assert 3 < sum(flips) < 17    # about half
  assert make(0).dtype == np.uint8 and make(0).shape == (64, 64, 3)


def test_lighting_truncates_like_the_reference():
  image = np.full((2, 2, 3), 100, np.uint8)
  rng = np.random.default_rng(0)
  alpha = np.random.default_rng(0).normal(0.0, 0.1, 3)
  offset = np.asarray(recipes.IMAGENET_PCA_EIGVEC) @ (
      alpha * np.asarray(recipes.IMAGENET_PCA_EIGVAL))
  want = np.clip(100 + offset, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(pil_recipes.lighting(image, rng)[0, 0], want)
  assert set(np.unique(want)) <= {99, 100}
  assert not math.isclose(float(np.abs(offset).max()), 0.0)
