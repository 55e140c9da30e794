"""The ImageNet recipes in numpy and Pillow, for host pipelines without
TensorFlow.

What the reference (torchvision on PIL images) does, image by image:

* train: ``RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3))`` with
  torchvision's window sampler (:func:`random_resized_crop_window`: area
  uniform in ``scale``, aspect ratio log-uniform in ``ratio``, 10 tries,
  then a centre crop with the ratio clamped), bilinear resize, ReActNet's
  ``Lighting(0.1)`` on the uint8 image (offset added, clipped, truncated),
  ``RandomHorizontalFlip``;
* eval: ``Resize(round(S * 256 / 224))`` of the shorter side (the longer
  side truncated, as torchvision does), ``CenterCrop(S)``;
* both end with ``ToTensor`` + ``Normalize`` (:func:`normalize`), which a
  loop may leave to the device: the recipes return uint8 (S, S, 3).

Decoding at reduced size. A JPEG can be decoded at 1/2, 1/4 or 1/8 of its
size for a fraction of the work (libjpeg's DCT scaling, Pillow's
``Image.draft``). Where the crop window is at least twice the output size
each way, :func:`decode_window` decodes at the smallest scale that still
leaves the window at least ``S`` pixels a side, so the resize only ever
shrinks, as it does at full size. Pixels then differ from a full-size decode
by the decoder's rounding, not by the recipe.

Random choices come from a ``numpy.random.Generator`` that the caller seeds
per example (e.g. from ``(seed, example index)``), so a pipeline that seeds
them so is deterministic whatever its worker count.
"""

import io
import math
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from ir2net_jax.data import constants

__all__ = ["random_resized_crop_window", "decode_window", "lighting",
           "imagenet_train", "imagenet_eval", "normalize", "eval_window"]

Window = Tuple[int, int, int, int]   # top, left, height, width


def random_resized_crop_window(
    height: int, width: int, rng: np.random.Generator,
    scale: Tuple[float, float] = constants.CROP_SCALE,
    ratio: Tuple[float, float] = constants.CROP_RATIO,
    attempts: int = 10) -> Window:
  """torchvision's ``RandomResizedCrop.get_params``, drawing from ``rng``.

  Returns:
    ``(top, left, crop_height, crop_width)`` inside the image.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height   # fallback: centre crop, ratio clamped
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def eval_window(height: int, width: int, image_size: int) -> Tuple[Window,
                                                                    Tuple[int, int]]:
  """``Resize(round(S * 256 / 224))`` + ``CenterCrop(S)`` as one window.

  Returns:
    ``(window, resized)``: the window of the original image that the centre
    crop keeps, and the (height, width) the whole image is resized to.
  """
  resize = int(round(image_size * 256 / 224))
  if height <= width:
    new_h, new_w = resize, int(resize * width / height)
  else:
    new_h, new_w = int(resize * height / width), resize
  top = int(round((new_h - image_size) / 2))
  left = int(round((new_w - image_size) / 2))
  sy, sx = height / new_h, width / new_w
  return (top * sy, left * sx, image_size * sy, image_size * sx), (new_h, new_w)


def decode_window(encoded: bytes, window_fn, image_size: int,
                  reduced: bool = True) -> np.ndarray:
  """Decodes ``encoded``, crops the window ``window_fn(height, width)`` and
  resizes it to (S, S) with Pillow's antialiased bilinear filter.

  Args:
    encoded: a JPEG (or any image Pillow reads: PNG, BMP, ...).
    window_fn: ``(height, width) -> (top, left, crop_height, crop_width)``
      in the full image's pixels (floats allowed).
    image_size: S.
    reduced: decode JPEGs at a reduced size where the window allows it
      (module docstring).

  Returns:
    uint8 (S, S, 3).
  """
  image = Image.open(io.BytesIO(encoded))
  full_w, full_h = image.size
  top, left, h, w = window_fn(full_h, full_w)
  if reduced and image.format == "JPEG":
    factor = min(h / image_size, w / image_size)   # how far it can shrink
    if factor >= 2:
      image.draft("RGB", (math.ceil(full_w / factor),
                          math.ceil(full_h / factor)))
  image = image.convert("RGB")
  sx, sy = image.size[0] / full_w, image.size[1] / full_h
  box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
  return np.asarray(image.resize((image_size, image_size),
                                 Image.Resampling.BILINEAR, box=box))


def lighting(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """ReActNet's ``Lighting(0.1)`` on a uint8 image, uint8 out (clipped,
  truncated), as ``recipes.pil_lighting`` mirrors it."""
  alpha = rng.normal(0.0, constants.LIGHTING_ALPHASTD, 3)
  offset = np.asarray(constants.IMAGENET_PCA_EIGVEC) @ (
      alpha * np.asarray(constants.IMAGENET_PCA_EIGVAL))
  return np.clip(image + offset.astype(np.float32), 0, 255).astype(np.uint8)


def imagenet_train(encoded: bytes, rng: np.random.Generator, image_size: int,
                   scale: Tuple[float, float] = constants.CROP_SCALE,
                   flip: bool = True, reduced: bool = True) -> np.ndarray:
  """The ImageNet train recipe: encoded image -> uint8 (S, S, 3).

  The draws, in order: the crop window, the lighting, the flip.
  """
  image = decode_window(
      encoded, lambda h, w: random_resized_crop_window(h, w, rng, scale),
      image_size, reduced)
  image = lighting(image, rng)
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return np.ascontiguousarray(image)


def imagenet_eval(encoded: bytes, image_size: int,
                  reduced: bool = True) -> np.ndarray:
  """The ImageNet eval recipe: encoded image -> uint8 (S, S, 3)."""
  return decode_window(
      encoded, lambda h, w: eval_window(h, w, image_size)[0], image_size,
      reduced)


def normalize(images: np.ndarray, mean=constants.IMAGENET_MEAN,
              std=constants.IMAGENET_STD,
              dtype: Optional[np.dtype] = np.float32) -> np.ndarray:
  """``ToTensor`` + ``Normalize``: uint8 (..., 3) -> (x / 255 - mean) / std.

  Works on numpy and on jax arrays (on the device, after the transfer).
  """
  x = images.astype(np.float32) / 255.0
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
          ).astype(dtype)
