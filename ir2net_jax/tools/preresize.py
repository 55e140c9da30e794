"""A copy of a ``folder:`` tree with every image's shorter side at most N
pixels, for hosts that cannot decode full-size JPEGs fast enough:
``ir2net-preresize``.

  ir2net-preresize --input=/data/imagenet --output=/data/imagenet_256 \\
      --shorter_side=256
  python launch.py --config=configs/imagenet.py \\
      --config.dataset=folder:/data/imagenet_256

Decoding is most of a host's work per ImageNet image. JPEGs stored with the
shorter side at 256 pixels, as FFCV and many ImageNet loaders keep them,
decode several times faster (docs/performance.md). That changes the data
a little: a train crop is taken from the smaller image, so a crop larger
than S is resized twice; the reference resizes the full-size image. The
eval recipe (shorter side to 256, centre crop 224) reads nearly the same
pixels.

What it writes: the same layout (splits, class folders, file names: the
same labels), every image whose shorter side is longer than N resized so
that it is N (the longer side truncated, as torchvision's ``Resize(N)``
does) with Pillow's antialiased bilinear filter, from a reduced-size JPEG
decode where libjpeg's DCT scaling keeps it at least N, and saved as JPEG
(quality ``--quality``; PNGs stay PNG); the others copied byte for byte.
Files other than images are left out, as the ``folder:`` reader ignores
them. Orientation tags are dropped, which the reader ignores too. Each file
is written under a temporary name and renamed, and files already in the
output are kept, so an interrupted run resumes where it stopped.
"""

import argparse
import concurrent.futures
import functools
import multiprocessing
import os
import shutil
import time
from typing import Dict, Optional, Sequence, Tuple

from absl import logging
from PIL import Image

from ir2net_jax.data import folders

__all__ = ["resized_size", "preresize_file", "preresize_tree", "main", "run"]


def resized_size(width: int, height: int, shorter_side: int
                 ) -> Optional[Tuple[int, int]]:
  """torchvision's ``Resize(N)`` size for a (width, height) image, or None
  where its shorter side is at most N already."""
  short, long = min(width, height), max(width, height)
  if short <= shorter_side:
    return None
  long = int(shorter_side * long / short)
  return ((shorter_side, long) if width <= height
          else (long, shorter_side))


def preresize_file(source: str, target: str, shorter_side: int,
                   quality: int) -> str:
  """Writes ``source`` to ``target`` with its shorter side at most N.

  Returns:
    'resized', 'copied' (small enough already) or 'kept' (``target``
    exists).
  """
  if os.path.exists(target):
    return "kept"
  os.makedirs(os.path.dirname(target), exist_ok=True)
  partial = f"{target}.partial-{os.getpid()}"
  with Image.open(source) as image:
    size = resized_size(image.width, image.height, shorter_side)
    kind = image.format
    if size is not None:
      if kind == "JPEG":
        image.draft(image.mode, size)   # the smallest DCT scale >= size
      if image.mode not in ("L", "RGB", "RGBA", "LA", "CMYK"):
        image = image.convert("RGBA" if "transparency" in image.info
                              else "RGB")
      resized = image.resize(size, Image.Resampling.BILINEAR)
  try:
    if size is None:
      shutil.copyfile(source, partial)
    else:
      resized.save(partial, format="JPEG" if kind == "JPEG" else "PNG",
                   **({"quality": quality} if kind == "JPEG" else {}))
    os.replace(partial, target)
  except BaseException:
    if os.path.exists(partial):
      os.remove(partial)
    raise
  return "copied" if size is None else "resized"


def _one(name: str, source: str, target: str, shorter_side: int,
         quality: int) -> Tuple[str, str]:
  """``(name, outcome)`` of :func:`preresize_file` on ``name`` (relative);
  an image that cannot be read or written is 'failed: <why>'."""
  try:
    return name, preresize_file(os.path.join(source, name),
                                os.path.join(target, name), shorter_side,
                                quality)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    return name, f"failed: {type(e).__name__}: {e}"


def preresize_tree(source: str, target: str, shorter_side: int = 256,
                   quality: int = 90, workers: Optional[int] = None,
                   log_every_s: float = 30.0) -> Dict[str, int]:
  """Writes the pre-resized copy of the tree ``source`` (``split/class/
  image``) to ``target``, in ``workers`` processes (None: one a core; 0:
  this process), logging files/s and the time left as it goes.

  Returns:
    How many files were 'resized', 'copied', 'kept' (in ``target``
    already) and 'failed' (unreadable; each logged with why).

  Raises:
    ValueError: ``source`` is not a directory, ``target`` is it or lies
      inside it, ``shorter_side`` is below 1 or ``quality`` outside 1..95.
  """
  source = os.path.abspath(os.path.expanduser(source))
  target = os.path.abspath(os.path.expanduser(target))
  if not os.path.isdir(source):
    raise ValueError(f"--input {source} is not a directory; pass the root "
                     "of a folder: tree (split/class/image).")
  if os.path.commonpath([source, target]) == source:
    raise ValueError(f"--output {target} is --input {source} or lies in "
                     "it; choose a directory outside it.")
  if shorter_side < 1 or not 1 <= quality <= 95:
    raise ValueError(f"--shorter_side={shorter_side} must be at least 1 "
                     f"and --quality={quality} in 1..95.")
  # What the folder: reader lists (folders.scan), relative to the tree.
  names = sorted(os.path.relpath(path, source)
                 for paths, _ in folders.scan(source).splits.values()
                 for path in paths)
  if not names:
    raise ValueError(f"--input {source} holds no images as split/class/"
                     f"image ({', '.join(folders.IMAGE_SUFFIXES)}).")
  one = functools.partial(_one, source=source, target=target,
                          shorter_side=shorter_side, quality=quality)
  counts = {"resized": 0, "copied": 0, "kept": 0, "failed": 0}
  start = last_log = time.perf_counter()
  if workers is None:
    workers = os.cpu_count() or 1
  pool = None
  if workers:   # spawned, not forked: this process has imported JAX
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"))
  results = pool.map(one, names, chunksize=64) if pool else map(one, names)
  try:
    for done, (name, outcome) in enumerate(results, 1):
      if outcome.startswith("failed"):
        logging.warning("%s %s", name, outcome)
        outcome = "failed"
      counts[outcome] += 1
      now = time.perf_counter()
      if now - last_log >= log_every_s:
        rate = done / (now - start)
        logging.info("%d of %d files, %.0f files/s, %.0f s left", done,
                     len(names), rate, (len(names) - done) / rate)
        last_log = now
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  return counts


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, int]:
  parser = argparse.ArgumentParser(
      description="Copy a folder: tree with every image's shorter side at "
                  "most N pixels (faster decoding on the host).")
  parser.add_argument("--input", required=True,
                      help="the tree's root (split/class/image)")
  parser.add_argument("--output", required=True,
                      help="where the copy goes (files there are kept)")
  parser.add_argument("--shorter_side", type=int, default=256)
  parser.add_argument("--quality", type=int, default=90,
                      help="JPEG quality of resized JPEGs")
  parser.add_argument("--workers", type=int, default=None,
                      help="processes (default: one a core; 0: none)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    counts = preresize_tree(args.input, args.output, args.shorter_side,
                            args.quality, args.workers)
  except ValueError as e:
    parser.error(str(e))
  print(f"wrote {args.output}: {counts['resized']} resized, "
        f"{counts['copied']} copied, {counts['kept']} kept, "
        f"{counts['failed']} failed (logged) "
        f"in {time.perf_counter() - start:.0f} s")
  if counts["failed"]:
    raise SystemExit(1)
  return counts


def run() -> None:
  """The ``ir2net-preresize`` console script: ``main`` on ``sys.argv``."""
  logging.set_verbosity(logging.INFO)
  main()


if __name__ == "__main__":
  run()
