"""What a run does with image files that cannot be read: the
``bad_examples`` policy, the check before training, and the tally.

``config.bad_examples``:

* ``'skip'`` (the default): the run goes on without them. Each bad file is
  logged once with its path and what is wrong; the count of distinct bad
  files goes to TensorBoard (``data_bad_files``) and ``summary.json``; the
  run stops once more than ``config.max_bad_fraction`` of a split is bad
  (1%: a broken copy of the data, not a few bad downloads). A train example
  that fails to read is replaced by the next good one of its epoch's order
  and augmented with its own draws, so a resumed run reads exactly what an
  uninterrupted one reads. An eval example that fails is left out of the
  accuracy (its ``mask`` is 0).
* ``'error'``: the first bad file stops the run with its path, what is
  wrong and the fix: before training where the listing finds it, else
  where it is read.

Either way, never a decoder's traceback mid-epoch without the file's name.
"""

import dataclasses
import os
import threading
from typing import Callable, Dict, Iterable, Optional

from absl import logging

from ir2net_jax.data.shared import image_files
from ir2net_jax.data.shared.specs import DataError

__all__ = ["POLICIES", "Policy", "read_policy", "check_listing", "Tally",
           "is_bad_data", "reason"]

POLICIES = ("skip", "error")
DEFAULT_MAX_FRACTION = 0.01
_SHOWN = 10   # problems named in one error


@dataclasses.dataclass(frozen=True)
class Policy:
  """``config.bad_examples`` and ``config.max_bad_fraction``."""
  mode: str = "skip"
  max_fraction: float = DEFAULT_MAX_FRACTION

  @property
  def skip(self) -> bool:
    return self.mode == "skip"


def read_policy(config) -> Policy:
  """The policy of ``config`` (missing fields take the defaults).

  Raises:
    DataError: an unknown policy or a fraction outside [0, 1].
  """
  mode = config.get("bad_examples") or "skip"
  if mode not in POLICIES:
    raise DataError(f"bad_examples={mode!r} is not one of {POLICIES} "
                    "(--config.bad_examples=skip or error).")
  fraction = config.get("max_bad_fraction")
  fraction = DEFAULT_MAX_FRACTION if fraction is None else float(fraction)
  if not 0 <= fraction <= 1:
    raise DataError(f"max_bad_fraction={fraction} must lie in [0, 1].")
  return Policy(mode, fraction)


def is_bad_data(error: BaseException) -> bool:
  """Whether ``error``, raised while reading or decoding one example, means
  a bad file (not a bug of ours, not a full host: MemoryError and
  interrupts are passed on)."""
  if isinstance(error, image_files.BadImage):
    return True
  return isinstance(error, Exception) and not isinstance(
      error, (MemoryError, DataError))


def reason(name: str) -> str:
  """What is wrong with a file an engine could not read (read again here,
  once per file: the engine's batch names only the file). ``name`` is a
  path, or an example's name in an ArrayRecord file."""
  if name.startswith(os.sep):
    return image_files.verify(name) or "failed to decode in the recipe"
  return "failed to decode"


def _listed(problems: Dict[str, str]) -> str:
  shown = [f"  {image_files.printable(p)}: {r}"
           for p, r in sorted(problems.items())[:_SHOWN]]
  more = len(problems) - len(shown)
  return "\n".join(shown + ([f"  ... and {more} more"] if more > 0 else []))


def check_listing(where: str, problems: Dict[str, str], num_examples: int,
                  policy: Policy, empty_classes: Iterable[str] = ()) -> None:
  """The check before training, of what a listing found.

  Args:
    where: the data set, for messages.
    problems: ``{path: what is wrong}``.
    num_examples: files listed, all splits.
    policy: the run's.
    empty_classes: classes with no image.

  Raises:
    DataError: under 'error', any problem or empty class; under 'skip',
      more than ``max_fraction`` of the files bad.
  """
  empty = sorted(empty_classes)
  if policy.mode == "error" and (problems or empty):
    parts = []
    if problems:
      parts.append(f"{len(problems)} file(s) that cannot be images:\n"
                   + _listed(problems))
    if empty:
      parts.append(f"class folder(s) with no image in any split: {empty}")
    raise DataError(
        f"{where} has " + "; and ".join(parts) + "\nRemove or replace them, "
        "or pass --config.bad_examples=skip to train without them.")
  for name in empty:
    logging.warning("%s: class %r has no image in any split; it keeps its "
                    "label and is never seen", where, name)
  if problems:
    logging.warning("%s: %d file(s) will be skipped (bad_examples=skip):\n%s",
                    where, len(problems), _listed(problems))
  _check_fraction(where, len(problems), num_examples, policy, problems)


def _check_fraction(where: str, bad: int, total: int, policy: Policy,
                    problems: Optional[Dict[str, str]] = None) -> None:
  if total and bad > policy.max_fraction * total:
    raise DataError(
        f"{where}: {bad} of {total} files are bad, more than "
        f"max_bad_fraction={policy.max_fraction} of them"
        + (":\n" + _listed(problems) if problems else "")
        + "\nCheck the copy of the data (ir2net-check-data lists every bad "
        "file), or raise --config.max_bad_fraction.")


class Tally:
  """The distinct bad files a run met, each logged once; stops the run once
  the bad files of one split (its listing's and those met reading it) pass
  the policy's share of it. Thread-safe.

  Args:
    where: the data set, for messages.
    policy: the run's.
  """

  def __init__(self, where: str, policy: Policy):
    self.where, self.policy = where, policy
    self.found: Dict[str, str] = {}
    self._in_split: Dict[str, int] = {}   # split -> its bad files
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.found)

  def preload(self, problems: Dict[str, str],
              split_of: Callable[[str], str] = lambda name: "") -> "Tally":
    """Counts the files a listing found (logged by :func:`check_listing`),
    each in the split ``split_of(path)`` names."""
    with self._lock:
      for name, reason in problems.items():
        if name not in self.found:
          self.found[name] = reason
          split = split_of(name)
          self._in_split[split] = self._in_split.get(split, 0) + 1
    return self

  def add(self, name: str, reason: str, split: str, split_size: int) -> None:
    """Records one bad file of ``split`` (logged the first time).

    Raises:
      DataError: past ``max_fraction`` of ``split_size``.
    """
    with self._lock:
      if name in self.found:
        return
      self.found[name] = reason
      count = len(self.found)
      self._in_split[split] = in_split = self._in_split.get(split, 0) + 1
    logging.warning("skipped %s: %s (bad_examples=skip; %d bad file(s) so "
                    "far)", image_files.printable(name), reason, count)
    _check_fraction(f"{self.where} {split!r}", in_split, split_size,
                    self.policy)
