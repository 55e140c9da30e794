"""Reading and writing model variables: one loader for every kind of checkpoint.

``load_variables(checkpoint, abstract_variables, model)`` reads the
``{'params', 'batch_stats'}`` of

* a training workdir: its newest readable checkpoint (``checkpoints/``);
* ``workdir/best`` or ``workdir/checkpoints``: its newest readable one;
* converted weights (``ir2net-convert``'s output, or ``save_variables``'),
  optionally with some top-level modules kept fresh (``init_from_fresh``);

checked against the model's shapes before any array is read. Evaluation,
the restriction pictures, ``init_from``, the teacher and stage 2's start
from stage 1 (``restore_stage1_variables``) all read through it.
"""

import dataclasses
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ir2net_jax.io import checkpoints
from ir2net_jax.io.checkpoints import CheckpointError
from ir2net_jax.storage import paths

__all__ = ["CheckpointError", "Source", "LoadedVariables", "find_checkpoint",
           "load_variables", "save_variables", "stage1_directory",
           "check_stage1", "restore_stage1_variables"]

Variables = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a checkpoint's variables are read.

  Attributes:
    path: the directory as given (absolute).
    steps: the orbax step directory (``workdir/checkpoints`` or
      ``workdir/best``); None for converted weights.
    workdir: the run's workdir (for its ``config.json``); None for
      converted weights.
  """
  path: str
  steps: Optional[str]
  workdir: Optional[str]


class LoadedVariables(NamedTuple):
  """What ``load_variables`` read.

  Attributes:
    variables: ``{'params', 'batch_stats'}``.
    step: the training step of a run's checkpoint; None for converted
      weights.
    path: the directory read: a step's, or the converted weights'.
  """
  variables: Variables
  step: Optional[int]
  path: str


def find_checkpoint(checkpoint: str) -> Source:
  """What ``checkpoint`` is: a workdir, its ``best/`` or ``checkpoints/``,
  or converted weights. Reads directory listings only.

  Raises:
    CheckpointError: it does not exist or holds no checkpoint.
  """
  path = paths.resolve(checkpoint)
  if not paths.isdir(path):
    raise CheckpointError(f"--checkpoint={checkpoint}: no such directory")
  latest = paths.join(path, "checkpoints")
  if paths.isdir(latest):
    if checkpoints.latest_step(latest) is None:
      raise CheckpointError(
          f"the workdir {path} has no checkpoint yet (its checkpoints/ is "
          f"empty); train it first, or pass its best/")
    return Source(path, latest, path)
  if checkpoints.is_step_directory(path):
    return Source(path, path, paths.parent(path))
  if paths.exists(paths.join(path, "_CHECKPOINT_METADATA")):
    return Source(path, None, None)
  raise CheckpointError(
      f"{path} holds no checkpoint: expected a training workdir (with "
      f"checkpoints/), a workdir's best/, or the output of `ir2net-convert`")


def load_variables(checkpoint: str, abstract_variables: Any = None,
                   model: str = "the model", *, fresh: Sequence[str] = (),
                   expect: Optional[Tuple[str, Optional[int]]] = None
                   ) -> LoadedVariables:
  """The variables of ``checkpoint``, checked against the model's.

  Args:
    checkpoint: a workdir, ``workdir/best`` (or ``checkpoints``), or
      converted weights.
    abstract_variables: ``{'params', 'batch_stats'}`` of the model (arrays
      or ``jax.ShapeDtypeStruct``), whose names, shapes and dtypes the
      result has; None restores converted weights as saved (a run's
      checkpoint needs it).
    model: the model, as error messages name it.
    fresh: top-level modules (e.g. ``'fc'``) of converted weights taken from
      ``abstract_variables`` (initialised arrays) rather than the checkpoint,
      whose shapes may differ (a classifier for other classes).
    expect: ``(model name, IR2Net stage or None)`` that a run's checkpoint
      must have been saved by (stage-1 and stage-2 variables have the same
      shapes); None checks nothing.

  Raises:
    CheckpointError: no checkpoint there, none readable, or one of another
      model or stage, or whose variables do not fit (naming both).
  """
  source = find_checkpoint(checkpoint)
  if source.steps is None:
    return LoadedVariables(
        _restore_converted(source.path, abstract_variables, model, fresh),
        None, source.path)
  if expect is not None:
    _check_meta(source.steps, *expect)
  step, variables = checkpoints.restore_variables(source.steps,
                                                  abstract_variables, model)
  return LoadedVariables(variables, step,
                         paths.join(source.steps, str(step)))


def _check_meta(directory: str, model: str, stage: Optional[int]) -> None:
  """Refuses a run's checkpoint of another model or IR2Net stage, from the
  newest one's metadata; an unreadable one is left to ``restore_variables``
  to report."""
  step = checkpoints.latest_step(directory)
  try:
    meta = checkpoints.read_meta(directory, step)
  except Exception:  # pylint: disable=broad-except
    return
  if "model" not in meta:
    return
  saved = (meta.get("model"), meta.get("stage"))
  want = (model, stage)
  if not model.startswith("ir2net"):
    saved, want = saved[:1], want[:1]
  if saved != want:
    raise CheckpointError(
        f"the checkpoint {directory} (step {step}) is of model "
        f"{meta.get('model')!r} stage {meta.get('stage')!r}, but the config's "
        f"model is {model!r} stage {stage!r}; pass the config it was trained "
        f"with")


def save_variables(directory: str, variables: Variables) -> None:
  """Saves ``{'params', 'batch_stats'}`` as an orbax checkpoint (converted
  weights, which ``load_variables`` reads)."""
  directory = paths.as_path(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, variables)
    ckptr.wait_until_finished()


def _restore_tree(directory: str, abstract: Any) -> Variables:
  """``save_variables``' tree, into ``abstract``'s structure (None: as
  saved)."""
  if not paths.isdir(directory):
    raise FileNotFoundError(f"no converted checkpoint at {directory}")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(paths.as_path(directory), abstract)


def _restore_converted(directory: str, abstract_variables: Any, model: str,
                       fresh: Sequence[str] = ()) -> Variables:
  """Variables written by ``ir2net-convert`` (or ``save_variables``),
  checked against the model's before reading.

  Args:
    directory: the converted checkpoint.
    abstract_variables: ``{'params', 'batch_stats'}`` of the model; with
      ``fresh``, the initialised arrays that those modules keep; None
      restores the checkpoint as saved.
    model: the model's name, for the error message.
    fresh: top-level modules (e.g. ``'fc'``) taken from
      ``abstract_variables`` rather than the checkpoint, whose shapes may
      differ (a classifier for other classes).

  Raises:
    CheckpointError: no converted checkpoint there, ``fresh`` names no
      module of the model, or the other variables do not fit the model
      (naming both, and which modules could start fresh).
  """
  directory = paths.resolve(directory)
  if abstract_variables is None:
    return _restore_tree(directory, None)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      saved = ckptr.metadata(paths.as_path(directory)).item_metadata.tree
  except Exception as e:  # orbax raises several types for a missing one
    raise CheckpointError(
        f"no converted checkpoint at {directory} ({type(e).__name__}: "
        f"{checkpoints.first_line(e)}); write one with `ir2net-convert`"
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
    checkpoints.check_fits(without(saved), without(abstract_variables), what,
                           model)
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
    return _restore_tree(
        directory, jax.tree.map(as_struct, abstract_variables))
  restored = _restore_tree(directory, jax.tree.map(as_struct, saved))
  kept = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype),
                      without(restored), without(abstract_variables))
  return {col: {**kept[col], **{k: v for k, v in sub.items() if k in fresh}}
          for col, sub in abstract_variables.items()}


def stage1_directory(config, workdir: str) -> str:
  """``config.stage1_checkpoint``, or ``stage1`` beside the workdir."""
  return paths.resolve(config.stage1_checkpoint or paths.join(
      paths.parent(workdir), "stage1"))


def _stage1_manager(path: str) -> ocp.CheckpointManager:
  ckpt_dir = paths.join(path, "checkpoints")
  if not paths.isdir(ckpt_dir):
    raise CheckpointError(
        f"stage 2 starts from the last stage-1 checkpoint, but there is no "
        f"stage-1 run at {path} (no {ckpt_dir}). Train stage 1 there first, "
        f"or pass --config.stage1_checkpoint=<stage-1 workdir>.")
  manager = checkpoints.open_read_only(ckpt_dir)
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
  loaded = load_variables(paths.join(path, "checkpoints"),
                          abstract_variables, model)
  if loaded.step != last:
    raise CheckpointError(
        f"the last stage-1 checkpoint in {path} (step {last}) cannot be "
        f"read (see the warnings above); stage 2 starts from the last one")
  return loaded.variables
