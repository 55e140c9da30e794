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
(quality ``--quality``; PNGs stay PNG); the others copied byte for byte,
once the copy is checked to decode (``image_files.verify``). Files other
than images are left out, as the ``folder:`` reader ignores them.
Orientation tags are dropped, which the reader ignores too.

Bad files: every input file is read through ``image_files.read_file``
(a FIFO, a device, a dangling link, an empty file is refused at once, never
opened for reading) and must decode; one that does not is not written, and
is listed with why in the summary (``N bad``; exit status 1). The rest are
written.

Paths are compared as real paths (links resolved): an output that is the
input tree or lies in it (or in one of its class folders, or reaches into
it through a link), or an input that lies in the output, is refused before
anything is written. One run at a time writes an output (a lock on it).

Resuming: each file is written under ``NAME.partial-PID`` and renamed, and
files already in the output are kept, so an interrupted run resumes where
it stopped. The output records what made it in ``.ir2net-preresize.json``
(``shorter_side``, ``quality``, the format of the files): a run with other
parameters is refused, naming both; ``--redo`` first removes the files the
input would make there and writes them anew (the ``folder:`` reader lists
only images in class folders: the record at the root is not read as data).
An output that holds files but no record (an older version's, or something
else) is refused the same way. SIGTERM or SIGINT stops the workers (each
removes the file it was writing) and exits with status 128 + the signal's
number; ``*.partial-*`` files that a killed run (SIGKILL) left are removed
when the next run starts.
"""

import argparse
import concurrent.futures
import contextlib
import ctypes
import fcntl
import functools
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from absl import logging
from PIL import Image

from ir2net_jax.data.shared import folders, image_files

__all__ = ["FORMAT", "RECORD", "Report", "Stopped", "resized_size",
           "preresize_file", "preresize_tree", "main", "run"]

RECORD = ".ir2net-preresize.json"
# The files' format: bump it when a change makes other files from the same
# input and parameters (an output of another format is refused).
FORMAT = 1
_PARTIAL = ".partial-"
_PARTIAL_NAME = re.compile(r"\.partial-\d+$")
_STOP_S = 5.0   # how long a worker has to stop after SIGTERM
_KEEP_MODES = ("L", "RGB", "RGBA", "LA", "CMYK")   # saved as they are

_partial: Optional[str] = None   # the file this process is writing


class Report(NamedTuple):
  """What ``preresize_tree`` did.

  Attributes:
    counts: how many files were 'resized', 'copied', 'kept' (in the output
      already) and 'bad' (not written).
    bad: ``{input path: what is wrong}`` of the bad files.
  """
  counts: Dict[str, int]
  bad: Dict[str, str]


class Stopped(BaseException):
  """SIGTERM or SIGINT arrived; the workers were stopped."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(f"stopped by {signal.Signals(signum).name}")


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


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _write(target: str, write: Callable[[str], None]) -> None:
  """``write(partial)``, then ``partial`` renamed to ``target``; nothing is
  left under the partial name if either fails or a signal stops it."""
  global _partial
  partial = f"{target}{_PARTIAL}{os.getpid()}"
  _partial = partial
  try:
    write(partial)
    os.replace(partial, target)
  except BaseException:
    _remove(partial)
    raise
  finally:
    _partial = None


def _copy_checked(encoded: bytes, source: str, partial: str) -> None:
  """Writes ``encoded`` to ``partial`` and decodes what was written.

  Raises:
    BadImage: naming ``source``; the copy does not decode.
  """
  with open(partial, "wb") as f:
    f.write(encoded)
  reason = image_files.verify(partial)
  if reason is not None:
    raise image_files.BadImage(source, reason)


def _resized(encoded: bytes, source: str,
             size: Tuple[int, int]) -> Tuple[Image.Image, str]:
  """``(the image resized to size, 'JPEG' or 'PNG' to save it as)``: one
  decode, JPEGs at the smallest DCT scale that keeps ``size``.

  Raises:
    BadImage: naming ``source``; it does not decode.
  """
  try:
    with warnings.catch_warnings():   # image_size checked our own cap
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(encoded), formats=image_files.FORMATS)
    with image:
      kind = "JPEG" if image.format == "JPEG" else "PNG"
      if kind == "JPEG":
        image.draft(image.mode, size)
      if image.mode.startswith("I") or image.mode == "F":
        image = Image.fromarray(image_files.to_rgb(image))   # 16-bit grey
      elif image.mode not in _KEEP_MODES:
        image = image.convert("RGBA" if "transparency" in image.info
                              else "RGB")
      return image.resize(size, Image.Resampling.BILINEAR), kind
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise image_files.BadImage(source, image_files.describe_error(e)) from None


def _save(image: Image.Image, kind: str, quality: int, source: str,
          partial: str) -> None:
  try:
    image.save(partial, format=kind,
               **({"quality": quality} if kind == "JPEG" else {}))
  except ValueError as e:   # a mode the format cannot hold
    raise image_files.BadImage(source, f"cannot be saved as {kind} ({e})"
                               ) from None


def preresize_file(source: str, target: str, shorter_side: int,
                   quality: int) -> str:
  """Writes ``source`` to ``target`` with its shorter side at most N.

  Returns:
    'resized', 'copied' (small enough already; the copy checked to decode)
    or 'kept' (``target`` exists).

  Raises:
    BadImage: ``source`` is not a readable image; nothing was written.
    OSError: ``target`` cannot be written.
  """
  if os.path.exists(target):
    return "kept"
  encoded = image_files.read_file(source)
  height, width = image_files.image_size(encoded, source)
  size = resized_size(width, height, shorter_side)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  if size is None:
    _write(target, functools.partial(_copy_checked, encoded, source))
    return "copied"
  image, kind = _resized(encoded, source, size)
  _write(target, functools.partial(_save, image, kind, quality, source))
  return "resized"


def _one(name: str, source: str, target: str, shorter_side: int,
         quality: int) -> Tuple[str, str, str]:
  """``(name, outcome, why)`` of :func:`preresize_file` on ``name``
  (relative): outcome 'bad' where the input is not a readable image."""
  try:
    return name, preresize_file(os.path.join(source, name),
                                os.path.join(target, name), shorter_side,
                                quality), ""
  except image_files.BadImage as e:
    return name, "bad", e.reason


def _worker_stop(signum: int, frame) -> None:
  """A worker's SIGTERM: the file it was writing removed, then it ends."""
  del frame
  if _partial is not None:
    _remove(_partial)
  os._exit(128 + signum)  # pylint: disable=protected-access


def _worker_start(parent: int) -> None:
  """Each worker: SIGTERM handled by ``_worker_stop``; SIGINT (Ctrl-C
  reaches the whole process group) left to the parent, which stops the
  workers; the parent's death (SIGKILL) sends SIGTERM (Linux)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, _worker_stop)
  if sys.platform.startswith("linux"):
    try:
      ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
      pass
  if os.getppid() != parent:   # it died before prctl
    _worker_stop(signal.SIGTERM, None)


def _stop_workers(pool: concurrent.futures.ProcessPoolExecutor) -> None:
  """SIGTERM to every worker (each removes the file it was writing), then
  SIGKILL to one still running after ``_STOP_S`` (its partial file is
  removed by the next run)."""
  # The executor offers no way to stop running tasks before Python 3.14.
  workers = list((pool._processes or {}).values())  # pylint: disable=protected-access
  for worker in workers:
    if worker.is_alive():
      worker.terminate()
  deadline = time.monotonic() + _STOP_S
  for worker in workers:
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
      worker.kill()
      worker.join()
  pool.shutdown(wait=False, cancel_futures=True)


def _pool(workers: Optional[int]
          ) -> Optional[concurrent.futures.ProcessPoolExecutor]:
  if workers is None:
    workers = os.cpu_count() or 1
  if not workers:
    return None
  # Spawned, not forked: the parent may have imported JAX.
  return concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"),
      initializer=_worker_start, initargs=(os.getpid(),))


def _run(names: List[str], one: Callable, source: str, workers: Optional[int],
         log_every_s: float) -> Report:
  """``one`` of each of ``names``, in ``workers`` processes; the workers
  are stopped (``_stop_workers``) if anything stops the run."""
  counts = {"resized": 0, "copied": 0, "kept": 0, "bad": 0}
  bad = {}
  start = last_log = time.perf_counter()
  pool = _pool(workers)
  finished = False
  try:
    results = pool.map(one, names, chunksize=64) if pool else map(one, names)
    for done, (name, outcome, why) in enumerate(results, 1):
      if outcome == "bad":
        bad[os.path.join(source, name)] = why
        logging.warning("%s: %s", os.path.join(source, name), why)
      counts[outcome] += 1
      now = time.perf_counter()
      if now - last_log >= log_every_s:
        rate = done / (now - start)
        logging.info("%d of %d files, %.0f files/s, %.0f s left", done,
                     len(names), rate, (len(names) - done) / rate)
        last_log = now
    finished = True
  finally:
    if pool is not None:
      if finished:
        pool.shutdown()
      else:
        _stop_workers(pool)
  return Report(counts, bad)


def _within(path: str, folder: str) -> bool:
  return os.path.commonpath([path, folder]) == folder


def _real_paths(input_: str, output: str) -> Tuple[str, str]:
  """``(input, output)`` as real paths (links resolved).

  Raises:
    ValueError: the input is not a folder, or one lies in the other.
  """
  given = os.path.abspath(os.path.expanduser(input_))
  source = os.path.realpath(given)
  target = os.path.realpath(os.path.expanduser(output))
  if not os.path.isdir(source):
    raise ValueError(f"--input {given} is not a directory; pass the root "
                     "of a folder: tree (split/class/image).")
  shown = f"--output {output}" + (f" ({target})" if target != output else "")
  if _within(target, source):
    raise ValueError(f"{shown} is --input {source} or lies in it; choose a "
                     "directory outside it.")
  if _within(source, target):
    raise ValueError(f"--input {source} lies in {shown}; choose an --output "
                     "outside the input.")
  return source, target


def _inside(path: str, folders_: set) -> Optional[str]:
  """The folder of ``folders_`` that is ``path`` or holds it, if any."""
  while path not in folders_:
    up = os.path.dirname(path)
    if up == path:
      return None
    path = up
  return path


def _check_class_folders(source: str, target: str,
                         class_dirs: Sequence[str]) -> None:
  """Refuses an output in a class folder that is a link out of the input
  tree, or an output folder that is a link into the input's folders.

  Raises:
    ValueError: naming both folders.
  """
  inputs = {source} | {os.path.realpath(os.path.join(source, d))
                       for d in class_dirs}
  for d in [""] + list(class_dirs):
    out = os.path.realpath(os.path.join(target, d))
    found = _inside(out, inputs)
    if found is not None:
      raise ValueError(
          f"--output folder {os.path.join(target, d)} is {out}, which lies "
          f"in the input's folder {found} (through a link); choose an "
          "--output outside every folder of the input.")


def _listing(source: str, target: str) -> List[str]:
  """The image files of ``source``, relative, as the ``folder:`` reader
  lists them (``folders.scan``), after ``_check_class_folders``.

  Raises:
    ValueError: no image, or an output that reaches into the input.
  """
  names = sorted(os.path.relpath(path, source)
                 for paths, _ in folders.scan(source).splits.values()
                 for path in paths)
  if not names:
    raise ValueError(f"--input {source} holds no images as split/class/"
                     f"image ({', '.join(folders.IMAGE_SUFFIXES)}).")
  _check_class_folders(source, target,
                       sorted({os.path.dirname(n) for n in names}))
  return names


@contextlib.contextmanager
def _locked(target: str):
  """``target`` made and locked while the run writes it.

  Raises:
    ValueError: another run holds the lock.
  """
  os.makedirs(target, exist_ok=True)
  fd = os.open(target, os.O_RDONLY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ValueError(f"another ir2net-preresize is writing --output "
                       f"{target}; let it finish (or stop it) first"
                       ) from None
    except OSError as e:   # a file system without locks (some NFS mounts)
      logging.warning("cannot lock %s (%s): run one ir2net-preresize at a "
                      "time on it", target, e)
    yield
  finally:
    os.close(fd)


def _describe(params: Dict) -> str:
  return (f"--shorter_side={params.get('shorter_side')} "
          f"--quality={params.get('quality')} (format {params.get('format')})")


def _recorded(target: str) -> Optional[Dict]:
  """The output's record, or None where it has none.

  Raises:
    ValueError: the record cannot be read.
  """
  path = os.path.join(target, RECORD)
  try:
    with open(path) as f:
      record = json.load(f)
    if not isinstance(record, dict):
      raise ValueError("not a JSON object")
    return record
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {path} ({e}); pass --redo to write the "
                     "output anew, or choose a new --output") from None


def _check_record(target: str, params: Dict) -> bool:
  """Whether ``target`` was made with ``params`` (False: a new output).

  Raises:
    ValueError: it was made with other parameters, or holds files and no
      record.
  """
  record = _recorded(target)
  fix = ("choose a new --output, or pass --redo to remove the files the "
         "input would make there and write them anew")
  if record is None:
    others = sorted(n for n in os.listdir(target)
                    if not n.startswith(RECORD))   # nor a record's .tmp
    if others:
      raise ValueError(
          f"--output {target} holds files ({', '.join(others[:3])}"
          f"{', ...' if len(others) > 3 else ''}) but no {RECORD} saying "
          f"what made them (an older ir2net-preresize, or another program); "
          f"{fix}")
    return False
  mine = {k: record.get(k) for k in params if k != "input"}
  if mine != {k: v for k, v in params.items() if k != "input"}:
    raise ValueError(f"--output {target} was made with {_describe(record)}, "
                     f"not {_describe(params)}; {fix}")
  return True


def _remove_partials(target: str, class_dirs: Sequence[str]) -> None:
  """Removes ``*.partial-PID`` files of a killed run; they would never be
  completed."""
  removed = 0
  for d in class_dirs:
    folder = os.path.join(target, d)
    if not os.path.isdir(folder):
      continue
    for name in os.listdir(folder):
      if _PARTIAL_NAME.search(name):
        _remove(os.path.join(folder, name))
        removed += 1
  if removed:
    logging.info("removed %d partial files of an interrupted run", removed)


def _prepare(target: str, names: List[str], params: Dict,
             redo: bool) -> None:
  """Checks (or with ``redo`` clears) what ``target`` holds, removes
  partial files and writes the record."""
  same = False if redo else _check_record(target, params)
  _remove_partials(target, sorted({os.path.dirname(n) for n in names}))
  if redo:   # the record first: an interrupted redo is refused, not kept
    _remove(os.path.join(target, RECORD))
    for name in names:
      _remove(os.path.join(target, name))
  if not same:
    path = os.path.join(target, RECORD)
    with open(f"{path}.tmp", "w") as f:
      json.dump(params, f, indent=2)
    os.replace(f"{path}.tmp", path)


def preresize_tree(source: str, target: str, shorter_side: int = 256,
                   quality: int = 90, workers: Optional[int] = None,
                   log_every_s: float = 30.0, redo: bool = False) -> Report:
  """Writes the pre-resized copy of the tree ``source`` (``split/class/
  image``) to ``target``, in ``workers`` processes (None: one a core; 0:
  this process), logging files/s and the time left as it goes.

  Args:
    source: the input tree.
    target: the output; files there already are kept (see the module
      docstring), unless ``redo``.
    shorter_side: N.
    quality: JPEG quality of the resized JPEGs.
    workers: processes.
    log_every_s: seconds between progress lines.
    redo: remove the files the input would make in ``target`` and write
      them anew, whatever made them.

  Raises:
    ValueError: ``source`` is not a directory, ``target`` is it, lies in
      it or holds it, ``shorter_side`` is below 1 or ``quality`` outside
      1..95; ``target`` was made with other parameters, or another run
      writes it. Nothing was written.
    OSError: a file could not be written (no partial file is left).
  """
  source, target = _real_paths(source, target)
  if shorter_side < 1 or not 1 <= quality <= 95:
    raise ValueError(f"--shorter_side={shorter_side} must be at least 1 "
                     f"and --quality={quality} in 1..95.")
  names = _listing(source, target)
  params = {"tool": "ir2net-preresize", "format": FORMAT,
            "shorter_side": shorter_side, "quality": quality,
            "input": source}
  with _locked(target):
    _prepare(target, names, params, redo)
    one = functools.partial(_one, source=source, target=target,
                            shorter_side=shorter_side, quality=quality)
    return _run(names, one, source, workers, log_every_s)


@contextlib.contextmanager
def _stop_on_signals():
  """SIGTERM and SIGINT raise :class:`Stopped` (once: the clean-up it
  starts is not interrupted by a second one)."""
  def stop(signum, frame):
    del frame
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)
  previous = {s: signal.signal(s, stop)
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description="Copy a folder: tree with every image's shorter side at "
                  "most N pixels (faster decoding on the host). Files "
                  "already in the output are kept, so a stopped run "
                  "resumes; the output records the parameters that made it "
                  f"({RECORD}), and a run with others is refused.")
  parser.add_argument("--input", required=True,
                      help="the tree's root (split/class/image)")
  parser.add_argument("--output", required=True,
                      help="where the copy goes (files there are kept); "
                           "outside the input")
  parser.add_argument("--shorter_side", type=int, default=256)
  parser.add_argument("--quality", type=int, default=90,
                      help="JPEG quality of resized JPEGs")
  parser.add_argument("--workers", type=int, default=None,
                      help="processes (default: one a core; 0: none)")
  parser.add_argument("--redo", action="store_true",
                      help="remove the files the input would make in "
                           "--output and write them anew: for an output made "
                           "with other parameters (or by an older version)")
  return parser


def _summary(output: str, report: Report, seconds: float) -> str:
  c = report.counts
  lines = [f"wrote {output}: {c['resized']} resized, {c['copied']} copied, "
           f"{c['kept']} kept, {c['bad']} bad in {seconds:.0f} s"]
  if report.bad:
    lines.append(f"{len(report.bad)} bad files, not written (remove or "
                 "replace them in the input; ir2net-check-data lists them "
                 "too):")
    lines += [f"  {path}: {why}" for path, why in sorted(report.bad.items())]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, int]:
  """The command line; returns the counts (``Report.counts``).

  Exits with status 1 where a file was bad or could not be written, 2 for
  bad arguments, 128 + the signal's number on SIGTERM or SIGINT.
  """
  parser = _parser()
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    with _stop_on_signals():
      report = preresize_tree(args.input, args.output, args.shorter_side,
                              args.quality, args.workers, redo=args.redo)
  except ValueError as e:
    parser.error(str(e))
  except Stopped as e:
    print(f"ir2net-preresize: {e}; the workers stopped and no partial file "
          "is left: run the same command again to resume", file=sys.stderr)
    raise SystemExit(128 + e.signum) from None
  except OSError as e:
    print(f"ir2net-preresize: {e}; no partial file is left: fix it and run "
          "the same command again to resume", file=sys.stderr)
    raise SystemExit(1) from None
  print(_summary(args.output, report, time.perf_counter() - start))
  if report.bad:
    raise SystemExit(1)
  return report.counts


def run() -> None:
  """The ``ir2net-preresize`` console script: ``main`` on ``sys.argv``."""
  logging.set_verbosity(logging.INFO)
  main()


if __name__ == "__main__":
  run()
