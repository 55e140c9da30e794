"""``ir2net_digits``: scikit-learn's 8x8 digits as a local tfds dataset.

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

Preparing it (``download_and_prepare``) takes well under a second.
"""

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["Ir2netDigits", "NUM_TRAIN", "NUM_TEST", "TEST_EVERY"]

TEST_EVERY = 5  # example i is a test example iff i % TEST_EVERY == 0
NUM_TRAIN = 1437
NUM_TEST = 360
_MAX_GREY = 16  # load_digits' grey levels are 0..16


def _split_indices(num_examples: int, split: str) -> np.ndarray:
  """Indices into ``load_digits()`` of the examples of ``split``."""
  index = np.arange(num_examples)
  is_test = index % TEST_EVERY == 0
  return index[is_test] if split == "test" else index[~is_test]


class Ir2netDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits, 8x8x1 uint8 images in 0..255, labels 0..9."""

  name = "ir2net_digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Train: i % 5 != 0 (1437); test: i % 5 == 0 (360)."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/"
        "sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ship with scikit-learn.
    return {
        "train": self._generate_examples("train"),
        "test": self._generate_examples("test"),
    }

  def _generate_examples(self, split: str):
    # Imported here: only preparing the data set needs scikit-learn.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / _MAX_GREY)).astype(np.uint8)
    for i in _split_indices(len(images), split):
      yield int(i), {"image": images[i][..., None],
                     "label": int(digits.target[i])}
