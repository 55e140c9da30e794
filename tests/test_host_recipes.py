"""The numpy + Pillow ImageNet recipes against tf.data's and torchvision's
rules: the same window gives the same crop (up to the decoders' rounding),
eval images match, reduced-size decoding changes pixels by rounding only."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ir2net_jax.data import augment, host_recipes, recipes
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
    ours = host_recipes.decode_window(jpeg, lambda *_: window, 224,
                                     decoder="pil_full")
    crop = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    theirs = augment.to_pixel_levels(tf.image.resize(
        crop, [224, 224], method="bilinear", antialias=True)).numpy()
    mean, _ = _levels(ours, theirs)
    assert mean < 1.5, (i, mean)


def test_eval_matches_tf_data_eval(jpegs):
  for jpeg in jpegs:
    ours = host_recipes.normalize(host_recipes.imagenet_eval(jpeg, 224,
                                                           decoder="pil_full"))
    theirs = recipes.imagenet_eval(tf.constant(jpeg), 224).numpy()
    mean, _ = _levels(ours * 58.0, theirs * 58.0)   # ~ grey levels
    assert mean < 1.5, mean


@pytest.mark.parametrize("decoder", ["pil", "simplejpeg"])
def test_reduced_size_decoding_differs_by_rounding_only(jpegs, decoder):
  if decoder == "simplejpeg":
    pytest.importorskip("simplejpeg")
  large = [j for j in jpegs if Image.open(io.BytesIO(j)).size[0] >= 1000]
  assert large, "the spread of sizes has large images"
  for jpeg in jpegs:
    full = host_recipes.imagenet_eval(jpeg, 224, decoder="pil_full")
    reduced = host_recipes.imagenet_eval(jpeg, 224, decoder=decoder)
    mean, _ = _levels(full, reduced)
    assert mean < 4.0, mean   # decoded smaller, resized alike
    window = lambda h, w: (h // 3, w // 4, h // 2, w // 2)
    mean, _ = _levels(
        host_recipes.decode_window(jpeg, window, 96, decoder="pil_full"),
        host_recipes.decode_window(jpeg, window, 96, decoder=decoder))
    assert mean < 4.0, mean


def test_window_sampler_is_torchvisions():
  rng = np.random.default_rng(0)
  windows = [host_recipes.random_resized_crop_window(375, 500, rng)
             for _ in range(4000)]
  top, left, h, w = map(np.array, zip(*windows))
  assert np.all((top >= 0) & (left >= 0) & (top + h <= 375)
                & (left + w <= 500))
  area = h * w / (375 * 500)
  ratio = w / h
  assert area.min() >= 0.075 and area.max() <= 1.0
  assert np.all((ratio > 0.74) & (ratio < 1.35))
  # Small windows always fit at the first try: the ratio is log-uniform
  # (torchvision's; tf.data's is uniform), the area uniform.
  small = [host_recipes.random_resized_crop_window(1000, 1000, rng,
                                                  scale=(0.08, 0.2))
           for _ in range(4000)]
  _, _, h, w = map(np.array, zip(*small))
  log_ratio = np.log(w / h) / np.log(4 / 3)   # uniform on [-1, 1]
  assert abs(np.mean(log_ratio)) < 0.03
  assert abs(np.mean(np.abs(log_ratio)) - 0.5) < 0.03
  assert abs(np.mean(h * w / 1e6) - 0.14) < 0.005
  # a window that cannot fit falls back to the centre crop, ratio clamped
  assert host_recipes.random_resized_crop_window(
      10, 1000, np.random.default_rng(0), scale=(0.99, 1.0)) == (
          0, 500 - 7, 10, 13)


def test_train_is_deterministic_per_draw_and_flips_only_when_asked(jpegs):
  make = lambda seed, **kw: host_recipes.imagenet_train(
      jpegs[0], np.random.default_rng(seed), 64, **kw)
  np.testing.assert_array_equal(make(5), make(5))
  assert not np.array_equal(make(5), make(6))
  flips = [not np.array_equal(make(s), make(s, flip=False))
           for s in range(20)]
  assert 3 < sum(flips) < 17    # about half
  assert make(0).dtype == np.uint8 and make(0).shape == (64, 64, 3)


def test_lighting_truncates_like_the_reference():
  image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)
  image[0, 0] = 0
  image[0, 1] = 255
  dropped = 0
  for seed in range(20):
    alpha = np.random.default_rng(seed).normal(0.0, 0.1, 3)
    offset = np.asarray(recipes.IMAGENET_PCA_EIGVEC) @ (
        alpha * np.asarray(recipes.IMAGENET_PCA_EIGVAL))
    want = np.clip(image + offset.astype(np.float32), 0, 255).astype(np.uint8)
    got = host_recipes.lighting(image, np.random.default_rng(seed))
    np.testing.assert_array_equal(got, want)
    dropped += int(np.any(got != image))
  assert 0 < dropped < 20
