"""Image files as a data set's eval recipe prepares its own images (the
restriction pictures of ``ir2net_jax.tools.visualize``)."""

import glob
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from ir2net_jax.data import augment, sources
from ir2net_jax.data.custom import IMAGE_SUFFIXES
from ir2net_jax.data.specs import DataError

__all__ = ["load_images"]


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


def load_images(config, patterns: str) -> np.ndarray:
  """Image files -> (N, S, S, 3) float32, as the data set's eval recipe
  prepares its own images.

  ImageNet: the recipe decodes, resizes the shorter side and centre-crops.
  Digits: converted to grey, then the recipe's bilinear resize to S. Others
  (CIFAR-10): resized on the shorter side and centre-cropped to S unless
  they are S x S already, then the recipe.

  Args:
    config: the run's config (``dataset``, ``image_size``).
    patterns: comma-separated files, glob patterns or directories.

  Raises:
    DataError: a pattern matches no .png / .jpg file, or none is given.
  """
  settings = sources.read_settings(config)
  spec, size = settings.spec, settings.image_size
  out = []
  for path in _image_files(patterns):
    encoded = tf.io.read_file(path)
    if spec.decoders:  # the recipe decodes (JPEG bytes; PNG decodes too)
      image = spec.eval_recipe(encoded, size)
    else:
      channels = 1 if config.dataset == "digits" else 3
      image = tf.io.decode_image(encoded, channels=channels,
                                 expand_animations=False)
      if config.dataset != "digits" and tuple(image.shape[:2]) != (size, size):
        image = augment.center_crop(augment.resize_shorter_side(image, size),
                                    size)
      image = spec.eval_recipe(image, size)
    out.append(np.asarray(image, np.float32))
  return np.stack(out)
