"""Per-data-set preprocessing recipes, as in the PyTorch reference.

Each recipe maps one stored image to the model's input, float32
(image_size, image_size, 3), normalised. Train recipes take a (2,) stateless
``seed``; eval recipes are deterministic.

* cifar10: train = RandomCrop(32, padding=4) + RandomHorizontalFlip; both
  then ToTensor + Normalize(ImageNet mean / std).
* imagenet2012: train = RandomResizedCrop(image_size, scale=(0.08, 1),
  ratio=(3/4, 4/3)) fused with JPEG decoding, Lighting(0.1),
  RandomHorizontalFlip, ToTensor, Normalize; eval = Resize(round(image_size *
  256 / 224)), CenterCrop(image_size), ToTensor, Normalize.
* digits (ours, no reference): bilinear upsampling of the 8x8 image to
  image_size, grey replicated to 3 channels; train adds a random crop with
  2-pixel zero padding (no flip: digits are not mirror-invariant); both then
  /255 and Normalize(mean=0.5, std=0.5), i.e. pixels in [-1, 1].
* any image classification data (``tfds:NAME``, ``folder:PATH``; ours, see
  ``custom`` for which applies). Images arrive encoded (PNG, JPEG) and are
  decoded to RGB (grey replicated, alpha dropped); both recipes end with
  Normalize(ImageNet mean / std), as CIFAR-10 and ImageNet do.

  - ``small_*``, the CIFAR recipe, for images of one size: resize to
    image_size x image_size if the stored size differs (antialiased
    bilinear); train = RandomCrop(image_size, padding=small_padding(...)) +
    RandomHorizontalFlip; eval = nothing more.
  - ``large_*``, the ImageNet recipe without Lighting (its PCA constants
    are ImageNet's, and it is nearly a no-op anyway): train =
    RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3)) +
    RandomHorizontalFlip; eval = Resize(round(image_size * 256 / 224)) +
    CenterCrop(image_size).

What a config may change in every train recipe is an :class:`Augmentation`:
the flip (``config.flip``; digits are not mirror-invariant, nor are text,
documents and many medical images), the pad-and-crop padding
(``config.crop_padding``) and RandomResizedCrop's scale range
(``config.crop_scale``). Turning the flip off keeps every crop as it was: the
seeds are split the same way.

Lighting, as ReActNet's ``Lighting`` (the transform the reference uses) does
it: the offset ``eigvec @ (alpha * eigval)``, alpha ~ N(0, 0.1), is added to
the uint8 PIL image on the 0..255 scale with the eigenvalues as given (not
scaled by 255), then clipped to [0, 255] and cast back to uint8, which
truncates. The offset is about 0.01 grey levels, so in effect each channel of
an image stays as it is (positive offset) or drops by one level (negative
offset). We mirror that exactly, truncation included, so the augmentation
distribution is the reference's; it is nearly a no-op, as there.
"""

from typing import Optional, Tuple

import tensorflow as tf

# The recipes' numbers, re-exported (``constants`` needs no TensorFlow).
from ir2net_jax.data.shared.constants import (  # pylint: disable=g-multiple-import
    CIFAR_PADDING, CROP_RATIO, CROP_SCALE, DIGITS_MEAN, DIGITS_PADDING,
    DIGITS_STD, IMAGENET_MEAN, IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC,
    IMAGENET_STD, LIGHTING_ALPHASTD, small_padding)
# Re-exported: the configurable choices, shared with every engine.
from ir2net_jax.data.shared.specs import (  # pylint: disable=g-multiple-import
    REFERENCE, Augmentation, normalized_range)
from ir2net_jax.data.shared.tf_recipes import TfRecipe
from ir2net_jax.data.tf_data import augment



def apply(recipe: TfRecipe, *args) -> tf.Tensor:
  """Runs the recipe a ``DatasetSpec`` names on ``args`` (an image, and for
  training its seed; the image size; for training the augmentation)."""
  return globals()[recipe.name](*args, **dict(recipe.bound))


def _padding(augmentation: Augmentation, default: int) -> int:
  if augmentation.crop_padding is None:
    return default
  return augmentation.crop_padding


def _maybe_flip(image: tf.Tensor, seed: tf.Tensor,
                augmentation: Augmentation) -> tf.Tensor:
  if not augmentation.flip:
    return image
  return augment.random_flip_left_right(image, seed)


def eval_resize_size(image_size: int) -> int:
  """Shorter side before the eval centre crop: 256 for 224."""
  return int(round(image_size * 256 / 224))


def cifar10_train(image: tf.Tensor, seed: tf.Tensor, image_size: int,
                  augmentation: Augmentation = REFERENCE) -> tf.Tensor:
  """uint8 (32, 32, 3) -> float32 (32, 32, 3): crop, flip, normalise."""
  del image_size  # Always 32, checked when the config is read.
  crop_seed, flip_seed = tf.unstack(augment.split_seed(seed, 2))
  image = augment.random_crop_with_padding(
      image, crop_seed, _padding(augmentation, CIFAR_PADDING))
  image = _maybe_flip(image, flip_seed, augmentation)
  return augment.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def cifar10_eval(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8 (32, 32, 3) -> float32 (32, 32, 3): normalise."""
  del image_size
  return augment.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def pil_lighting(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """The reference's Lighting on a uint8 image, float32 (H, W, 3) in and out.

  Adds the PCA offset, clips to [0, 255] and truncates to integer levels, as
  ``Image.fromarray(np.clip(img + inc, 0, 255).astype(np.uint8))`` does.
  """
  image = augment.lighting(image, seed, LIGHTING_ALPHASTD, IMAGENET_PCA_EIGVAL,
                           IMAGENET_PCA_EIGVEC)
  return tf.floor(tf.clip_by_value(image, 0.0, 255.0))


def imagenet_train(jpeg: tf.Tensor, seed: tf.Tensor, image_size: int,
                   augmentation: Augmentation = REFERENCE) -> tf.Tensor:
  """JPEG bytes -> float32 (image_size, image_size, 3).

  Fused decode + RandomResizedCrop, Lighting, flip, normalise.
  """
  crop_seed, light_seed, flip_seed = tf.unstack(augment.split_seed(seed, 3))
  image = augment.decode_and_random_resized_crop(
      jpeg, crop_seed, image_size, augmentation.crop_scale, CROP_RATIO)
  image = pil_lighting(image, light_seed)
  image = _maybe_flip(image, flip_seed, augmentation)
  return augment.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def imagenet_eval(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
  """JPEG bytes -> float32 (image_size, image_size, 3): resize, centre crop."""
  image = augment.decode_resize_and_center_crop(
      jpeg, image_size, eval_resize_size(image_size))
  return augment.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def _digits_upsample(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8 (8, 8, 1) -> float32 (image_size, image_size, 3), 0..255."""
  image = tf.image.resize(image, [image_size, image_size], method="bilinear")
  return tf.image.grayscale_to_rgb(image)


def digits_train(image: tf.Tensor, seed: tf.Tensor, image_size: int,
                 augmentation: Augmentation = Augmentation(flip=False)
                 ) -> tf.Tensor:
  """uint8 (8, 8, 1) -> float32 (image_size, image_size, 3): crop, normalise
  (and flip, only where ``augmentation`` asks for it)."""
  image = _digits_upsample(image, image_size)
  image = augment.random_crop_with_padding(
      image, seed, _padding(augmentation, DIGITS_PADDING))
  if augmentation.flip:  # A seed of its own; the crop's stays as it was.
    image = augment.random_flip_left_right(
        image, augment.split_seed(seed, 2)[1])
  return augment.normalize(image, DIGITS_MEAN, DIGITS_STD)


def digits_eval(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8 (8, 8, 1) -> float32 (image_size, image_size, 3): normalise."""
  return augment.normalize(_digits_upsample(image, image_size), DIGITS_MEAN,
                           DIGITS_STD)


def _decode_small(encoded: tf.Tensor, image_size: int,
                  stored_size: Optional[Tuple[int, int]]) -> tf.Tensor:
  """Encoded image -> (image_size, image_size, 3) on the 0..255 scale."""
  image = augment.decode_rgb(encoded)
  if stored_size != (image_size, image_size):
    image = augment.to_pixel_levels(tf.image.resize(
        image, [image_size, image_size], method="bilinear", antialias=True))
  return tf.ensure_shape(image, [image_size, image_size, 3])


def small_train(encoded: tf.Tensor, seed: tf.Tensor, image_size: int,
                augmentation: Augmentation = REFERENCE,
                stored_size: Optional[Tuple[int, int]] = None) -> tf.Tensor:
  """The CIFAR recipe for any data: encoded image -> float32 (S, S, 3).

  Args:
    encoded: scalar string tensor, a PNG or JPEG.
    seed: (2,) stateless seed.
    image_size: S.
    augmentation: flip and padding.
    stored_size: (height, width) of every stored image; None resizes always.
  """
  crop_seed, flip_seed = tf.unstack(augment.split_seed(seed, 2))
  image = _decode_small(encoded, image_size, stored_size)
  image = augment.random_crop_with_padding(
      image, crop_seed, _padding(augmentation, small_padding(image_size)))
  image = _maybe_flip(image, flip_seed, augmentation)
  return augment.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def small_eval(encoded: tf.Tensor, image_size: int,
               stored_size: Optional[Tuple[int, int]] = None) -> tf.Tensor:
  """The CIFAR recipe's eval: encoded image -> float32 (S, S, 3)."""
  return augment.normalize(_decode_small(encoded, image_size, stored_size),
                           IMAGENET_MEAN, IMAGENET_STD)


def large_train(encoded: tf.Tensor, seed: tf.Tensor, image_size: int,
                augmentation: Augmentation = REFERENCE) -> tf.Tensor:
  """The ImageNet recipe for any data: encoded image -> float32 (S, S, 3)."""
  crop_seed, flip_seed = tf.unstack(augment.split_seed(seed, 2))
  image = augment.random_resized_crop(augment.decode_rgb(encoded), crop_seed,
                                      image_size, augmentation.crop_scale,
                                      CROP_RATIO)
  image = _maybe_flip(image, flip_seed, augmentation)
  return augment.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def large_eval(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
  """The ImageNet recipe's eval: resize, centre crop, float32 (S, S, 3)."""
  image = augment.resize_shorter_side(augment.decode_rgb(encoded),
                                      eval_resize_size(image_size))
  image = augment.center_crop(image, image_size)
  return augment.normalize(tf.ensure_shape(image, [image_size, image_size, 3]),
                           IMAGENET_MEAN, IMAGENET_STD)
