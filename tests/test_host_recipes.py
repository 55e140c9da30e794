"""The numpy + Pillow ImageNet recipes against tf.data's and torchvision's
rules: the same window gives the same crop (up to the decoders' rounding),
eval images match, reduced-size decoding changes pixels by rounding only."""

import io

import jax
import numpy as np
import PIL
import pytest
import tensorflow as tf
from PIL import Image

from ir2net_jax.data.grain import host_recipes, pillow_resize, window_resize
from ir2net_jax.data.tf_data import augment, recipes
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


def _torchvision_eval(jpeg, size):
  """The reference's eval on PIL: ``Resize(round(S * 256 / 224))`` of the
  shorter side (the longer truncated), then ``CenterCrop(S)``."""
  image = Image.open(io.BytesIO(jpeg)).convert("RGB")
  w, h = image.size
  short = int(round(size * 256 / 224))
  new_h, new_w = ((short, int(short * w / h)) if h <= w
                  else (int(short * h / w), short))
  image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  return np.asarray(image.crop((left, top, left + size, top + size)))


def test_eval_is_the_references_resize_then_centre_crop(jpegs):
  """The eval recipe resizes the crop window with the pixels around it, as
  the reference resizes the whole image before cropping: equal but for the
  rounding of a few filter positions (measured: 99.9% of pixels equal)."""
  for jpeg in jpegs:
    ours = host_recipes.imagenet_eval(jpeg, 224, decoder="pil_full")
    d = np.abs(ours.astype(int) - _torchvision_eval(jpeg, 224))
    assert d.max() <= 1 and np.mean(d == 0) > 0.995, (d.max(), d.mean())


def test_resize_coefficients_are_pillows_fixed_point():
  # Halving: the triangle spans two input pixels a side, (1, 3, 3, 1) / 8 in
  # units of 2^-22; at the edge the missing pixel's weight is left out and
  # the rest renormalised (3, 3, 1) / 7, rounded; nothing past the extent.
  one = 1 << pillow_resize.PRECISION_BITS
  table = pillow_resize.resize_coefficients(0.0, 16.0, 16, 8, taps=5)
  assert table.dtype == np.int32 and table.shape == (8, 6)
  np.testing.assert_array_equal(table[3], [5, one // 8, 3 * one // 8,
                                           3 * one // 8, one // 8, 0])
  np.testing.assert_array_equal(
      table[0], [0, *np.floor(0.5 + np.array([3, 3, 1]) / 7 * one), 0, 0])
  assert np.all(table[:, 0] + np.count_nonzero(table[:, 1:], axis=1) <= 16)
  # The same size, whole pixels: the identity.
  np.testing.assert_array_equal(
      pillow_resize.resize_coefficients(2.0, 10.0, 12, 8, taps=3),
      np.c_[np.arange(2, 10), np.full(8, one), np.zeros((8, 2))])
  assert pillow_resize.resize_taps(336, 224) == 4
  with pytest.raises(ValueError, match="reads 6 pixels .* taps=5"):
    pillow_resize.resize_coefficients(0.0, 60.0, 60, 20, taps=5)


def _dense(table, in_size):
  """int32 (S, 1 + K) coefficients -> int64 (S, in_size) weights."""
  dense = np.zeros((len(table), in_size + table.shape[1]), np.int64)
  for tap in range(1, table.shape[1]):
    dense[np.arange(len(table)), table[:, 0] + tap - 1] = table[:, tap]
  assert not dense[:, in_size:].any()   # nothing past the image
  return dense[:, :in_size]


def _fixed_point_resize(pixels, box, size):
  """Pillow's resize from ``resize_coefficients`` and ``vertical_first``,
  in int64 numpy: the arithmetic the device's resize must reproduce."""
  left, top, right, bottom = box
  height, width = pixels.shape[:2]
  taps = pillow_resize.resize_taps(max(height, width), size)
  tables = [pillow_resize.resize_coefficients(top, bottom, height, size, taps),
            pillow_resize.resize_coefficients(left, right, width, size, taps)]
  dense = [_dense(t, n) for t, n in zip(tables, (height, width))]
  x = pixels.astype(np.int64)
  first = pillow_resize.vertical_first(height, width, size)
  if first:
    x, dense = x.transpose(1, 0, 2), dense[::-1]
  half = 1 << (pillow_resize.PRECISION_BITS - 1)
  x = np.clip((np.einsum("lk,jkc->jlc", dense[1], x) + half)
              >> pillow_resize.PRECISION_BITS, 0, 255)
  x = np.clip((np.einsum("ij,jlc->ilc", dense[0], x) + half)
              >> pillow_resize.PRECISION_BITS, 0, 255)
  return (x.transpose(1, 0, 2) if first else x).astype(np.uint8), first


def test_fixed_point_resize_is_pillows_to_the_pixel():
  """Random images, sizes and float boxes, shrinking and enlarging, either
  pass first: the coefficients and the pass order give exactly Pillow's
  pixels (Pillow 13 runs the vertical pass first where the height shrinks
  much more than the width; the order shows in the pixels)."""
  rng = np.random.default_rng(7)
  orders = set()
  for trial in range(60):
    height, width = (int(n) for n in rng.integers(12, 300, 2))
    pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
    if trial % 2:   # smooth images, where half-way sums are common
      pixels = np.asarray(Image.fromarray(pixels).resize(
          (width // 5 + 1, height // 5 + 1)).resize((width, height)))
    size = int(rng.choice([224, 64, 17]))
    left, top = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
    box = (left, top, rng.uniform(left + 0.5, width),
           rng.uniform(top + 0.5, height))
    if trial % 3 == 0:
      box = tuple(float(round(v)) for v in box)
      box = (box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1))
    ours, first = _fixed_point_resize(pixels, box, size)
    orders.add(first)
    np.testing.assert_array_equal(
        ours, host_recipes.resize_box(pixels, box, size), err_msg=str(box))
  if int(PIL.__version__.split(".")[0]) >= 13:
    assert orders == {True, False}


def test_windows_resized_on_the_device_are_pillows(jpegs):
  """``imagenet_train_parts(canvas=C)`` + ``resize_windows``: the same
  draws as the host recipe and exactly its pixels, either pass first. The
  canvas's padding is never read: it is filled with white here."""
  firsts = set()
  for size in (224, 64):
    canvas = host_recipes.canvas_size(size)
    hosts, canvases, tables, orders = [], [], [], []
    for i, jpeg in enumerate(jpegs):
      for seed in (i, 100 + i):
        on_host = host_recipes.imagenet_train_parts(
            jpeg, np.random.default_rng(seed), size)
        parts = host_recipes.imagenet_train_parts(
            jpeg, np.random.default_rng(seed), size, canvas=canvas)
        assert parts["image"].shape == (canvas, canvas, 3)
        np.testing.assert_array_equal(parts["shift"], on_host["shift"])
        assert parts["flip"] == on_host["flip"]
        # The last pixel each axis's coefficients read: the rest is padding.
        rows, columns = (int(np.max(t[:, 0] + np.count_nonzero(
            t[:, 1:], axis=1))) for t in parts["resize"])
        image = parts["image"].copy()
        image[rows:], image[:, columns:] = 255, 255
        hosts.append(on_host["image"])
        canvases.append(image)
        tables.append(parts["resize"])
        orders.append(parts["vertical_first"])
    got = np.asarray(jax.jit(window_resize.resize_windows)(
        np.stack(canvases), np.stack(tables), np.stack(orders)))
    np.testing.assert_array_equal(got, np.stack(hosts), err_msg=str(size))
    firsts |= set(map(bool, orders))
    identity = [bool(np.all(t[:, :, 1] == 1 << pillow_resize.PRECISION_BITS))
                for t in tables]
    assert not all(identity), size   # most windows go to the device
  assert any(identity)   # at S = 64 large JPEGs' windows do not fit
  if int(PIL.__version__.split(".")[0]) >= 13:
    assert firsts == {True, False}
