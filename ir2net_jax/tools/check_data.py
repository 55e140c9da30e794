"""Every image of a ``folder:`` data set decoded once, on every core, and a
report of the bad ones: ``ir2net-check-data``.

  ir2net-check-data --data=/data/imagenet [--workers=-1] \\
      [--report=bad_files.tsv]

What it checks, file by file (``data.shared.image_files.verify``): a
regular file (no FIFO, device, dangling link or link loop), not empty, under
the size cap, a JPEG, PNG, GIF, BMP or WebP whatever its suffix, within the
pixel cap, and a whole decode: JPEGs at libjpeg's 1/8 scale (every
coefficient is still read, so a truncated or corrupt stream fails as at full
size, for a fraction of the time), other images at full size. Then the tree
itself: class folders with no image.

A training run checks less before it starts, for free: its listing
``stat``s every file (the first four kinds above), and for trees of small
images it reads every header. A file that fails to decode later is skipped
or stops the run as ``config.bad_examples`` says. This command is the full
check, worth running once on a new copy of the data.

Output: a progress line every few seconds (files/s, ETA, bad so far), then
the bad files, one ``path<TAB>what is wrong`` line each, in ``--report``
(default: printed). Exit status 0 if every file is good, 1 if any is bad, 2
for bad arguments.
"""

import argparse
import concurrent.futures
import functools
import multiprocessing
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ir2net_jax.data.shared import folders, image_files
from ir2net_jax.data.shared.specs import DataError

__all__ = ["check_files", "check_tree", "main", "run"]

_CHUNK = 64   # files a worker checks per task


def _check_chunk(paths: Sequence[str], check=image_files.verify
                 ) -> List[Tuple[str, str]]:
  return [(path, reason) for path in paths
          if (reason := check(path)) is not None]


def _progress(done: int, total: int, bad: int, start: float) -> str:
  elapsed = max(time.monotonic() - start, 1e-9)
  rate = done / elapsed
  eta = (total - done) / rate if rate else float("inf")
  return (f"checked {done:,} / {total:,} files ({rate:,.0f} files/s, "
          f"{elapsed:.0f} s, ETA {eta:.0f} s), {bad} bad")


def check_files(paths: Sequence[str], workers: int = -1,
                progress_s: Optional[float] = 5.0,
                check: Callable[[str], Optional[str]] = image_files.verify
                ) -> Dict[str, str]:
  """``{path: what is wrong}`` for the bad files of ``paths``.

  Args:
    paths: image files.
    workers: processes; -1 one per core, 0 none (this process).
    progress_s: seconds between progress lines (on stderr); None: none.
    check: ``path -> what is wrong or None`` (picklable, for the workers).
  """
  if workers < 0:
    workers = len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else (os.cpu_count() or 1)
  chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
  check_chunk = functools.partial(_check_chunk, check=check)
  start = last = time.monotonic()
  bad: Dict[str, str] = {}
  done = 0

  def report(found):
    nonlocal done, last
    done += found[0]
    bad.update(found[1])
    if progress_s is not None and time.monotonic() - last >= progress_s:
      last = time.monotonic()
      print(_progress(done, len(paths), len(bad), start), file=sys.stderr,
            flush=True)

  if workers == 0:
    for chunk in chunks:
      report((len(chunk), check_chunk(chunk)))
  else:
    # spawn: this process has imported JAX (threads), which fork would copy.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, context) as pool:
      for chunk, found in zip(chunks, pool.map(check_chunk, chunks)):
        report((len(chunk), found))
  if progress_s is not None:
    print(_progress(done, len(paths), len(bad), start), file=sys.stderr,
          flush=True)
  return bad


def check_tree(root: str, workers: int = -1,
               progress_s: float = 5.0) -> Tuple[Dict[str, str], List[str]]:
  """``(bad files, empty classes)`` of the ``folder:`` tree at ``root``.

  Raises:
    DataError: ``root`` is not a directory, or its listing loops.
  """
  if not os.path.isdir(root):
    raise DataError(f"--data={root}: no such directory; point it at a tree "
                    "PATH/<split>/<class>/*.jpg.")
  tree = folders.scan.__wrapped__(root)   # fresh: the files as they are now
  paths = [p for split in sorted(tree.splits) for p in tree.splits[split][0]]
  if not paths:
    raise DataError(f"--data={root} holds no images: expected "
                    "PATH/<split>/<class>/*.jpg|*.jpeg|*.png.")
  print(f"{root}: {len(paths):,} files in {len(tree.splits)} split(s), "
        f"{len(tree.classes)} classes", file=sys.stderr, flush=True)
  return check_files(paths, workers, progress_s), list(tree.empty_classes)


def _write_report(bad: Dict[str, str], empty: List[str],
                  report: Optional[str]) -> None:
  lines = [f"{image_files.printable(p)}\t{r}" for p, r in sorted(bad.items())]
  lines += [f"class {name}\tno image in any split" for name in empty]
  text = "".join(line + "\n" for line in lines)
  if report:
    with open(report, "w", encoding="utf-8") as f:
      f.write(text)
  else:
    sys.stdout.write(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command; returns its exit status."""
  parser = argparse.ArgumentParser(
      prog="ir2net-check-data", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True,
                      help="the tree: PATH or folder:PATH")
  parser.add_argument("--workers", type=int, default=-1,
                      help="processes; -1: one per core, 0: none")
  parser.add_argument("--report", default="",
                      help="write the bad files here (TSV) instead of "
                      "printing them")
  args = parser.parse_args(argv)
  root = args.data.removeprefix(folders.FOLDER_PREFIX)
  try:
    bad, empty = check_tree(os.path.realpath(os.path.expanduser(root)),
                            args.workers)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _write_report(bad, empty, args.report)
  verdict = ("every file is good" if not bad else
             f"{len(bad)} bad file(s)" + (f", listed in {args.report}"
                                           if args.report else ""))
  print(verdict + (f"; {len(empty)} empty class(es)" if empty else ""),
        file=sys.stderr)
  return 1 if bad or empty else 0


def run() -> None:
  """The ``ir2net-check-data`` console script."""
  sys.exit(main())


if __name__ == "__main__":
  run()
