"""``ir2net-check-data``'s speed, and what it would take on ImageNet.

  python -m ir2net_jax.tools.benchmark.check_data [--data=DIR]
      [--files=2000] [--workers=1,2] [--json]

Checks every file of a ``folder:`` tree (``--data``; default: ImageNet-like
JPEGs written here, ``benchmark.decoders.write_imagenet_like_folder``) with
the command's check (``image_files.verify``: JPEGs decoded at 1/8 scale)
and, for comparison, with a full-size decode of every file
(``image_files.decode_rgb``), with each worker count. Prints files/s, files/s
per core, and the minutes a 16-core host would take for ImageNet's
1,331,167 train and validation files at that per-core rate (decoding
scales with cores; the file system may not).
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from ir2net_jax.data.shared import folders, image_files
from ir2net_jax.tools import check_data
from ir2net_jax.tools.benchmark import decoders

__all__ = ["benchmark", "main"]

IMAGENET_FILES = 1_281_167 + 50_000
HOST_CORES = 16


def _full_decode(path: str) -> None:
  image_files.decode_rgb(image_files.read_file(path), path)


def _time(paths: Sequence[str], workers: int, full: bool) -> float:
  """Seconds to check ``paths`` (the files are in the page cache)."""
  start = time.perf_counter()
  check_data.check_files(paths, workers, progress_s=None,
                         check=_full_decode if full else image_files.verify)
  return time.perf_counter() - start


def benchmark(root: str, worker_counts: Sequence[int],
              repeats: int = 3) -> List[Dict[str, Any]]:
  """One row per (check, workers): the median of ``repeats`` passes."""
  tree = folders.scan(os.path.realpath(root))
  paths = [p for split in sorted(tree.splits) for p in tree.splits[split][0]]
  _time(paths, 0, False)   # into the page cache
  rows = []
  for full in (False, True):
    for workers in worker_counts:
      seconds = statistics.median(_time(paths, workers, full)
                                  for _ in range(repeats))
      per_core = len(paths) / seconds / max(workers, 1)
      rows.append({
          "check": "full-size decode" if full else "ir2net-check-data",
          "workers": workers, "files": len(paths),
          "files_per_s": len(paths) / seconds, "per_core": per_core,
          "imagenet_16_cores_min": IMAGENET_FILES / (per_core * HOST_CORES)
                                   / 60})
  return rows


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
  lines = ["| check | workers | files | files/s | per core | ImageNet on "
           "16 cores |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
  lines += [f"| {r['check']} | {r['workers']} | {r['files']:,} | "
            f"{r['files_per_s']:,.0f} | {r['per_core']:,.0f} | "
            f"{r['imagenet_16_cores_min']:.1f} min |" for r in rows]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", default="", help="a folder: tree to check")
  parser.add_argument("--files", type=int, default=2000,
                      help="ImageNet-like JPEGs to write without --data")
  parser.add_argument("--workers", default="1,2",
                      help="worker counts, comma-separated")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  workers = [int(w) for w in args.workers.split(",")]
  with tempfile.TemporaryDirectory() as scratch:
    root = args.data
    if not root:
      root = os.path.join(scratch, "imagenet_like")
      decoders.write_imagenet_like_folder(
          root, classes=max(1, args.files // 100), train_per_class=95,
          eval_per_class=5)
    rows = benchmark(root, workers, args.repeats)
  print(json.dumps(rows, indent=1) if args.json else format_table(rows))


if __name__ == "__main__":
  main()
