"""Small models, configs and data for the training-system tests."""

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from configs import digits as digits_config


def tiny_digits_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """``configs/digits.py:smoke``: a 1-block ResNet-20, a few steps."""
  c = digits_config.get_config("smoke")
  c.data_dir = data_dir
  c.update(overrides)
  return c


def mock_data_dir(path: str) -> str:
  """A data_dir with cifar10's and imagenet2012's metadata, for mock_data."""
  for name in ("cifar10", "imagenet2012"):
    builder = tfds.builder(name, data_dir=path)
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
  return path


def random_batch(seed: int, batch: int, size: int = 32, classes: int = 10):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, classes, batch).astype(np.int32)}
