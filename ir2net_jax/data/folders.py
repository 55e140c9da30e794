"""Class-per-subfolder image trees, listed without TensorFlow.

``PATH/<split>/<class>/*.{jpg,jpeg,png}``, listed exactly as tfds'
``ImageFolder`` lists it, so that the tf.data engine (which reads the tree
with ``ImageFolder``) and the grain engine (which reads the files listed
here) see the same examples, labels and order:

* splits: the subfolders of ``PATH`` that hold at least one subfolder;
* classes: the sorted names of the class subfolders of all splits together
  (label ``i`` is ``classes[i]``, in every split);
* a split's examples: class by class (sorted), each class's files with an
  image suffix (any case) sorted by name, then all shuffled with
  ``random.Random(split)``.
"""

import dataclasses
import functools
import os
import random
from typing import Dict, Tuple

import numpy as np

__all__ = ["FOLDER_PREFIX", "IMAGE_SUFFIXES", "Folder", "scan"]

FOLDER_PREFIX = "folder:"   # config.dataset = 'folder:PATH'
# What tfds' ImageFolder reads; other files are ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class Folder:
  """A listed tree.

  Attributes:
    root: the absolute path of the tree.
    classes: class names; label ``i`` is ``classes[i]``.
    splits: ``{split: (paths, labels)}``, paths a tuple of absolute file
      names and labels int64 (n,), in ``ImageFolder``'s order.
  """
  root: str
  classes: Tuple[str, ...]
  splits: Dict[str, Tuple[Tuple[str, ...], np.ndarray]]

  def num_examples(self, split: str) -> int:
    return len(self.splits[split][0])


def _subfolders(path: str):
  return sorted(f for f in os.listdir(path)
                if os.path.isdir(os.path.join(path, f)))


@functools.lru_cache(maxsize=64)
def scan(root: str) -> Folder:
  """Lists ``root`` once per process (see the module docstring).

  Args:
    root: an existing directory.
  """
  root = os.path.abspath(os.path.expanduser(root))
  found: Dict[str, list] = {}
  classes = set()
  for split in _subfolders(root):
    split_dir = os.path.join(root, split)
    for name in _subfolders(split_dir):
      classes.add(name)
      class_dir = os.path.join(split_dir, name)
      found.setdefault(split, []).extend(
          (os.path.join(class_dir, f), name)
          for f in sorted(os.listdir(class_dir))
          if f.lower().endswith(IMAGE_SUFFIXES))
  classes = tuple(sorted(classes))
  label_of = {name: i for i, name in enumerate(classes)}
  splits = {}
  for split, examples in found.items():
    random.Random(split).shuffle(examples)
    splits[split] = (tuple(path for path, _ in examples),
                     np.array([label_of[name] for _, name in examples],
                              np.int64))
  return Folder(root=root, classes=classes, splits=splits)
