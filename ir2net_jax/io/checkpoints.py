"""A run's orbax checkpoints in its workdir: periodic, best-eval, resume, and
what is done with the ones that cannot be read.

Layout::

  workdir/checkpoints/<step>/{state,meta}   latest ones (auto-resume)
  workdir/best/<step>/{state,meta}          the best eval top-1 so far

  workdir/corrupt_checkpoints/<step>-<time>/  latest ones that could not be
                                            read, set aside on resume
  workdir/abandoned_best/<step>-<time>/     best ones of steps after the one
                                            resumed from, set aside then

``state`` is the whole ``TrainState``; ``meta`` is JSON (model, stage,
config name, eval metrics). The teacher is never saved with the student.
Stage 1, ``init_from`` and converted weights are read by
``ir2net_jax.io.weights``.

A checkpoint is read up to ``READ_TRIES`` times before it counts as
unreadable. One whose every read fails to decode is corrupt; one whose reads
fail with an I/O error (a network file system's EIO or stale handle) may be
fine, so the run stops with an error rather than set it aside.
"""

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ir2net_jax.storage import paths
from ir2net_jax.storage.paths import first_line

__all__ = ["CheckpointError", "Checkpoints", "is_step_directory", "latest_step",
           "check_fits", "restore_variables", "read_meta", "open_read_only",
           "first_line", "on_every_process"]


# Reads of a checkpoint before it counts as unreadable, and the wait before
# the first retry (doubled before each next one): a network file system's
# read errors often pass within seconds.
READ_TRIES = 3
READ_RETRY_S = 1.0

# A process's offer in _agree_on_step: it can read no step / it failed.
_NONE, _FAILED = -1, -2


class CheckpointError(ValueError):
  """A checkpoint that a run needs is missing, unreadable or does not fit."""


def _manager(directory: str, keep: int, create: bool = True,
             read_only: bool = False,
             asynchronous: bool = True) -> ocp.CheckpointManager:
  processes = ocp.options.MultiprocessingOptions()
  if read_only:
    # This process alone: orbax ends each restore that succeeds with a
    # barrier of all processes, which hangs when they read different steps.
    me = jax.process_index()
    processes = ocp.options.MultiprocessingOptions(primary_host=me,
                                                   active_processes={me})
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, read_only=read_only,
      enable_async_checkpointing=asynchronous,
      multiprocessing_options=processes)
  return ocp.CheckpointManager(paths.as_path(directory), options=options)


class Checkpoints:
  """The run's latest and best checkpoints (asynchronous saves).

  Args:
    workdir: the run's directory.
    keep: how many of the latest checkpoints to keep.
  """

  def __init__(self, workdir: str, keep: int = 2):
    self.workdir = paths.resolve(workdir)
    self.latest = _manager(paths.join(self.workdir, "checkpoints"), keep)
    # Saved synchronously, after the latest one has finished: two async
    # managers writing the same arrays at once race in orbax.
    self.best = _manager(paths.join(self.workdir, "best"), 1,
                         asynchronous=False)

  def save(self, step: int, state: Any, meta: Dict[str, Any],
           best: bool = False) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta))
    if step not in self.latest.all_steps():
      self.latest.save(step, args=args)
    if best:
      self.latest.wait_until_finished()
      self.best.save(step, args=args)

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def step_path(self, step: int) -> str:
    """The directory of the latest-checkpoint at ``step``."""
    return _step_path(self.latest, step)

  def restore(self, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
    """Restores the newest checkpoint that every process can read into
    ``abstract_state``'s structure (host-local arrays: each process reads
    its own copy).

    Each process reads its newest readable checkpoint (``_restore_newest``:
    a corrupt one, truncated or missing files or values that are not
    finite, which a run never saves, is reported with its path), then the
    processes agree on the newest step all of them read
    (``_agree_on_step``). Only then does process 0 move the checkpoints of
    later steps aside, to ``workdir/corrupt_checkpoints/<step>-<time>``, so
    that the run can save those steps again, and the best ones of later
    steps to ``workdir/abandoned_best/<step>-<time>`` (``_set_aside``).
    After that, the returned ``meta['best']`` is the best that ``best/``
    holds (none: no ``'best'``), so that every later best is saved there.

    Raises:
      CheckpointError: when no step can be read by every process (they are
        left where they are, for a look), or a read failed with an I/O
        error (nothing is moved).
    """
    reader = open_read_only(self.latest.directory)

    def restore(step):
      restored = reader.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
      _check_finite(restored.state)
      return restored

    read = {}   # this process's last read, {step: restored}

    def newest_at_most(bound):
      if bound not in read:
        read.clear()
        step, restored, _ = _restore_newest(reader, restore, at_most=bound)
        read.update({} if step is None else {step: restored})
      return max(read, default=None)

    try:
      step = _agree_on_step(newest_at_most)
    finally:
      reader.close()
    if step is None:
      raise CheckpointError(
          f"none of the checkpoints in {self.latest.directory} (steps "
          f"{sorted(self.latest.all_steps())}) can be read; see the warnings "
          f"above. Move them out of the way to train from the start, or use "
          f"a new --workdir.")
    restored = read[step]
    newer = [s for s in self.latest.all_steps() if s > step]
    abandoned = [s for s in self.best.all_steps() if s > step]
    self._set_aside(step, restored.meta.get("best", {}).get("step"))
    if newer:
      logging.warning("resuming from the checkpoint at step %d, the newest "
                      "readable one", step)
    if not abandoned:
      return restored.state, restored.meta
    meta = {k: v for k, v in restored.meta.items() if k != "best"}
    kept = self.best.latest_step()
    best = (None if kept is None
            else read_meta(self.best.directory, kept).get("best"))
    if best is not None:
      meta["best"] = best
    logging.warning("best/ held the steps %s, after step %d; the run's best is "
                    "now %s", abandoned, step, best or "none")
    return restored.state, meta

  def _set_aside(self, step: int, best_step: Optional[int]) -> None:
    """Moves the checkpoints of steps after ``step`` out of
    ``checkpoints/`` (a process cannot read them) and ``best/`` (the run no
    longer has those steps); process 0 moves, the others wait.

    When ``best/`` then lacks the run's best and that is ``step`` (whose
    checkpoint is the same), ``checkpoints/<step>`` is copied there.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if jax.process_index() == 0:
      for manager, aside, what in (
          (self.latest, "corrupt_checkpoints", "unreadable checkpoint"),
          (self.best, "abandoned_best", "best checkpoint")):
        for later in manager.all_steps():
          if later > step:
            target = paths.join(self.workdir, aside, f"{later}-{stamp}")
            paths.move(_step_path(manager, later), target)
            logging.warning("moved the %s of step %d, after step %d, to %s",
                            what, later, step, target)
      self.best.reload()
      if best_step == step and step not in self.best.all_steps():
        paths.copytree(self.step_path(step),
                       paths.join(str(self.best.directory), str(step)))
        logging.warning("copied the checkpoint of step %d, the run's best, "
                        "to %s", step, self.best.directory)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoints set aside")
    self.latest.reload()
    self.best.reload()

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _check_finite(state: Any) -> None:
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
      raise ValueError(f"{jax.tree_util.keystr(path)} is not finite")


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return str(ocp.step.standard_name_format().find_step(
      manager.directory, step).path)


# What tensorstore (absl status codes, curl) and the bucket clients (HTTP
# status, aiohttp) say of a storage server that failed to answer, which may
# pass: not a missing object or bytes that do not decode.
_TRANSIENT_STORAGE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                      "retry attempts failed", "http_response_code='5",
                      "http_response_code='429'",
                      "HTTP response code: 5", "HTTP response code: 429",
                      "CURL error", "Connection reset", "Connection refused",
                      "Server disconnected", "ServerDisconnectedError",
                      "Too Many Requests", "Service Unavailable")


def _is_io_error(error: BaseException) -> bool:
  """Whether ``error``, or one it was raised from, is the operating system's
  failure to read a file (EIO, a stale handle, a timeout, a permission) or
  a storage server's failure to answer (HTTP 429 and 5xx, a dropped
  connection), which may pass, rather than a missing file or bytes that do
  not decode."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error)
    if isinstance(error, OSError) and not isinstance(
        error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
      return True
    # TensorStore reports an OS error as a ValueError "... [OS error: ...]".
    if "[OS error: " in text and "No such file" not in text:
      return True
    code = getattr(error, "code", None)   # gcsfs.retry.HttpError
    if isinstance(code, int) and (code == 429 or 500 <= code < 600):
      return True
    if any(s in text or s in type(error).__name__
           for s in _TRANSIENT_STORAGE):
      return True
    error = error.__cause__ or error.__context__
  return False


def _read(restore: Callable[[int], Any], step: int,
          path: str) -> Tuple[Any, Optional[Exception]]:
  """``restore(step)``, tried up to ``READ_TRIES`` times.

  Returns:
    ``(restored, None)``, or ``(None, the last error)`` when every try
    failed and none with an I/O error: the checkpoint is corrupt.

  Raises:
    CheckpointError: as ``restore`` does (not tried again), or when no try
      succeeded and one failed with an I/O error.
  """
  errors = []
  for tries in range(1, READ_TRIES + 1):
    try:
      restored = restore(step)
    except CheckpointError:  # readable, but not what the run needs
      raise
    except Exception as e:  # orbax, tensorstore and json raise many types
      errors.append(e)
      if tries < READ_TRIES:
        time.sleep(READ_RETRY_S * 2 ** (tries - 1))
      continue
    if errors:
      logging.warning("read the checkpoint %s on try %d of %d, after %s: a "
                      "transient read error; nothing was moved", path, tries,
                      READ_TRIES, _describe(errors[-1]))
    return restored, None
  io_errors = [e for e in errors if _is_io_error(e)]
  if io_errors:
    raise CheckpointError(
        f"cannot read the checkpoint {path}: {READ_TRIES} tries failed with "
        f"an I/O error ({_describe(io_errors[-1])}). Nothing was moved: the "
        f"checkpoint may be fine, so no older one is taken in its place. "
        f"Check the file system that holds the workdir, then start again."
    ) from io_errors[-1]
  return None, errors[-1]


def _describe(error: Exception) -> str:
  return f"{type(error).__name__}: {first_line(error)}"


def _restore_newest(manager: ocp.CheckpointManager,
                    restore: Callable[[int], Any],
                    at_most: Optional[int] = None
                    ) -> Tuple[Optional[int], Any, List[int]]:
  """``restore(step)`` of the newest step (no later than ``at_most``) that
  is not corrupt (``_read``).

  Returns:
    ``(step, restored, corrupt)``: the steps tried before ``step`` were
    corrupt (each reported); ``(None, None, corrupt)`` when every one was.

  Raises:
    CheckpointError: as ``_read`` does.
  """
  corrupt = []
  for step in sorted(manager.all_steps(), reverse=True):
    if at_most is not None and step > at_most:
      continue
    path = _step_path(manager, step)
    restored, error = _read(restore, step, path)
    if error is None:
      return step, restored, corrupt
    logging.warning("cannot read the checkpoint %s (%s): it failed in %d "
                    "tries, none with an I/O error: it is corrupt; trying "
                    "the one before it", path, _describe(error), READ_TRIES)
    corrupt.append(step)
  return None, None, corrupt


def _gather(offer: int) -> List[int]:
  """Every process's ``offer``, in process order."""
  if jax.process_count() == 1:
    return [offer]
  return [int(x) for x in multihost_utils.process_allgather(np.int32(offer))]


def _offers(offer_fn: Callable[[], int], failure: str,
            gather: Callable[[int], List[int]] = _gather) -> List[int]:
  """Every process's ``offer_fn()`` (an int of at least -1), in process
  order; where it raised on any process, raises on every one: that
  process's own error there, a CheckpointError naming the process(es) and
  ``failure`` on the others, so that no process waits at the next
  collective for one that stopped."""
  error = None
  try:
    offer = offer_fn()
  except Exception as e:  # raised below, once every process knows
    error, offer = e, _FAILED
  offers = gather(offer)
  if error is not None:
    raise error
  failed = [i for i, o in enumerate(offers) if o == _FAILED]
  if failed:
    raise CheckpointError(f"process(es) {failed} {failure}")
  return offers


def on_every_process(fn: Callable[[], Any], failure: str,
                     gather: Callable[[int], List[int]] = _gather) -> Any:
  """``fn()``, which every process of a run calls, stopping them all where
  it fails on any (see :func:`_offers`; ``failure`` completes the message
  the others raise, e.g. 'could not read the teacher (see their logs)').
  On one process it is ``fn()``."""
  result = None

  def succeed() -> int:
    nonlocal result
    result = fn()
    return 0
  _offers(succeed, failure, gather)
  return result


def _agree_on_step(newest_at_most: Callable[[Optional[int]], Optional[int]],
                   gather: Callable[[int], List[int]] = _gather
                   ) -> Optional[int]:
  """The newest step that every process can read (None: there is none).

  In each round every process offers its newest readable step no later than
  the smallest offer of the round before (in the first, any step); the
  rounds end when all offers are equal. No offer is ever below the newest
  step all can read, so that is where they end. One round on one process.

  Args:
    newest_at_most: ``bound -> step``: this process's newest readable step
      no later than ``bound`` (None: any), or None if there is none.
    gather: ``offer -> offers``: every process's offer (a step, -1 for
      none, -2 for a failure), in process order.

  Raises:
    what ``newest_at_most`` raised on this process, and CheckpointError on
    the others, once every process knows.
  """
  bound = None
  while True:
    def offer(bound=bound):
      step = newest_at_most(bound)
      return _NONE if step is None else step
    offers = _offers(offer, "could not read the checkpoints (see their "
                     "logs); nothing was moved", gather)
    bound = min(offers)
    if bound == max(offers):
      return None if bound == _NONE else bound


def open_read_only(directory: str) -> ocp.CheckpointManager:
  """A manager that reads ``directory``'s steps on this process alone (close
  it after use)."""
  return _manager(directory, None, create=False, read_only=True)


def is_step_directory(directory: str) -> bool:
  """Whether ``directory`` holds orbax step directories (``<step>/`` with
  ``state`` and ``meta``): ``workdir/checkpoints`` or ``workdir/best``."""
  return any(name.isdigit() and paths.isdir(paths.join(directory, name,
                                                      "state"))
             for name in paths.listdir(directory))


def latest_step(directory: str) -> Optional[int]:
  """The newest step in a checkpoint directory (``workdir/checkpoints`` or
  ``workdir/best``), None if it is missing or empty; reads no arrays."""
  if not paths.isdir(directory):
    return None
  manager = open_read_only(directory)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def check_fits(saved: Any, abstract: Any, what: str, model: str) -> None:
  """Raises CheckpointError unless ``saved`` (arrays or metadata of
  ``{'params', 'batch_stats'}``) has ``abstract``'s names and shapes.

  Args:
    saved: the checkpoint's variables (anything with ``.shape``).
    abstract: the model's variables (``jax.ShapeDtypeStruct`` or arrays).
    what: the checkpoint, as the message names it.
    model: the model, as the message names it.
  """
  flat = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape) for p, x in
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, want = flat(saved), flat(abstract)
  if got == want:
    return
  problems = ([f"{k}: {got[k]} in the checkpoint, {want[k]} in the model"
               for k in sorted(got.keys() & want.keys()) if got[k] != want[k]]
              + [f"{k} only in the model" for k in sorted(want.keys() - got.keys())]
              + [f"{k} only in the checkpoint"
                 for k in sorted(got.keys() - want.keys())])
  raise CheckpointError(
      f"{what} does not fit {model}: {len(problems)} variables differ in "
      f"names or shapes, e.g. {'; '.join(problems[:3])}. Is it a checkpoint "
      f"of another model, variant, stage or number of classes?")


def restore_variables(directory: str, abstract_variables: Any, model: str
                      ) -> Tuple[int, Dict[str, Any]]:
  """Params and BatchNorm statistics of the newest readable checkpoint in
  ``directory`` (``workdir/checkpoints`` or ``workdir/best``); read only.

  Args:
    directory: the checkpoint directory.
    abstract_variables: ``{'params', 'batch_stats'}`` of the model
      (arrays or ``jax.ShapeDtypeStruct``), to check the restored ones
      against and cast them to.
    model: the model's name, for the error message.

  Returns:
    ``(step, variables)``, on this process's first device.

  Raises:
    CheckpointError: no checkpoint in ``directory``, none readable, or one
      that does not fit the model (naming both).
  """
  manager = open_read_only(directory)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def restore(step):
    with ocp.StandardCheckpointer() as ckptr:
      saved = ckptr.metadata(paths.join(_step_path(manager, step), "state")
                             ).item_metadata.tree
    check_fits({"params": saved["params"],
                "batch_stats": saved["batch_stats"]}, abstract_variables,
               f"the checkpoint {directory} (step {step})", model)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        saved)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract))).state
    variables = {"params": state["params"],
                 "batch_stats": state["batch_stats"]}
    _check_finite(variables)
    return variables

  try:
    if manager.latest_step() is None:
      raise CheckpointError(f"there is no checkpoint in {directory}")
    step, variables, corrupt = _restore_newest(manager, restore)
  finally:
    manager.close()
  if step is None:
    raise CheckpointError(f"none of the checkpoints in {directory} (steps "
                          f"{sorted(corrupt)}) can be read; see the "
                          f"warnings above")
  return step, jax.tree.map(lambda x, a: x.astype(a.dtype), variables,
                            abstract_variables)


def read_meta(directory: str, step: int) -> Dict[str, Any]:
  """The JSON metadata (model, stage, name, eval metrics) saved with
  ``step`` in a checkpoint directory."""
  manager = open_read_only(directory)
  try:
    return manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta
  finally:
    manager.close()
