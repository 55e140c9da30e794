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

The listing also finds what would break a run later, cheaply (one ``stat``
a file, which the size of the tree needs anyway): files that are not
regular files (FIFOs, devices, folders named ``.jpg``), dangling links and
link loops, empty files and files over the size cap
(``image_files.max_bytes``): ``Folder.problems``. They stay listed, so
every engine sees the same examples, labels and order; the run's
``bad_examples`` policy stops before training or skips them. Classes with no
image in any split (an empty folder, a link to a folder of folders) are
``Folder.empty_classes``. Class folders reached through a link are
followed once; a link back into the tree above them is a loop, named.
"""

import dataclasses
import functools
import os
import random
import stat
from typing import Dict, Tuple

import numpy as np

from ir2net_jax.data.shared import image_files
from ir2net_jax.data.shared.specs import DataError

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
    problems: ``{path: what is wrong}`` for listed files that cannot be
      images (see the module docstring).
    empty_classes: classes with no image in any split.
    total_bytes: the listed files' bytes.
  """
  root: str
  classes: Tuple[str, ...]
  splits: Dict[str, Tuple[Tuple[str, ...], np.ndarray]]
  problems: Dict[str, str] = dataclasses.field(default_factory=dict)
  empty_classes: Tuple[str, ...] = ()
  total_bytes: int = 0

  def num_examples(self, split: str) -> int:
    return len(self.splits[split][0])


def _subfolders(path: str, root: str):
  """The sorted subfolders of ``path``; a link to ``root`` or above it (a
  loop the listing would walk forever) is refused."""
  found = []
  for f in sorted(os.listdir(path)):
    full = os.path.join(path, f)
    if not os.path.isdir(full):
      continue
    if os.path.islink(full):
      target = os.path.realpath(full)
      if root == target or root.startswith(target.rstrip(os.sep) + os.sep):
        raise DataError(
            f"{image_files.printable(full)} is a link to {target}, which "
            f"holds the data set {root} itself: a loop. Remove the link.")
    found.append(f)
  return found


def _problem(path: str):
  """``(bytes, what is wrong or None)`` of a listed file, from one stat."""
  try:
    info = os.stat(path)
  except OSError as e:
    return 0, image_files.open_error(path, e).reason
  if not stat.S_ISREG(info.st_mode):
    return 0, f"{image_files.file_kind(info.st_mode)}, not an image file"
  if info.st_size == 0:
    return 0, "an empty file (0 bytes)"
  if info.st_size > image_files.max_bytes():
    return info.st_size, (f"{info.st_size:,} bytes, over the "
                          f"{image_files.max_bytes():,}-byte cap "
                          "($IR2NET_MAX_IMAGE_BYTES)")
  return info.st_size, None


@functools.lru_cache(maxsize=64)
def scan(root: str) -> Folder:
  """Lists ``root`` once per process (see the module docstring).

  Args:
    root: an existing directory.

  Raises:
    DataError: a class folder is a link that loops back into the tree.
  """
  root = os.path.realpath(os.path.expanduser(root))
  found: Dict[str, list] = {}
  classes, filled = set(), set()
  problems, total = {}, 0
  for split in _subfolders(root, root):
    split_dir = os.path.join(root, split)
    for name in _subfolders(split_dir, root):
      classes.add(name)
      class_dir = os.path.join(split_dir, name)
      files = [os.path.join(class_dir, f) for f in sorted(os.listdir(
          class_dir)) if f.lower().endswith(IMAGE_SUFFIXES)]
      for path in files:
        size, problem = _problem(path)
        total += size
        if problem:
          problems[path] = problem
      filled.update([name] if files else [])
      found.setdefault(split, []).extend((path, name) for path in files)
  classes = tuple(sorted(classes))
  label_of = {name: i for i, name in enumerate(classes)}
  splits = {}
  for split, examples in found.items():
    random.Random(split).shuffle(examples)
    splits[split] = (tuple(path for path, _ in examples),
                     np.array([label_of[name] for _, name in examples],
                              np.int64))
  return Folder(root=root, classes=classes, splits=splits,
                problems=problems,
                empty_classes=tuple(sorted(set(classes) - filled)),
                total_bytes=total)
