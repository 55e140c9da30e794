"""Per-example image transforms, in TensorFlow, for use inside ``tf.data``.

Every random transform takes an explicit ``seed``: an int32/int64 tensor of
shape (2,), as ``tf.random.stateless_*`` ops want. The same seed always gives
the same output, which is what makes the training input pipeline
deterministic and resumable. Nothing here uses a stateful RNG.

Images are HWC. Unless a docstring says otherwise, images are float32 on the
0..255 scale, as PIL images are in the PyTorch reference, and
:func:`normalize` is the last step.
"""

from typing import Sequence, Tuple

import tensorflow as tf

__all__ = [
    "split_seed", "to_pixel_levels", "normalize", "random_crop_with_padding",
    "random_flip_left_right", "random_resized_crop_window",
    "decode_and_random_resized_crop", "lighting", "resize_shorter_side",
    "center_crop", "decode_resize_and_center_crop", "decode_rgb",
    "random_resized_crop",
]


def split_seed(seed: tf.Tensor, num: int) -> tf.Tensor:
  """Derives ``num`` independent seeds from one, (2,) -> (num, 2)."""
  return tf.random.experimental.stateless_split(seed, num=num)


def to_pixel_levels(image: tf.Tensor) -> tf.Tensor:
  """Rounds to integer levels in [0, 255], as a uint8 PIL image holds them.

  Args:
    image: float (H, W, C) on the 0..255 scale, e.g. the output of a resize.

  Returns:
    float32 (H, W, C) with integer values in [0, 255].
  """
  return tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0)


def normalize(image: tf.Tensor, mean: Sequence[float],
              std: Sequence[float]) -> tf.Tensor:
  """``ToTensor`` then ``Normalize``: (x / 255 - mean) / std, channel-wise.

  Args:
    image: (H, W, C) on the 0..255 scale, any real or integer dtype.
    mean: C per-channel means, on the 0..1 scale.
    std: C per-channel standard deviations, on the 0..1 scale.

  Returns:
    float32 (H, W, C).
  """
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_crop_with_padding(image: tf.Tensor, seed: tf.Tensor,
                             padding: int) -> tf.Tensor:
  """``RandomCrop(size, padding)``: zero-pad each side, crop back to (H, W).

  Args:
    image: (H, W, C) with a static shape.
    seed: (2,) stateless seed.
    padding: pixels of zeros added on each of the four sides.

  Returns:
    (H, W, C), same dtype as ``image``.
  """
  shape = tf.shape(image)
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(padded, shape, seed=seed)


def random_flip_left_right(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """``RandomHorizontalFlip()``: mirrors (H, W, C) with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed=seed)


def random_resized_crop_window(
    image_shape: tf.Tensor, seed: tf.Tensor,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    max_attempts: int = 10) -> tf.Tensor:
  """Samples the crop window of ``RandomResizedCrop``.

  Area fraction uniform in ``scale`` and aspect ratio (w / h) in ``ratio``,
  up to ``max_attempts`` tries, as torchvision does. Differences: the aspect
  ratio is sampled uniformly rather than log-uniformly, and when every attempt
  fails the whole image is used rather than a centre crop with the ratio
  clamped; both matter only for extreme images.

  Args:
    image_shape: int32 (3,) ``[height, width, channels]``, e.g. from
      ``tf.image.extract_jpeg_shape``.
    seed: (2,) stateless seed.
    scale: range of the crop's area as a fraction of the image's.
    ratio: range of the crop's aspect ratio, width / height.
    max_attempts: tries before falling back to the whole image.

  Returns:
    int32 (4,) ``[offset_y, offset_x, height, width]``, the ``crop_window``
    that ``tf.image.decode_and_crop_jpeg`` takes.
  """
  whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=whole_image, seed=seed,
      min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def decode_and_random_resized_crop(
    jpeg: tf.Tensor, seed: tf.Tensor, image_size: int,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """``RandomResizedCrop(image_size)`` fused with JPEG decoding.

  Only the sampled window is decoded (``tf.image.decode_and_crop_jpeg``),
  which is much cheaper than decoding the whole image; it is then resized with
  antialiased bilinear filtering, as PIL does, and rounded to pixel levels.

  Args:
    jpeg: scalar string tensor, the encoded JPEG.
    seed: (2,) stateless seed.
    image_size: output height and width.
    scale: see :func:`random_resized_crop_window`.
    ratio: see :func:`random_resized_crop_window`.

  Returns:
    float32 (image_size, image_size, 3), integer levels in [0, 255].
  """
  window = random_resized_crop_window(
      tf.image.extract_jpeg_shape(jpeg), seed, scale, ratio)
  image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear",
                          antialias=True)
  return to_pixel_levels(image)


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes a PNG, JPEG, BMP or GIF (first frame) to uint8 (H, W, 3).

  Grey images are replicated to three channels, an alpha channel is dropped.
  """
  image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8,
                             expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


def random_resized_crop(
    image: tf.Tensor, seed: tf.Tensor, image_size: int,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """``RandomResizedCrop(image_size)`` of a decoded image.

  The window is sampled as in :func:`decode_and_random_resized_crop`, which
  is the faster choice for JPEG bytes.

  Args:
    image: (H, W, C), any real or integer dtype, 0..255.
    seed: (2,) stateless seed.
    image_size: output height and width.
    scale: see :func:`random_resized_crop_window`.
    ratio: see :func:`random_resized_crop_window`.

  Returns:
    float32 (image_size, image_size, C), integer levels in [0, 255].
  """
  window = random_resized_crop_window(tf.shape(image), seed, scale, ratio)
  crop = tf.slice(image, tf.stack([window[0], window[1], 0]),
                  tf.stack([window[2], window[3], -1]))
  crop = tf.image.resize(crop, [image_size, image_size], method="bilinear",
                         antialias=True)
  return to_pixel_levels(crop)


def lighting(image: tf.Tensor, seed: tf.Tensor, alphastd: float,
             eigval: Sequence[float],
             eigvec: Sequence[Sequence[float]]) -> tf.Tensor:
  """AlexNet-style PCA lighting noise: adds one RGB offset to every pixel.

  ``offset = eigvec @ (alpha * eigval)`` with ``alpha ~ N(0, alphastd)``, (3,).
  The offset is added as is, with no clipping or rounding; see
  ``recipes.imagenet_train`` for how the reference's uint8 round trip is
  mirrored.

  Args:
    image: float (H, W, 3).
    seed: (2,) stateless seed.
    alphastd: standard deviation of ``alpha``.
    eigval: (3,) eigenvalues of the pixel covariance.
    eigvec: (3, 3) eigenvectors, one per column.

  Returns:
    float32 (H, W, 3): ``image + offset``.
  """
  alpha = tf.random.stateless_normal([3], seed=seed, stddev=alphastd)
  offset = tf.linalg.matvec(tf.constant(eigvec, tf.float32),
                            alpha * tf.constant(eigval, tf.float32))
  return tf.cast(image, tf.float32) + offset


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision ``Resize(size)``: shorter side to ``size``, aspect kept.

  The longer side becomes ``int(size * long / short)`` (truncated), as in
  torchvision; antialiased bilinear, rounded to pixel levels.

  Args:
    image: (H, W, C), any real or integer dtype, 0..255.
    size: target length of the shorter side.

  Returns:
    float32 (H', W', C) with ``min(H', W') == size``.
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.cast(tf.minimum(h, w), tf.float64)
  scale = tf.constant(size, tf.float64) / short
  scaled = lambda side: tf.cast(tf.cast(side, tf.float64) * scale, tf.int32)
  new_h = tf.where(h <= w, size, scaled(h))
  new_w = tf.where(h <= w, scaled(w), size)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear",
                          antialias=True)
  return to_pixel_levels(image)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision ``CenterCrop(size)`` of an image at least ``size`` each way.

  Offsets are ``int(round((H - size) / 2))``, as torchvision computes them.

  Args:
    image: (H, W, C) with H, W >= size.
    size: output height and width.

  Returns:
    (size, size, C), same dtype as ``image``.
  """
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2), tf.int32)
  crop = tf.slice(image, tf.stack([top, left, 0]), [size, size, -1])
  return tf.ensure_shape(crop, [size, size, None])


def decode_resize_and_center_crop(jpeg: tf.Tensor, image_size: int,
                                  resize_size: int) -> tf.Tensor:
  """Evaluation: ``Resize(resize_size)`` then ``CenterCrop(image_size)``.

  Args:
    jpeg: scalar string tensor, the encoded JPEG.
    image_size: output height and width.
    resize_size: the shorter side before cropping (256 for 224).

  Returns:
    float32 (image_size, image_size, 3), integer levels in [0, 255].
  """
  image = tf.io.decode_jpeg(jpeg, channels=3)
  image = resize_shorter_side(image, resize_size)
  return tf.ensure_shape(center_crop(image, image_size),
                         [image_size, image_size, 3])
