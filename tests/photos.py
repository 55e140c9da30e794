"""Photo-like JPEG trees for the input engines' tests."""

import os

import numpy as np
from PIL import Image

CLASSES = ("ant", "bee", "cow")


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A smooth, photo-like uint8 (height, width, 3) image (gradients, a blob,
  mild noise): what JPEG decoders agree on to a level or so, unlike hard
  synthetic edges."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  channels = []
  for _ in range(3):
    a, b, c = rng.uniform(-1, 1, 3)
    cy, cx = rng.uniform(0, 1, 2)
    blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) * rng.uniform(4, 12))
    channels.append(128 + 60 * (a * x + b * y) + 50 * c * blob)
  image = np.stack(channels, -1) + rng.normal(0, 3, (height, width, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def write_tree(root, counts, sizes, seed=0, ext="jpg"):
  """``root/<split>/<class>/i.<ext>`` for the classes :data:`CLASSES`:
  ``counts[split]`` images per class, each of a size drawn from ``sizes``
  (a list of (height, width)). Returns ``root``."""
  rng = np.random.default_rng(seed)
  for split, count in counts.items():
    for name in CLASSES:
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(count):
        h, w = sizes[int(rng.integers(len(sizes)))]
        Image.fromarray(photo(rng, h, w)).save(
            os.path.join(root, split, name, f"{i:03d}.{ext}"), quality=92)
  return root
