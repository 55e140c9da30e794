"""Orbax checkpoints in the workdir: periodic, best-eval, resume, stage 1.

Layout::

  workdir/checkpoints/<step>/{state,meta}   latest ones (auto-resume)
  workdir/best/<step>/{state,meta}          the best eval top-1 so far

  workdir/corrupt_checkpoints/<step>-<time>/  latest ones that could not be
                                            read, set aside on resume

``state`` is the whole ``TrainState``; ``meta`` is JSON (model, stage,
config name, eval metrics). The teacher is never saved with the student.
"""

import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

__all__ = ["CheckpointError", "Checkpoints", "stage1_directory",
           "check_stage1", "restore_stage1_variables"]


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
    return str(ocp.step.standard_name_format().find_step(
        self.latest.directory, step).path)

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
    corrupt = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        restored = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore()))
        _check_finite(restored.state)
      except Exception as e:  # orbax, tensorstore and json raise many types
        logging.warning("cannot read the checkpoint %s (%s: %s); trying the "
                        "one before it", self.step_path(step),
                        type(e).__name__, _first_line(e))
        corrupt.append(step)
        continue
      if corrupt:
        self._set_aside(corrupt)
        logging.warning("resuming from the checkpoint at step %d, the newest "
                        "readable one", step)
      return restored.state, restored.meta
    raise CheckpointError(
        f"none of the checkpoints in {self.latest.directory} (steps "
        f"{sorted(corrupt)}) can be read; see the warnings above. Move them "
        f"out of the way to train from the start, or use a new --workdir.")

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


def restore_stage1_variables(path: str, abstract_variables: Any) -> Dict[str, Any]:
  """Params and BatchNorm statistics of the *last* stage-1 checkpoint.

  The optimizer state and step are not taken: stage 2 starts its own
  schedule from step 0, as the reference does.

  Args:
    path: the stage-1 workdir.
    abstract_variables: ``{'params', 'batch_stats'}`` of the stage-2 model
      (arrays or ``jax.ShapeDtypeStruct``), to check the restored ones against.
  """
  manager = _stage1_manager(path)
  step = manager.latest_step()
  try:
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  finally:
    manager.close()
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  got = jax.tree.map(lambda x: tuple(x.shape), variables)
  want = jax.tree.map(lambda x: tuple(x.shape), abstract_variables)
  if got != want:
    raise CheckpointError(
        f"the stage-1 checkpoint {path} (step {step}) does not fit this "
        f"model: its parameters differ in names or shapes")
  return jax.tree.map(lambda x, a: x.astype(a.dtype), variables,
                      abstract_variables)
