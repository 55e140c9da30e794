"""Orbax checkpoints in the workdir: periodic, best-eval, resume, stage 1,
and converted weights.

Layout::

  workdir/checkpoints/<step>/{state,meta}   latest ones (auto-resume)
  workdir/best/<step>/{state,meta}          the best eval top-1 so far

  workdir/corrupt_checkpoints/<step>-<time>/  latest ones that could not be
                                            read, set aside on resume

``state`` is the whole ``TrainState``; ``meta`` is JSON (model, stage,
config name, eval metrics). The teacher is never saved with the student.
Converted weights (``python -m ir2net_jax.convert``) are one orbax
checkpoint of ``{params, batch_stats}``, read by ``restore_converted``.
"""

import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ir2net_jax import convert

__all__ = ["CheckpointError", "Checkpoints", "is_step_directory", "latest_step",
           "check_fits", "restore_variables", "read_meta", "restore_converted",
           "stage1_directory", "check_stage1", "restore_stage1_variables"]


class CheckpointError(ValueError):
  """A checkpoint that a run needs is missing or does not fit it."""


def _manager(directory: str, keep: int, create: bool = True,
             read_only: bool = False,
             asynchronous: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, read_only=read_only,
      enable_async_checkpointing=asynchronous)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpoints:
  """The run's latest and best checkpoints (asynchronous saves).

  Args:
    workdir: the run's directory.
    keep: how many of the latest checkpoints to keep.
  """

  def __init__(self, workdir: str, keep: int = 2):
    self.workdir = workdir
    self.latest = _manager(os.path.join(workdir, "checkpoints"), keep)
    # Saved synchronously, after the latest one has finished: two async
    # managers writing the same arrays at once race in orbax.
    self.best = _manager(os.path.join(workdir, "best"), 1, asynchronous=False)

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
    """Restores the newest *readable* checkpoint into ``abstract_state``'s
    structure.

    A checkpoint that cannot be read (truncated or missing files, or values
    that are not finite, which a run never saves) is reported with its path
    and moved aside to ``workdir/corrupt_checkpoints/<step>-<time>``, so that
    the run can save that step again; the next older one is tried.

    Raises:
      CheckpointError: when no checkpoint can be read (they are left where
        they are, for a look).
    """
    def restore(step):
      restored = self.latest.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
      _check_finite(restored.state)
      return restored

    step, restored, corrupt = _restore_newest(self.latest, restore)
    if corrupt:
      if step is None:
        raise CheckpointError(
            f"none of the checkpoints in {self.latest.directory} (steps "
            f"{sorted(corrupt)}) can be read; see the warnings above. Move "
            f"them out of the way to train from the start, or use a new "
            f"--workdir.")
      self._set_aside(corrupt)
      logging.warning("resuming from the checkpoint at step %d, the newest "
                      "readable one", step)
    return restored.state, restored.meta

  def _set_aside(self, steps: List[int]) -> None:
    """Moves unreadable checkpoints out of ``checkpoints/`` (host 0 moves)."""
    aside = os.path.join(self.workdir, "corrupt_checkpoints")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}-{stamp}")
        os.replace(self.step_path(step), target)
        logging.warning("moved the unreadable checkpoint of step %d to %s",
                        step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoints set aside")
    self.latest.reload()

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


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else ""


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return str(ocp.step.standard_name_format().find_step(
      manager.directory, step).path)


def _restore_newest(manager: ocp.CheckpointManager,
                    restore: Callable[[int], Any]
                    ) -> Tuple[Optional[int], Any, List[int]]:
  """``restore(step)`` of the newest step it succeeds on.

  Returns:
    ``(step, restored, unreadable)``: the steps newer than ``step`` that
    could not be read (each reported), and ``(None, None, all steps)``
    when none could.
  """
  unreadable = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return step, restore(step), unreadable
    except CheckpointError:  # readable, but not what the run needs
      raise
    except Exception as e:  # orbax, tensorstore and json raise many types
      logging.warning("cannot read the checkpoint %s (%s: %s); trying the "
                      "one before it", _step_path(manager, step),
                      type(e).__name__, _first_line(e))
      unreadable.append(step)
  return None, None, unreadable


def _read_only(directory: str) -> ocp.CheckpointManager:
  return _manager(directory, None, create=False, read_only=True)


def is_step_directory(directory: str) -> bool:
  """Whether ``directory`` holds orbax step directories (``<step>/`` with
  ``state`` and ``meta``): ``workdir/checkpoints`` or ``workdir/best``."""
  return os.path.isdir(directory) and any(
      name.isdigit() and os.path.isdir(os.path.join(directory, name, "state"))
      for name in os.listdir(directory))


def latest_step(directory: str) -> Optional[int]:
  """The newest step in a checkpoint directory (``workdir/checkpoints`` or
  ``workdir/best``), None if it is missing or empty; reads no arrays."""
  if not os.path.isdir(directory):
    return None
  manager = _read_only(directory)
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
  manager = _read_only(directory)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def restore(step):
    with ocp.StandardCheckpointer() as ckptr:
      saved = ckptr.metadata(os.path.join(_step_path(manager, step), "state")
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
    step, variables, unreadable = _restore_newest(manager, restore)
  finally:
    manager.close()
  if step is None:
    raise CheckpointError(f"none of the checkpoints in {directory} (steps "
                          f"{sorted(unreadable)}) can be read; see the "
                          f"warnings above")
  return step, jax.tree.map(lambda x, a: x.astype(a.dtype), variables,
                            abstract_variables)


def stage1_directory(config, workdir: str) -> str:
  """``config.stage1_checkpoint``, or ``stage1`` beside the workdir."""
  path = config.stage1_checkpoint or os.path.join(
      os.path.dirname(os.path.abspath(workdir)), "stage1")
  return os.path.abspath(path)


def _stage1_manager(path: str) -> ocp.CheckpointManager:
  ckpt_dir = os.path.join(path, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(
        f"stage 2 starts from the last stage-1 checkpoint, but there is no "
        f"stage-1 run at {path} (no {ckpt_dir}). Train stage 1 there first, "
        f"or pass --config.stage1_checkpoint=<stage-1 workdir>.")
  manager = _manager(ckpt_dir, None, create=False, read_only=True)
  if manager.latest_step() is None:
    raise CheckpointError(f"the stage-1 run at {path} has no checkpoint yet")
  return manager


def check_stage1(config, path: str) -> Dict[str, Any]:
  """Checks (cheaply, before any compilation) that ``path`` holds a stage-1
  run of ``config.model``; returns its metadata."""
  manager = _stage1_manager(path)
  step = manager.latest_step()
  meta = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore())).meta
  if meta.get("model") != config.model or meta.get("stage") != 1:
    raise CheckpointError(
        f"the checkpoint at {path} is for model {meta.get('model')!r} stage "
        f"{meta.get('stage')!r}, not {config.model!r} stage 1; point "
        f"--config.stage1_checkpoint at a stage-1 run of {config.model}.")
  manager.close()
  return meta


def restore_stage1_variables(path: str, abstract_variables: Any,
                             model: str = "the stage-2 model"
                             ) -> Dict[str, Any]:
  """Params and BatchNorm statistics of the *last* stage-1 checkpoint.

  The optimizer state and step are not taken: stage 2 starts its own
  schedule from step 0, as the reference does.

  Args:
    path: the stage-1 workdir.
    abstract_variables: ``{'params', 'batch_stats'}`` of the stage-2 model
      (arrays or ``jax.ShapeDtypeStruct``), to check the restored ones against.
    model: the stage-2 model's name, for the error message.
  """
  manager = _stage1_manager(path)  # a clear error where there is no stage 1
  last = manager.latest_step()
  manager.close()
  step, variables = restore_variables(os.path.join(path, "checkpoints"),
                                      abstract_variables, model)
  if step != last:
    raise CheckpointError(
        f"the last stage-1 checkpoint in {path} (step {last}) cannot be "
        f"read (see the warnings above); stage 2 starts from the last one")
  return variables


def read_meta(directory: str, step: int) -> Dict[str, Any]:
  """The JSON metadata (model, stage, name, eval metrics) saved with
  ``step`` in a checkpoint directory."""
  manager = _read_only(directory)
  try:
    return manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta
  finally:
    manager.close()


def restore_converted(directory: str, abstract_variables: Any, model: str,
                      fresh: Sequence[str] = ()) -> Dict[str, Any]:
  """Variables written by ``python -m ir2net_jax.convert`` (or
  ``convert.save_variables``), checked against the model's before reading.

  Args:
    directory: the converted checkpoint.
    abstract_variables: ``{'params', 'batch_stats'}`` of the model; with
      ``fresh``, the initialised arrays that those modules keep.
    model: the model's name, for the error message.
    fresh: top-level modules (e.g. ``'fc'``) taken from
      ``abstract_variables`` rather than the checkpoint, whose shapes may
      differ (a classifier for other classes).

  Raises:
    CheckpointError: no converted checkpoint there, ``fresh`` names no
      module of the model, or the other variables do not fit the model
      (naming both, and which modules could start fresh).
  """
  directory = os.path.abspath(directory)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      saved = ckptr.metadata(directory).item_metadata.tree
  except Exception as e:  # orbax raises several types for a missing one
    raise CheckpointError(
        f"no converted checkpoint at {directory} ({type(e).__name__}: "
        f"{_first_line(e)}); write one with `python -m ir2net_jax.convert`"
    ) from None
  fresh = set(fresh)
  modules = set(abstract_variables["params"])
  if fresh - modules:
    raise CheckpointError(
        f"init_from_fresh names {sorted(fresh - modules)}, which {model} does "
        f"not have; its top-level modules are {sorted(modules)}")
  without = lambda tree: {col: {k: v for k, v in sub.items() if k not in fresh}
                          for col, sub in tree.items()}
  what = f"the converted checkpoint {directory}"
  try:
    check_fits(without(saved), without(abstract_variables), what, model)
  except CheckpointError as e:
    differ = sorted(k for k in modules - fresh if k in saved.get("params", {})
                    and jax.tree.map(lambda x: tuple(x.shape),
                                     saved["params"][k])
                    != jax.tree.map(lambda x: tuple(x.shape),
                                    abstract_variables["params"][k]))
    if differ:
      raise CheckpointError(
          f"{e} To start {', '.join(differ)} fresh (a classifier for other "
          f"classes), pass --config.init_from_fresh={','.join(differ)}"
      ) from None
    raise
  as_struct = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  if not fresh:
    return convert.load_variables(
        directory, jax.tree.map(as_struct, abstract_variables))
  restored = convert.load_variables(directory, jax.tree.map(as_struct, saved))
  kept = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype),
                      without(restored), without(abstract_variables))
  return {col: {**kept[col], **{k: v for k, v in sub.items() if k in fresh}}
          for col, sub in abstract_variables.items()}
