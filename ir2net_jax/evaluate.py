"""Evaluates a checkpoint without training: ``ir2net-eval``.

  ir2net-eval --config=imagenet:a,stage=2 --checkpoint=weights/ir2net_a \
      --config.data_dir=/data/tfds
  python -m ir2net_jax.evaluate --checkpoint=runs/digits/best

``--checkpoint`` is one of

* a training workdir: its newest readable checkpoint (``checkpoints/``);
* ``workdir/best`` (or ``workdir/checkpoints``): its newest one;
* converted weights (``python -m ir2net_jax.convert`` output).

``--config`` may be left out for a workdir or its ``best/`` when the workdir
holds the ``config.json`` its run recorded; ``--config.field=value``
overrides fields either way (e.g. ``--config.data_dir`` where the data moved).
How the evaluation's processes start is its own to say
(``--config.coordinator_address``, ``num_processes``, ``process_id``, or
the cluster environment), never the recorded run's.
It prints top-1, top-5 and the number of examples, and writes them as JSON
to ``--output`` (default ``<checkpoint>/eval_<dataset>_<split>.json``).

The eval is the trainer's (``train.evaluate_split``): every example of
``config.eval_split`` counted once, over all devices and hosts. Everything
that can be wrong (no checkpoint, one of another model, no data) is reported
before anything is compiled.
"""

import dataclasses
import json
import os
import re
import sys
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from ir2net_jax import checkpoints as ckpt_lib
from ir2net_jax import config_checks, configs, parallel, train
from ir2net_jax.checkpoints import CheckpointError

__all__ = ["CheckpointError", "Source", "find_checkpoint", "recorded_config",
           "load_variables", "evaluate", "default_output", "main", "run"]

# The recipe file that reads a recorded config.json (``--config`` left out).
RECORDED_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "configs", "recorded.py")


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


def find_checkpoint(checkpoint: str) -> Source:
  """What ``checkpoint`` is: a workdir, its ``best/`` or ``checkpoints/``,
  or converted weights. Reads directory listings only.

  Raises:
    CheckpointError: it does not exist or holds no checkpoint.
  """
  path = os.path.abspath(checkpoint)
  if not os.path.isdir(path):
    raise CheckpointError(f"--checkpoint={checkpoint}: no such directory")
  latest = os.path.join(path, "checkpoints")
  if os.path.isdir(latest):
    if ckpt_lib.latest_step(latest) is None:
      raise CheckpointError(
          f"the workdir {path} has no checkpoint yet (its checkpoints/ is "
          f"empty); train it first, or pass its best/")
    return Source(path, latest, path)
  if ckpt_lib.is_step_directory(path):
    return Source(path, path, os.path.dirname(path))
  if os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
    return Source(path, None, None)
  raise CheckpointError(
      f"{path} holds no checkpoint: expected a training workdir (with "
      f"checkpoints/), a workdir's best/, or the output of `python -m "
      f"ir2net_jax.convert`")


def recorded_config(checkpoint: str) -> Optional[str]:
  """The ``config.json`` of ``checkpoint``'s run, if it has one."""
  try:
    source = find_checkpoint(checkpoint)
  except CheckpointError:
    return None
  if source.workdir is None:
    return None
  path = os.path.join(source.workdir, "config.json")
  return path if os.path.exists(path) else None


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def default_output(checkpoint: str, dataset: str, split: str) -> str:
  """``<checkpoint>/eval_<dataset>_<split>.json``."""
  return os.path.join(os.path.abspath(checkpoint),
                      f"eval_{_safe(dataset)}_{_safe(split)}.json")


def evaluate(config, checkpoint: str) -> Dict[str, Any]:
  """Evaluates ``checkpoint`` on ``config``'s eval split.

  Args:
    config: the run's config (model, data, eval batch size); None reads the
      ``config.json`` the checkpoint's workdir recorded.
    checkpoint: a workdir, ``workdir/best`` or converted weights (see the
      module docstring).

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
  from ir2net_jax import data  # pylint: disable=g-import-not-at-top
  # Before reading any checkpoint: orbax starts JAX's backends. A recorded
  # config holds no launch settings (config_checks.LAUNCH_FIELDS).
  parallel.init_distributed(config)
  source = find_checkpoint(checkpoint)
  if config is None:
    path = recorded_config(checkpoint)
    if path is None:
      raise config_checks.ConfigError(
          f"{source.path} has no recorded config.json; pass "
          f"--config=<the recipe it was trained with>")
    config = config_checks.read_recorded_config(path)
  config_checks.validate_eval_config(config)
  info = data.dataset_info(config)              # DataError if missing
  config_checks.check_num_classes(config, info)
  num_classes = (config.num_classes if config.num_classes > 0
                 else info.num_classes)
  model = train.build_model(config, num_classes, parallel.AXIS)
  step, where, variables = load_variables(config, checkpoint, num_classes)
  mesh = parallel.data_mesh()
  logging.info("evaluating %s on %s %s", where, config.dataset,
               info.eval_split)
  sums = train.evaluate_split(train.sharded_eval_step(model, mesh),
                              parallel.replicate(variables, mesh), config,
                              mesh)
  return {"top1": sums["eval_top1"], "top5": sums["eval_top5"],
          "count": int(sums["eval_count"]), "checkpoint": where, "step": step,
          "split": info.eval_split, "dataset": config.dataset}


def load_variables(config, checkpoint: str, num_classes: int
                   ) -> Tuple[Optional[int], str, Dict[str, Any]]:
  """The variables of ``checkpoint`` for the model ``config`` names.

  Args:
    config: the run's config (model, stage, image size, seed).
    checkpoint: a workdir, ``workdir/best`` or converted weights (see the
      module docstring).
    num_classes: the model's classifier outputs.

  Returns:
    ``(step, where, {'params', 'batch_stats'})``: the step (None for
    converted weights), the directory read, and the variables on this
    process's first device, in the model's dtypes.

  Raises:
    CheckpointError: no checkpoint there, one of another model or IR2Net
      stage, or one whose variables do not fit the model (naming both).
  """
  source = find_checkpoint(checkpoint)
  model = train.build_model(config, num_classes)
  size = config.image_size
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(config.seed), jnp.zeros((1, size, size, 3)),
      train=False))
  ir2net = config.model.startswith("ir2net")
  name = (f"{config.model} ({num_classes} classes"
          f"{f', stage {config.stage}' if ir2net else ''})")
  if source.steps is None:
    return (None, source.path,
            ckpt_lib.restore_converted(source.path, abstract, name))
  _check_meta(source.steps, config)
  step, variables = ckpt_lib.restore_variables(source.steps, abstract, name)
  return step, os.path.join(source.steps, str(step)), variables


def _check_meta(directory: str, config) -> None:
  """Refuses a run's checkpoint of another model or IR2Net stage (stage-1
  and stage-2 variables have the same shapes), from the newest one's
  metadata; an unreadable one is left to ``restore_variables`` to report."""
  step = ckpt_lib.latest_step(directory)
  try:
    meta = ckpt_lib.read_meta(directory, step)
  except Exception:  # pylint: disable=broad-except
    return
  if "model" not in meta:
    return
  saved = (meta.get("model"), meta.get("stage"))
  want = (config.model, config.stage)
  if not config.model.startswith("ir2net"):
    saved, want = saved[:1], want[:1]
  if saved != want:
    raise CheckpointError(
        f"the checkpoint {directory} (step {step}) is of model "
        f"{meta.get('model')!r} stage {meta.get('stage')!r}, but the config's "
        f"model is {config.model!r} stage {config.stage!r}; pass the config "
        f"it was trained with")


def _define_flags() -> None:
  """The command line's flags; defined by ``run`` only, so that importing
  this module defines no absl flags in someone else's program."""
  config_flags.DEFINE_config_file(
      "config", None, "Recipe (digits:smoke, imagenet:a,stage=2, or a file); "
      "default: the workdir's recorded config.json.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A workdir, workdir/best, or "
                      "converted weights.")
  flags.DEFINE_string("output", None, "JSON file for the result (default: "
                      "<checkpoint>/eval_<dataset>_<split>.json).")
  flags.mark_flag_as_required("checkpoint")


def main(argv) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = evaluate(FLAGS.config, FLAGS.checkpoint)
  output = FLAGS.output or default_output(FLAGS.checkpoint, result["dataset"],
                                         result["split"])
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump(result, f, indent=1)
  print(f"{result['checkpoint']}: {result['dataset']} {result['split']}: "
        f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
        f"({result['count']} examples) -> {output}")
  parallel.shutdown_distributed()


def _with_recorded_config(argv):
  """``argv`` plus ``--config=<recorded.py>:<config.json>`` where no
  ``--config`` is given and the checkpoint's workdir recorded one."""
  if any(a == "--config" or a.startswith("--config=") for a in argv):
    return argv
  checkpoint = next((a.split("=", 1)[1] for a in argv
                     if a.startswith("--checkpoint=")), None)
  path = checkpoint and recorded_config(checkpoint)
  if not path:
    return argv
  # Before any --config.field override, which needs the config parsed.
  return [argv[0], f"--config={RECORDED_RECIPE}:{path}", *argv[1:]]


def run() -> None:
  """The ``ir2net-eval`` console script."""
  _define_flags()
  app.run(main, argv=_with_recorded_config(
      configs.expand_config_flag(sys.argv)))


if __name__ == "__main__":
  run()
