"""``ir2net_digits``: scikit-learn's 8x8 digits (``digits``) as a local
tfds dataset, for the tf.data engine.

Features: ``image`` uint8 (8, 8, 1) in 0..255; ``label`` int64 in 0..9.
tfds shuffles the examples' order when it writes them, deterministically
from their keys (their indices into ``load_digits()``).
"""

import numpy as np
import tensorflow_datasets as tfds

from ir2net_jax.data.shared import digits

__all__ = ["Ir2netDigits"]


class Ir2netDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits, 8x8x1 uint8 images in 0..255, labels 0..9."""

  name = digits.TFDS_NAME
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
    images, labels = digits.load_split(split)
    keys = digits.split_keys(split)  # the keys tfds shuffles by
    for key, image, label in zip(keys, images, labels):
      yield int(key), {"image": image, "label": int(label)}
