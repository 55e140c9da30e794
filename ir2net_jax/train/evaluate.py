"""Evaluation: one pass over a data set's eval split, and a checkpoint's
top-1 / top-5 without training (``evaluate``, the ``ir2net-eval`` command's
work).

``evaluate_split`` is the train loop's eval too: every example of
``config.eval_split`` counted once, over all devices and hosts.
``evaluate`` starts as training does (``startup``), so everything that can
be wrong (no checkpoint, one of another model, no data) is reported before
anything is compiled.
"""

from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging

from ir2net_jax import data, models
from ir2net_jax.configs import ConfigError
from ir2net_jax.configs.record import read_recorded_config
from ir2net_jax.data.shared import sources
from ir2net_jax.io import weights
from ir2net_jax.io.weights import CheckpointError
from ir2net_jax.storage import paths, preflight
from ir2net_jax.train import config_checks, parallel, startup, step

__all__ = ["evaluate", "evaluate_split", "load_checkpoint", "load_model",
           "load_run", "config_for", "recorded_config", "CheckpointError"]


def recorded_config(checkpoint: str) -> Optional[str]:
  """The ``config.json`` of ``checkpoint``'s run, if it has one."""
  try:
    source = weights.find_checkpoint(checkpoint)
  except CheckpointError:
    return None
  if source.workdir is None:
    return None
  path = paths.join(source.workdir, "config.json")
  return path if paths.exists(path) else None


def config_for(config, checkpoint: str):
  """``config``, or where it is None the config ``checkpoint``'s workdir
  recorded.

  Raises:
    CheckpointError: no checkpoint there.
    ConfigError: none given and none recorded.
  """
  if config is not None:
    return config
  path = recorded_config(checkpoint)
  if path is None:
    raise ConfigError(
        f"{weights.find_checkpoint(checkpoint).path} has no recorded "
        "config.json; pass --config=<the recipe it was trained with>")
  return read_recorded_config(path)


def evaluate(config, checkpoint: str) -> Dict[str, Any]:
  """Evaluates ``checkpoint`` on ``config``'s eval split.

  Args:
    config: the run's config (model, data, eval batch size); None reads the
      ``config.json`` the checkpoint's workdir recorded.
    checkpoint: a workdir, ``workdir/best`` or converted weights
      (``io.weights.load_variables``).

  Returns:
    ``top1``, ``top5`` (fractions), ``count`` (examples), ``checkpoint``
    (the directory read: a step's, or the converted weights'), ``step``
    (None for converted weights), ``split`` and ``dataset``.

  Raises:
    CheckpointError: no checkpoint there, or one whose variables do not fit
      the config's model (naming both).
    ConfigError: a bad config, or none given and none recorded.
    DataError: the eval data are missing.
  """
  # Before reading any checkpoint: orbax starts JAX's backends. A recorded
  # config holds no launch settings (configs.record.LAUNCH_FIELDS).
  startup.connect(config)
  preflight.check(checkpoint, "--checkpoint", holds="checkpoint")
  weights.find_checkpoint(checkpoint)   # none there: said before the data
  config = config_for(config, checkpoint)
  run = startup.prepare(config, training=False)
  model, mesh = startup.student(config, run.num_classes)
  loaded = load_checkpoint(config, checkpoint, run.num_classes)
  logging.info("evaluating %s on %s %s", loaded.path, config.dataset,
               run.info.eval_split)
  sums = evaluate_split(step.sharded_eval_step(model, mesh),
                        parallel.replicate(loaded.variables, mesh), config,
                        mesh)
  return {"top1": sums["eval_top1"], "top5": sums["eval_top5"],
          "count": int(sums["eval_count"]), "checkpoint": loaded.path,
          "step": loaded.step, "split": run.info.eval_split,
          "dataset": config.dataset}


def load_model(config, checkpoint: str) -> Tuple[Any, Dict[str, Any]]:
  """The model ``config`` names and its variables from ``checkpoint``: a
  workdir, ``workdir/best`` or converted weights (``load_checkpoint``).

  Returns:
    ``(model, {'params', 'batch_stats'})``; the model has no BatchNorm
    ``axis_name`` (it runs outside ``shard_map``), its classes
    ``config.num_classes``, or the data set's where that is -1.

  Raises:
    CheckpointError: no checkpoint there, or one that does not fit the model.
    DataError: an unknown data set, or a ``folder:`` / ``tfds:`` one that is
      not there (its classes are counted from it).
  """
  model, loaded = load_run(config, checkpoint)
  return model, loaded.variables


def load_run(config, checkpoint: str
             ) -> Tuple[Any, weights.LoadedVariables]:
  """``load_model`` with what was read: ``(model, LoadedVariables)`` (the
  variables, the step, the directory)."""
  num_classes = config.num_classes
  if num_classes <= 0:
    num_classes = sources.read_settings(config).spec.num_classes
  loaded = load_checkpoint(config, checkpoint, num_classes)
  return step.build_model(config, num_classes), loaded


def load_checkpoint(config, checkpoint: str, num_classes: int
                    ) -> weights.LoadedVariables:
  """The variables of ``checkpoint`` for the model ``config`` names
  (``io.weights.load_variables``, refusing a run's checkpoint of another
  model or IR2Net stage).

  Args:
    config: the run's config (model, stage, image size).
    checkpoint: a workdir, ``workdir/best`` or converted weights.
    num_classes: the model's classifier outputs.

  Returns:
    The variables, on this process's first device in the model's dtypes,
    the step (None for converted weights) and the directory read.

  Raises:
    CheckpointError: no checkpoint there, one of another model or IR2Net
      stage, or one whose variables do not fit the model (naming both).
  """
  model = step.build_model(config, num_classes)
  abstract = models.abstract_variables(model, config.image_size)
  ir2net = config.model.startswith("ir2net")
  name = (f"{config.model} ({num_classes} classes"
          f"{f', stage {config.stage}' if ir2net else ''})")
  return weights.load_variables(checkpoint, abstract, name,
                                expect=(config.model, config.stage))


def evaluate_split(eval_step: Callable, variables, config,
                   mesh, inputs=None) -> Dict[str, float]:
  """One pass of ``sharded_eval_step`` over ``config``'s eval split.

  Args:
    eval_step: ``step.sharded_eval_step(model, mesh)``.
    variables: ``{'params', 'batch_stats'}``, replicated over ``mesh``.
    config: the data fields and the eval batch size.
    mesh: the ``('data',)`` mesh.
    inputs: the run's ``data.open_inputs``; None opens the config's.

  Returns:
    ``eval_top1`` and ``eval_top5`` (fractions), ``eval_loss`` (the mean
    cross-entropy) and ``eval_count``, the number of examples, each counted
    once.
  """
  if inputs is None:
    inputs = data.open_inputs(config, mesh,
                              config_checks.eval_batch_size(config))
  totals = {"count": 0.0, "top1": 0.0, "top5": 0.0, "loss": 0.0}
  for batch in inputs.eval_batches():
    sums = eval_step(variables, batch)
    for k in totals:
      totals[k] += float(sums[k])
  count = max(totals["count"], 1.0)
  return {"eval_top1": totals["top1"] / count,
          "eval_top5": totals["top5"] / count,
          "eval_loss": totals["loss"] / count, "eval_count": totals["count"]}
