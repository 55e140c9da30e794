"""scikit-learn's 8x8 digits: a real data set that ships with a package.

A real, tiny classification data set that needs no network: the 1797 images of
``sklearn.datasets.load_digits()`` (bundled with scikit-learn), so that every
part of the training system can be exercised end to end on a laptop.

Features: ``image`` uint8 (8, 8, 1), the original 0..16 grey levels scaled to
0..255 (``round(v * 255 / 16)``); ``label`` int64 in 0..9.

Splits, fixed forever by a rule that involves no random number generator:
example ``i`` of ``load_digits()`` goes to ``test`` when ``i % 5 == 0`` and to
``train`` otherwise, which gives 1437 train and 360 test examples with every
class present in both. (tfds still shuffles the examples' order when it writes
them, deterministically from their keys.)

:func:`load_split` gives a split as numpy arrays, in ``load_digits()``
order, with neither tfds nor TensorFlow (the on-device engine reads them
so); ``digits_tfds.Ir2netDigits`` is the same data as the local tfds
dataset ``ir2net_digits`` (the tf.data engine's), prepared in well under a
second.
"""

import functools
import gzip
import importlib.util
import os
from typing import Optional, Tuple

import numpy as np

from ir2net_jax.data.shared.specs import DataError

__all__ = ["NUM_TRAIN", "NUM_TEST", "TEST_EVERY", "TFDS_NAME", "load_split",
           "split_keys"]

TEST_EVERY = 5  # example i is a test example iff i % TEST_EVERY == 0
TFDS_NAME = "ir2net_digits"   # the tfds builder of digits_tfds
NUM_TRAIN = 1437
NUM_TEST = 360
_MAX_GREY = 16  # load_digits' grey levels are 0..16


def split_keys(split: str) -> np.ndarray:
  """Indices into ``load_digits()`` of the examples of ``split``."""
  return _split_indices(NUM_TRAIN + NUM_TEST, split)


def _split_indices(num_examples: int, split: str) -> np.ndarray:
  index = np.arange(num_examples)
  is_test = index % TEST_EVERY == 0
  return index[is_test] if split == "test" else index[~is_test]


def load_split(split: str) -> Tuple[np.ndarray, np.ndarray]:
  """The examples of ``split`` ('train' or 'test'), in ``load_digits()`` order.

  Returns:
    ``(images, labels)``: uint8 (N, 8, 8, 1) in 0..255 and int32 (N,).

  Raises:
    DataError: ``split`` is neither 'train' nor 'test'.
  """
  if split not in ("train", "test"):
    raise DataError(f"digits has the splits 'train' and 'test' only; got "
                    f"{split!r} (--config.train_split / --config.eval_split).")
  images, labels = _load_digits()
  index = _split_indices(len(images), split)
  return images[index][..., None], labels[index]


@functools.lru_cache(maxsize=1)
def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
  """All of ``load_digits()``: uint8 (1797, 8, 8) in 0..255, int32 (1797,).

  Read from scikit-learn's bundled ``digits.csv.gz`` as ``load_digits``
  reads it, without importing scikit-learn (whose import, scipy's included,
  is most of a digits run's start); through ``load_digits`` where the file
  is not where scikit-learn keeps it.
  """
  path = _bundled_csv()
  if path is None:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    grey, target = digits.images, digits.target
  else:
    with gzip.open(path, "rt") as f:
      data = np.loadtxt(f, delimiter=",")
    grey, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
  images = np.round(grey * (255.0 / _MAX_GREY)).astype(np.uint8)
  images.flags.writeable = False
  labels = target.astype(np.int32)
  labels.flags.writeable = False
  return images, labels


def _bundled_csv() -> Optional[str]:
  """The path of scikit-learn's ``datasets/data/digits.csv.gz``, or None."""
  spec = importlib.util.find_spec("sklearn")  # finds it, imports nothing
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
      return path
  return None
