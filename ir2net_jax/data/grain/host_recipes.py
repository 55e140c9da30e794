"""The ImageNet recipes in numpy, with libjpeg-turbo (simplejpeg) or Pillow
decoding, for host pipelines without TensorFlow.

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

The same recipe for any data (``recipes.large_*``) is :func:`imagenet_train`
with ``lighting=False``, and :func:`imagenet_eval`. The CIFAR recipe for any
data of one image size (``recipes.small_*``, and CIFAR-10's own) is
:func:`small_train` / :func:`small_eval`: decode to RGB, resize to S x S
where the stored size differs (antialiased bilinear), then for training
zero-pad ``padding`` pixels a side, crop S x S at a random offset
(:func:`pad_and_crop`) and flip.

Decoding at reduced size. libjpeg-turbo decodes a JPEG at n/8 of its size
(n = 1..8) for a fraction of the work (its DCT scaling). :func:`decode_window`
decodes at the smallest such scale that still leaves the crop window at
least ``S`` pixels a side, so the resize only ever shrinks, as it does at
full size; pixels then differ from a full-size decode by a few levels (the
scaled IDCT's own filtering), never by the window. Only training decodes so;
the eval recipe decodes at full size, as the reference does. Decoders
(``decoder=``):

* ``'simplejpeg'``: libjpeg-turbo through simplejpeg, every n/8 scale;
* ``'pil'``: Pillow's ``Image.draft``, the scales 1/2, 1/4 and 1/8 only;
* ``'pil_full'``: Pillow at full size (no DCT scaling);
* ``'auto'``: simplejpeg where it is installed, else ``'pil'``.

Non-JPEG images (PNG, BMP, ...) are always decoded by Pillow at full size.
The window is resized with Pillow's antialiased bilinear filter: in training
from the window's own pixels (the reference crops, then resizes), in
evaluation with the pixels around it (it resizes, then crops).

Resizing on the device. ``imagenet_train_parts(canvas=C)`` leaves the resize
out too: it returns the decoded window unresized on a fixed (C, C, 3) canvas
(:func:`canvas_size`), with the integers Pillow would resize it with
(``pillow_resize``), and
``window_resize.resize_windows`` resizes it on the accelerators to exactly
Pillow's pixels. That takes a fifth of the host's work per image away, for
about twice the bytes per batch.

Random choices come from a ``numpy.random.Generator`` that the caller seeds
per example (e.g. from ``(seed, example index)``), so a pipeline that seeds
them so is deterministic whatever its worker count.
"""

import math
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

from ir2net_jax.data.grain import pillow_resize
from ir2net_jax.data.shared import constants, image_files

__all__ = ["DECODERS", "resolve_decoder", "random_resized_crop_window",
           "eval_window", "decode_region", "decode_window", "resize_box",
           "canvas_size", "lighting_shift", "shift_levels", "lighting",
           "imagenet_train_parts", "imagenet_train",
           "imagenet_eval", "decode_rgb", "pad_and_crop", "small_train",
           "small_eval", "normalize"]

Window = Tuple[int, int, int, int]   # top, left, height, width
Box = Tuple[float, float, float, float]   # left, top, right, bottom


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


def eval_window(height: int, width: int, image_size: int,
                resize: Optional[int] = None
                ) -> Tuple[Window, Tuple[int, int]]:
  """``Resize(resize)`` + ``CenterCrop(S)`` as one window; ``resize``
  defaults to ``round(S * 256 / 224)``, ImageNet's.

  Returns:
    ``(window, resized)``: the window of the original image that the centre
    crop keeps, and the (height, width) the whole image is resized to.
  """
  if resize is None:
    resize = int(round(image_size * 256 / 224))
  if height <= width:
    new_h, new_w = resize, int(resize * width / height)
  else:
    new_h, new_w = int(resize * height / width), resize
  top = int(round((new_h - image_size) / 2))
  left = int(round((new_w - image_size) / 2))
  sy, sx = height / new_h, width / new_w
  return (top * sy, left * sx, image_size * sy, image_size * sx), (new_h, new_w)


DECODERS = ("auto", "simplejpeg", "pil", "pil_full")


def _simplejpeg():
  try:
    import simplejpeg  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return simplejpeg


def resolve_decoder(decoder: str = "auto") -> str:
  """``decoder`` with 'auto' resolved to what is installed."""
  if decoder not in DECODERS:
    raise ValueError(f"decoder must be one of {DECODERS}; got {decoder!r}")
  if decoder == "auto":
    return "simplejpeg" if _simplejpeg() is not None else "pil"
  return decoder


def _is_jpeg(encoded: bytes) -> bool:
  return encoded[:3] == b"\xff\xd8\xff"


def decode_region(encoded: bytes, window_fn, image_size: int,
                  decoder: str = "auto", reduce: bool = True,
                  context: bool = False) -> Tuple[np.ndarray, Box]:
  """Decodes ``encoded`` and returns the pixels that resizing the window
  ``window_fn(height, width)`` to (S, S) reads, and the window in them.

  Args:
    encoded: a JPEG (or any image Pillow reads: PNG, BMP, ...).
    window_fn: ``(height, width) -> (top, left, crop_height, crop_width)``
      in the full image's pixels (floats allowed).
    image_size: S.
    decoder: see the module docstring.
    reduce: decode at the smallest DCT scale that keeps the window at least
      S pixels a side (JPEGs only).
    context: whether the pixels around the window feed the resize (the eval
      recipe: the reference resizes the whole image, then crops), or only
      the window's (the train recipe: it crops the window, then resizes).

  Returns:
    ``(pixels, box)``: uint8 (h, w, 3), the decoded window's whole pixels
    (and with ``context`` the filter's reach around them); ``(left, top,
    right, bottom)``, the window in them, floats (Pillow's box order).
  """
  decoder = resolve_decoder(decoder)
  if decoder == "simplejpeg" and _is_jpeg(encoded):
    header = _simplejpeg().decode_jpeg_header(encoded)
    if header[2] in ("YCbCr", "Gray", "RGB"):
      full_h, full_w = header[:2]
      image_files.check_pixels("<bytes>", full_h, full_w)
      window = window_fn(full_h, full_w)
      factor = (max(1.0, min(window[2], window[3]) / image_size) if reduce
                else 1.0)
      pixels = _simplejpeg().decode_jpeg(
          encoded, colorspace="RGB", min_height=math.ceil(full_h / factor),
          min_width=math.ceil(full_w / factor))
      return _region(pixels, (full_h, full_w), window, image_size, context)
    decoder = "pil"   # CMYK and YCCK: Pillow knows Adobe's inverted inks
  with image_files.open_image(encoded) as image:
    full_w, full_h = image.size
    window = window_fn(full_h, full_w)
    factor = min(window[2], window[3]) / image_size
    if reduce and decoder == "pil" and image.format == "JPEG" and factor >= 2:
      image.draft("RGB", (math.ceil(full_w / factor),
                          math.ceil(full_h / factor)))
    pixels = image_files.to_rgb(image)
  return _region(pixels, (full_h, full_w), window, image_size, context)


def _region(pixels: np.ndarray, full: Tuple[int, int], window: Window,
            image_size: int, context: bool) -> Tuple[np.ndarray, Box]:
  """:func:`decode_region`'s pixels and box, from the decoded image."""
  top, left, h, w = window
  s = _scale(full[0], full[1], pixels.shape[:2])
  # Pillow's bilinear filter reaches max(1, shrink) pixels past a sample.
  reach_y = math.ceil(max(1.0, h * s / image_size)) + 1 if context else 0
  reach_x = math.ceil(max(1.0, w * s / image_size)) + 1 if context else 0
  y0 = max(0, math.floor(top * s) - reach_y)
  x0 = max(0, math.floor(left * s) - reach_x)
  y1 = min(pixels.shape[0], math.ceil((top + h) * s) + reach_y)
  x1 = min(pixels.shape[1], math.ceil((left + w) * s) + reach_x)
  box = (left * s - x0, top * s - y0, (left + w) * s - x0, (top + h) * s - y0)
  return pixels[y0:y1, x0:x1], box


def decode_window(encoded: bytes, window_fn, image_size: int,
                  decoder: str = "auto", reduce: bool = True,
                  context: bool = False) -> np.ndarray:
  """Decodes ``encoded``, crops the window ``window_fn(height, width)`` and
  resizes it to (S, S) (:func:`decode_region`, then Pillow's antialiased
  bilinear resize).

  Returns:
    uint8 (S, S, 3).
  """
  pixels, box = decode_region(encoded, window_fn, image_size, decoder,
                              reduce, context)
  return resize_box(pixels, box, image_size)


def resize_box(pixels: np.ndarray, box: Box, image_size: int) -> np.ndarray:
  """The ``box`` of uint8 (h, w, 3) ``pixels`` resized to uint8 (S, S, 3)
  with Pillow's antialiased bilinear filter."""
  return np.asarray(Image.fromarray(pixels).resize(
      (image_size, image_size), Image.Resampling.BILINEAR, box=box))


def _scale(full_h: int, full_w: int, shape) -> float:
  """The DCT scale n/8 that decoded (full_h, full_w) to ``shape``: pixel y
  of the image is y * n / 8 of the decoded one. (Not shape / full: libjpeg
  rounds the decoded size up, and that ratio would shift the window by up
  to a pixel.)"""
  for n in range(8, 0, -1):
    if (math.ceil(full_h * n / 8), math.ceil(full_w * n / 8)) == tuple(shape):
      return n / 8
  return shape[0] / full_h   # not a DCT scale; cannot happen with libjpeg


def lighting_shift(rng: np.random.Generator) -> np.ndarray:
  """ReActNet's ``Lighting(0.1)`` draw as whole levels: int32 (3,).

  The reference adds the offset ``eigvec @ (alpha * eigval)`` to the uint8
  image, clips to [0, 255] and truncates. For an integer level ``x`` that is
  ``clip(x + floor(offset), 0, 255)``: with offsets almost always below one
  level, a channel with a negative offset drops by one level (not below 0)
  and one with a non-negative offset stays.
  """
  alpha = rng.normal(0.0, constants.LIGHTING_ALPHASTD, 3)
  offset = np.asarray(constants.IMAGENET_PCA_EIGVEC) @ (
      alpha * np.asarray(constants.IMAGENET_PCA_EIGVAL))
  return np.floor(offset).astype(np.int32)


def shift_levels(images, shift):
  """uint8 (..., 3) images plus int (..., 3) ``shift`` (broadcast), clipped
  to [0, 255]: uint8 out. Works on numpy and on jax arrays."""
  return (images.astype(np.int32) + shift).clip(0, 255).astype(np.uint8)


def lighting(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """ReActNet's ``Lighting(0.1)`` on a uint8 (H, W, 3) image, uint8 out:
  ``uint8(clip(image + offset, 0, 255))`` (see :func:`lighting_shift`), as
  ``recipes.pil_lighting`` mirrors it."""
  return shift_levels(image, lighting_shift(rng))


def canvas_size(image_size: int) -> int:
  """The side of the canvas that carries a train window to the device
  (``imagenet_train_parts(canvas=...)``): 1.5 S, a multiple of 8. Windows
  decoded at the smallest DCT scale that keeps them S pixels a side are
  rarely larger (about 5% of ImageNet-shaped JPEGs at S = 224); those are
  resized on the host."""
  return 8 * math.ceil(1.5 * image_size / 8)


def imagenet_train_parts(
    encoded: bytes, rng: np.random.Generator, image_size: int,
    scale: Tuple[float, float] = constants.CROP_SCALE, flip: bool = True,
    decoder: str = "auto", with_lighting: bool = True,
    canvas: Optional[int] = None) -> Dict[str, np.ndarray]:
  """:func:`imagenet_train` with the lighting and the flip drawn but not
  applied, and with ``canvas`` the resize not done either, for a device to
  finish (``grain_inputs.finish_batch``; the draws are the same).

  Args:
    encoded, rng, image_size, scale, flip, decoder, with_lighting: see
      :func:`imagenet_train`.
    canvas: None to resize on the host; else C: the decoded window's
      pixels are left unresized at the top left of a zeroed (C, C, 3)
      canvas for the device to resize (``window_resize.resize_windows``),
      or, where they are larger than C, resized here and placed there as an
      (S, S) image that the device's resize leaves as it is.

  Returns:
    ``image``: the resized crop, uint8 (S, S, 3), or the canvas, uint8
    (C, C, 3); ``shift``: the lighting as whole levels, int32 (3,) (zeros
    without lighting); ``flip``: bool (), whether to mirror it; and with
    ``canvas``, ``resize``: int32 (2, S, 1 + K), Pillow's coefficients for
    the rows and then the columns (``pillow_resize.resize_coefficients``,
    K = ``pillow_resize.resize_taps``), which read none of the canvas's
    padding, and ``vertical_first``: bool (), the order of Pillow's passes.
  """
  pixels, box = decode_region(
      encoded, lambda h, w: random_resized_crop_window(h, w, rng, scale),
      image_size, decoder)
  parts = {"shift": (lighting_shift(rng) if with_lighting
                     else np.zeros(3, np.int32)),
           "flip": np.bool_(flip and rng.random() < 0.5)}
  if canvas is None:
    return {"image": resize_box(pixels, box, image_size), **parts}
  height, width = pixels.shape[:2]
  left, top, right, bottom = box
  if height > canvas or width > canvas:
    pixels = resize_box(pixels, box, image_size)
    height = width = image_size
    left, top, right, bottom = 0, 0, image_size, image_size
  image = np.zeros((canvas, canvas, 3), np.uint8)
  image[:height, :width] = pixels
  resize = pillow_resize.resize_coefficients(
      (top, left), (bottom, right), (height, width), image_size,
      pillow_resize.resize_taps(canvas, image_size))
  return {"image": image, "resize": resize,
          "vertical_first": np.bool_(pillow_resize.vertical_first(
              height, width, image_size)),
          **parts}


def imagenet_train(encoded: bytes, rng: np.random.Generator, image_size: int,
                   scale: Tuple[float, float] = constants.CROP_SCALE,
                   flip: bool = True, decoder: str = "auto",
                   with_lighting: bool = True) -> np.ndarray:
  """The ImageNet train recipe: encoded image -> uint8 (S, S, 3).

  The draws, in order: the crop window, the lighting (unless
  ``with_lighting`` is False: the recipe for any data), the flip.
  """
  parts = imagenet_train_parts(encoded, rng, image_size, scale, flip,
                               decoder, with_lighting)
  image = shift_levels(parts["image"], parts["shift"])
  return np.ascontiguousarray(image[:, ::-1] if parts["flip"] else image)


def imagenet_eval(encoded: bytes, image_size: int,
                  decoder: str = "auto") -> np.ndarray:
  """The ImageNet eval recipe: encoded image -> uint8 (S, S, 3).

  Decoded at full size whatever the decoder, as the reference decodes:
  evaluation is what papers report, and it reads a few images per training
  step's worth; reduced-size decoding is for training.
  """
  return decode_window(
      encoded, lambda h, w: eval_window(h, w, image_size)[0], image_size,
      decoder, reduce=False, context=True)


def decode_rgb(image) -> np.ndarray:
  """An encoded image (PNG, JPEG, ...) or a uint8 array (H, W, C) -> uint8
  (H, W, 3): grey replicated, alpha dropped."""
  if isinstance(image, np.ndarray):
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      return np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])
  with image_files.open_image(image) as opened:
    return image_files.to_rgb(opened)


def _small(image, image_size: int) -> np.ndarray:
  """Decoded to uint8 (S, S, 3), resized (antialiased bilinear) where the
  stored size differs."""
  pixels = decode_rgb(image)
  if pixels.shape[:2] != (image_size, image_size):
    pixels = resize_box(pixels, None, image_size)
  return pixels


def pad_and_crop(image: np.ndarray, top: int, left: int,
                 padding: int) -> np.ndarray:
  """``RandomCrop(S, padding)`` for a drawn offset: the (H, W) window at
  ``(top, left)`` of the image zero-padded by ``padding`` on every side
  (``0 <= top, left <= 2 * padding``)."""
  height, width = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  return padded[top:top + height, left:left + width]


def small_train(image, rng: np.random.Generator, image_size: int,
                padding: int, flip: bool = True) -> np.ndarray:
  """The CIFAR recipe: encoded image or uint8 array -> uint8 (S, S, 3).

  The draws, in order: the crop's top and left offsets, the flip.
  """
  top, left = (int(v) for v in rng.integers(0, 2 * padding + 1, size=2))
  pixels = pad_and_crop(_small(image, image_size), top, left, padding)
  if flip and rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return np.ascontiguousarray(pixels)


def small_eval(image, image_size: int) -> np.ndarray:
  """The CIFAR recipe's eval: encoded image or uint8 array -> uint8
  (S, S, 3)."""
  return _small(image, image_size)


def normalize(images: np.ndarray, mean=constants.IMAGENET_MEAN,
              std=constants.IMAGENET_STD,
              dtype: Optional[np.dtype] = np.float32) -> np.ndarray:
  """``ToTensor`` + ``Normalize``: uint8 (..., 3) -> (x / 255 - mean) / std.

  Works on numpy and on jax arrays (on the device, after the transfer).
  """
  x = images.astype(np.float32) / 255.0
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
          ).astype(dtype)
