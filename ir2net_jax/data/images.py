"""Image files as a data set's eval recipe prepares its own images (the
restriction pictures of ``ir2net_jax.tools.visualize``, ``ir2net-predict``):
with the tf.data recipes where the run's input engine is tf.data, else with
their numpy counterparts (``host_recipes``, ``on_device.upsample_bilinear``),
which agree up to the decoders' rounding and need no TensorFlow."""

import glob
import os
from typing import List, Sequence, Tuple

from absl import logging

import numpy as np
from PIL import Image

from ir2net_jax.data import engines
from ir2net_jax.data.device import on_device
from ir2net_jax.data.grain import host_recipes
from ir2net_jax.data.shared import bad_data, constants, image_files, sources
from ir2net_jax.data.shared.folders import IMAGE_SUFFIXES
from ir2net_jax.data.shared.specs import DataError

__all__ = ["load_images", "load_image_files"]


def _image_files(patterns: str) -> Sequence[str]:
  files = []
  for pattern in filter(None, (p.strip() for p in patterns.split(","))):
    if os.path.isdir(pattern):
      found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern))
    else:
      found = sorted(glob.glob(os.path.expanduser(pattern)))
    found = [f for f in found if f.lower().endswith(IMAGE_SUFFIXES)]
    if not found:
      raise DataError(f"--images: {pattern!r} matches no .png / .jpg "
                           "file")
    files += found
  if not files:
    raise DataError("--images is empty; pass files, globs or "
                         "directories, separated by commas")
  return files


def _readable(config, files: Sequence[str]) -> List[Tuple[str, bytes]]:
  """``(path, bytes)`` of the files that read and whose header checks
  (``image_files``); a bad one is skipped with a warning, or stops the
  call, as ``config.bad_examples`` says."""
  policy = bad_data.read_policy(config)
  found = []
  for path in files:
    try:
      encoded = image_files.read_file(path)
      image_files.image_size(encoded, path)
    except image_files.BadImage as e:
      if not policy.skip:
        raise
      logging.warning("--images: skipped %s: %s", image_files.printable(path),
                      e.reason)
      continue
    found.append((path, encoded))
  if not found:
    raise DataError(f"--images: none of the {len(files)} file(s) is a "
                    "readable image (see the warnings above).")
  return found


def load_images(config, patterns: str, recipes: str = "auto") -> np.ndarray:
  """``load_image_files``' images alone: (N, S, S, 3) float32."""
  return load_image_files(config, patterns, recipes)[1]


def _tf_recipes(config, recipes: str) -> bool:
  """Whether the tf.data recipes prepare the images: ``recipes`` 'tf.data'
  or 'numpy', or 'auto': those of the engine that would read ``config``'s
  data (tf.data where that cannot be told and TensorFlow is installed)."""
  if recipes != "auto":
    return recipes == "tf.data"
  try:
    return engines.resolve_engine(config) == "tf.data"
  except DataError:
    return on_device.tensorflow_installed()


def load_image_files(config, patterns: str, recipes: str = "auto"
                     ) -> Tuple[List[str], np.ndarray]:
  """Image files -> their paths and (N, S, S, 3) float32 images, as the data
  set's eval recipe prepares its own images.

  ImageNet: the recipe decodes, resizes the shorter side and centre-crops.
  Digits: converted to grey, then the recipe's bilinear resize to S. Others
  (CIFAR-10): resized on the shorter side and centre-cropped to S unless
  they are S x S already, then the recipe.

  Args:
    config: the run's config (``dataset``, ``image_size``).
    patterns: comma-separated files, glob patterns or directories.
    recipes: 'auto' (the run's input engine's), 'tf.data' or 'numpy'.

  Bad files (``image_files``) are skipped with a warning (and left out of
  the paths), or stop it, as ``config.bad_examples`` says.

  Raises:
    DataError: a pattern matches no .png / .jpg file, or none is given, or
      none reads; a bad file under ``bad_examples='error'``.
  """
  settings = sources.read_settings(config)
  files = _readable(config, _image_files(patterns))
  names = [path for path, _ in files]
  if not _tf_recipes(config, recipes):
    return names, np.stack([_numpy_recipe(config, settings, encoded)
                            for _, encoded in files])
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data.tf_data import augment, recipes  # pylint: disable=g-import-not-at-top
  spec, size = settings.spec, settings.image_size
  out = []
  for _, encoded in files:
    encoded = tf.constant(encoded)
    if spec.decoders:  # the recipe decodes (JPEG bytes; PNG decodes too)
      image = recipes.apply(spec.eval_recipe, encoded, size)
    else:
      channels = 1 if config.dataset == "digits" else 3
      image = tf.io.decode_image(encoded, channels=channels,
                                 expand_animations=False)
      if config.dataset != "digits" and tuple(image.shape[:2]) != (size, size):
        image = augment.center_crop(augment.resize_shorter_side(image, size),
                                    size)
      image = recipes.apply(spec.eval_recipe, image, size)
    out.append(np.asarray(image, np.float32))
  return names, np.stack(out)


def _numpy_recipe(config, settings: sources.Settings,
                  encoded: bytes) -> np.ndarray:
  """:func:`load_images`' recipe for one encoded image without
  TensorFlow."""
  spec, size = settings.spec, settings.image_size
  mean, std = constants.IMAGENET_MEAN, constants.IMAGENET_STD
  if config.dataset == "digits":
    rgb = Image.fromarray(image_files.decode_rgb(encoded))
    grey = np.asarray(rgb.convert("L"))[None, ..., None]
    image = np.repeat(on_device.upsample_bilinear(grey, size)[0], 3, -1)
    mean, std = constants.DIGITS_MEAN, constants.DIGITS_STD
  elif spec.crop == "resized":
    image = host_recipes.imagenet_eval(encoded, size)
  elif spec.decoders:   # the CIFAR recipe of tfds: and folder: data
    image = host_recipes.small_eval(encoded, size)
  else:                 # cifar10: resize the shorter side, centre crop
    image = host_recipes.decode_window(
        encoded, lambda h, w: host_recipes.eval_window(h, w, size, size)[0],
        size, reduce=False, context=True)
  return host_recipes.normalize(image, mean, std)
