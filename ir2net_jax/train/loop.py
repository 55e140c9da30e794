"""The two-stage IR2Net training loop: ``train_and_evaluate(config, workdir)``.

Data flows one way: config -> (data, model, teacher, optimizer) -> a
``shard_map``-ed train step over a ``('data',)`` mesh (``step``) -> orbax
checkpoints, TensorBoard files in the workdir (``metric_writer``, no
TensorFlow needed) and ``summary.json``.

Everything that can be wrong with a run (a config value that cannot work,
missing data, a missing stage-1 checkpoint or teacher, a workdir that holds a
run of another config: see ``config_checks`` and ``resume``) is checked
before the workdir is touched and before anything is compiled.
"""

import dataclasses
import json
import time
from typing import Any, Callable, Dict, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging

from ir2net_jax import data, models
from ir2net_jax.backend import policy
from ir2net_jax.configs import ConfigError
from ir2net_jax.data.shared.prefetch import close_source
from ir2net_jax.io import checkpoints as checkpoints_lib, weights
from ir2net_jax.io.checkpoints import on_every_process
from ir2net_jax.nn import diagnostics
from ir2net_jax.storage import paths, preflight
from ir2net_jax.train import (config_checks, curves, divergence, evaluate,
                              metric_writer, optim, parallel, pictures,
                              preemption, resume, startup)
from ir2net_jax.train.preemption import Preempted
from ir2net_jax.train.step import (build_teacher, create_train_state,
                                   sharded_eval_step, sharded_train_step)

__all__ = ["train_and_evaluate"]


@dataclasses.dataclass
class _Run:
  """What ``_build`` makes of a config, before the workdir is touched."""
  config: ml_collections.ConfigDict
  workdir: str
  model: Any
  mesh: jax.sharding.Mesh
  inputs: Any            # data.open_inputs
  train_step: Callable   # (state, batch, teacher_vars) -> (state, metrics)
  eval_step: Callable
  teacher_vars: Any
  state: Any             # the new run's, before any restore
  steps_per_epoch: int
  num_steps: int

  def variables(self, state):
    return {"params": state.params, "batch_stats": state.batch_stats}


@dataclasses.dataclass
class _Progress:
  """Where a run stands: what its checkpoints' metadata record."""
  start_step: int = 0
  best: Dict[str, float] = dataclasses.field(
      default_factory=lambda: {"eval_top1": -1.0, "eval_top5": -1.0})
  skipped: int = 0     # steps skip_nonfinite_updates skipped, over the run
  last_eval: Dict[str, float] = dataclasses.field(default_factory=dict)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       verbose: bool = False) -> Dict[str, Any]:
  """Trains and evaluates one stage as the config says; returns the summary.

  Resumes from the newest checkpoint in ``workdir`` that every process can
  read, if there is one (``Checkpoints.restore``: corrupt newer ones are
  reported and set aside, and so are ``best/``'s of later steps; an I/O
  error stops the run and moves nothing; ``resume.check_resume``
  says what may change); a finished run started again only reports its
  result and writes nothing. A new run starts from ``config.init_from``'s
  converted variables if set, else (stage 2 of an IR2Net model) from the
  last stage-1 checkpoint; a resumed one reads neither. At the end,
  ``curves.png`` in the workdir plots the run's TensorBoard scalars.

  Args:
    config: the run's config (``ir2net_jax.get_config``).
    workdir: a local directory or a bucket URL (``gs://...``).
    verbose: also log every scalar written to TensorBoard (the per-layer
      diagnostics among them) and the hyperparameters.

  Raises:
    DivergenceError: a step's loss, gradient or new state was not finite
      (unless ``config.skip_nonfinite_updates``); nothing from that step on
      was evaluated or saved.
    Preempted: SIGTERM or SIGINT arrived; a checkpoint of the step in flight
      was saved (and waited for) first; one that came while the run waited
      for a batch or before its first step saves the last completed step, if
      any (``preemption``). No ``summary.json`` is written.
  """
  start_time = time.time()
  policy.apply_xla_cpu_flags(config)   # as the commands do, where it can
  run = _build(config, paths.resolve(workdir))
  workdir = run.workdir
  # From here on the workdir is written to.
  is_host0 = jax.process_index() == 0
  paths.makedirs(workdir)
  checkpoints = checkpoints_lib.Checkpoints(workdir, config.keep_checkpoints)
  state, progress = _restore(run, checkpoints)
  finished = progress.start_step >= run.num_steps  # only report its result
  if is_host0 and not finished:
    resume.record_config(workdir, config)
  writer = metric_writer.MetricWriter(
      workdir, just_logging=not is_host0 or finished, log_scalars=verbose)
  if progress.start_step == 0:
    writer.write_hparams(_flat(config.to_dict()))
  logging.info("training %s for %d steps (%d per epoch) on %d devices, "
               "input engine %s", config.name, run.num_steps,
               run.steps_per_epoch, jax.device_count(), run.inputs.engine)
  try:
    state = _train(run, state, progress, checkpoints, writer)
    if not progress.last_eval:  # a finished run started again: its result
      progress.last_eval = evaluate.evaluate_split(
          run.eval_step, run.variables(state), config, run.mesh, run.inputs)
  finally:
    # Whatever stops the loop, a save in flight (of a checked, finite state)
    # is finished, and the metrics written so far reach the disk.
    writer.close()
    checkpoints.wait()
    checkpoints.close()
  summary = _summary(config, max(run.num_steps, progress.start_step),
                     progress, time.time() - start_time)
  summary["bad_files"] = _bad_files(run.inputs)
  if is_host0 and not finished:
    paths.write_atomic(paths.join(workdir, "summary.json"),
                       json.dumps(summary, indent=1))
    _plot_curves(workdir)
  logging.info("done: %s", _done_line(summary, workdir))
  return summary


def _build(config, workdir: str) -> _Run:
  """Checks everything that can be wrong with the run (config, data,
  stage-1 run, teacher, the workdir's earlier run) and builds it: data,
  model, teacher, optimizer, steps and the new run's state. Writes
  nothing."""
  startup.connect(config)
  preflight.check_run(config, workdir)
  info, num_classes = startup.prepare(config, training=True)
  resuming = checkpoints_lib.latest_step(
      paths.join(workdir, "checkpoints")) is not None
  # Stage 2 starts from stage 1's last checkpoint unless it starts from
  # init_from's variables or resumes its own checkpoint.
  from_stage1 = (config.model.startswith("ir2net") and config.stage == 2
                 and not config.init_from and not resuming)
  stage1_dir = (weights.stage1_directory(config, workdir) if from_stage1
                else None)
  # Every process reads the weights a run starts from; where one cannot,
  # every one stops (on_every_process), none waits for it at a collective.
  if from_stage1:
    on_every_process(lambda: weights.check_stage1(config, stage1_dir),
                     f"found no stage-1 run of {config.model} at "
                     f"{stage1_dir} (see their logs)")
  resume.check_resume(workdir, config)
  steps_per_epoch = info.num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f"config.batch_size={config.batch_size} is larger than "
                      f"the {info.num_train} training examples")
  model, mesh = startup.student(config, num_classes)
  inputs = data.open_inputs(config, mesh,
                            config_checks.eval_batch_size(config), num_classes)
  teacher, teacher_vars = (None, {})
  if config.loss == "distillation":
    teacher, teacher_vars = on_every_process(
        lambda: _load_teacher(config, num_classes),
        f"could not load the teacher {config.teacher_checkpoint} (see their "
        "logs)")
  variables = _initial_variables(config, model, stage1_dir,
                                 bool(config.init_from) and not resuming)
  tx = optim.create_optimizer(config, variables["params"], model,
                              steps_per_epoch)
  return _Run(
      config, workdir, model, mesh, inputs,
      sharded_train_step(model, tx, config, mesh, teacher,
                         batch_fn=inputs.batch_fn()),
      sharded_eval_step(model, mesh), parallel.replicate(teacher_vars, mesh),
      create_train_state(variables, tx), steps_per_epoch,
      (config.num_train_steps if config.num_train_steps > 0
       else config.num_epochs * steps_per_epoch))


def _restore(run: _Run, checkpoints) -> Tuple[Any, _Progress]:
  """The state to start from (the newest readable checkpoint's, else the
  new run's), on the mesh, and the progress its metadata records."""
  state, progress = run.state, _Progress()
  if checkpoints.latest_step() is not None:
    state, meta = checkpoints.restore(state)   # newest readable one
    progress.best = meta.get("best", progress.best)   # the one best/ holds
    progress.skipped = meta.get("skipped_steps", 0)
    logging.info("resumed from step %d", int(state.step))
  progress.start_step = int(state.step)
  return parallel.replicate(state, run.mesh), progress


def _train(run: _Run, state, progress: _Progress, checkpoints, writer):
  """Steps ``progress.start_step + 1 .. run.num_steps``: logs, evaluates,
  saves (see ``train_and_evaluate``). Returns the last state; fills
  ``progress``."""
  config = run.config
  report = metric_writer.ReportProgress(
      num_train_steps=run.num_steps, writer=writer,
      every_steps=config.log_every_steps)
  schedule = optim.learning_rate_schedule(config, run.steps_per_epoch)
  ckpt_every = (config.checkpoint_every_steps
                if config.checkpoint_every_steps > 0 else run.steps_per_epoch)
  train_iter = run.inputs.train_batches(progress.start_step)
  evaluator = _Evaluator(run, writer)
  # pending: (step, metrics) since the last logging step, not yet written;
  # every one of them is checked for divergence before anything is
  # evaluated or saved.
  pending = []
  meta = lambda: {"model": config.model, "stage": config.stage,
                  "name": config.name, "best": progress.best,
                  **progress.last_eval, "skipped_steps":
                  progress.skipped + divergence.count_skipped(pending)}
  step = progress.start_step
  try:
    with preemption.StopSignals() as stop_signals:
      for step in range(progress.start_step + 1, run.num_steps + 1):
        # A signal gives up the wait for a batch, and the first step.
        stop_signals.interruptible = step == progress.start_step + 1
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          with stop_signals.waiting():
            waiting = time.perf_counter()
            batch = next(train_iter)
            report.waited(time.perf_counter() - waiting)
          state, metrics = run.train_step(state, batch, run.teacher_vars)
        stop_signals.interruptible = False
        pending.append((step, metrics))
        stop = stop_signals.stop_requested(step)
        log_now = step % config.log_every_steps == 0 or step == run.num_steps
        eval_now = not stop and _eval_due(step, run)
        if log_now or eval_now or stop or step % ckpt_every == 0:
          divergence.check(pending, config, checkpoints.latest_step())
        if log_now:
          summary = _write_train_metrics(writer, step, pending, schedule,
                                         _bad_files(run.inputs))
          progress.skipped += int(summary.get("skipped_steps", 0))
          report.latest(summary)
          pending = []
        # After the logging step's sync: steps/s counts steps done, not
        # steps dispatched.
        report(step)
        is_best = eval_now and evaluator(step, state, progress)
        if step % ckpt_every == 0 or step == run.num_steps or is_best or stop:
          checkpoints.save(step, state, meta(), best=is_best)
          writer.flush()   # TensorBoard keeps up with the checkpoints
        if stop:
          checkpoints.wait()
          raise Preempted(step, stop_signals.signum,
                          checkpoints.step_path(step))
  except preemption.Interrupted as e:  # in step: state is step - 1's
    if step - 1 == progress.start_step:   # nothing new to save
      raise Preempted(progress.start_step, e.signum, None) from None
    divergence.check(pending, config, checkpoints.latest_step())
    checkpoints.save(step - 1, state, meta())
    writer.flush()
    checkpoints.wait()
    raise Preempted(step - 1, e.signum,
                    checkpoints.step_path(step - 1)) from None
  finally:
    close_source(train_iter)   # grain: its worker processes and shared memory
  return state


def _eval_due(step: int, run: _Run) -> bool:
  """The last step, and the end of every ``eval_every_epochs``-th epoch."""
  epochs, rest = divmod(step, run.steps_per_epoch)
  return step == run.num_steps or (
      rest == 0 and epochs % run.config.eval_every_epochs == 0)


class _Evaluator:
  """Evaluates at a step: writes the metrics and the restriction pictures,
  logs the top-1, records a new best in the progress."""

  def __init__(self, run: _Run, writer):
    self._run, self._writer = run, writer
    self._pictures = None  # RestrictionPictures or False, at the first eval

  def __call__(self, step: int, state, progress: _Progress) -> bool:
    """Returns whether the step is the run's best so far."""
    run, variables = self._run, self._run.variables(state)
    progress.last_eval = evaluate.evaluate_split(
        run.eval_step, variables, run.config, run.mesh, run.inputs)
    self._writer.write_scalars(step, progress.last_eval)
    if self._pictures is None:
      self._pictures = _restriction_pictures(run.config, run.model, run.mesh,
                                             run.workdir, run.inputs)
    if self._pictures:
      self._pictures(step, variables, self._writer)
    top1, top5 = (progress.last_eval["eval_top1"],
                  progress.last_eval["eval_top5"])
    logging.info("step %d (epoch %.2f): eval top-1 %.4f top-5 %.4f", step,
                 step / run.steps_per_epoch, top1, top5)
    if top1 <= progress.best["eval_top1"]:
      return False
    progress.best = {"eval_top1": top1, "eval_top5": top5, "step": step}
    return True


def _plot_curves(workdir: str) -> None:
  """``curves.png`` in the workdir; a run that trained is not failed by
  its picture."""
  try:
    curves.plot(workdir)
  except ImportError:
    logging.info("no %s: matplotlib is not installed", curves.FILE_NAME)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("could not draw %s: %s: %s", curves.FILE_NAME,
                    type(e).__name__, paths.first_line(e))


def _done_line(summary: Dict[str, Any], workdir: str) -> str:
  """The end of a run in a line: its top-1s, its time, where it is."""
  best = summary["best_eval_top1"]
  return ("%d steps, eval top-1 %.4f (best %.4f), %.0f s; %s" % (
      summary["steps"], summary["final_eval_top1"] or 0.0,
      best if best is not None else 0.0, summary["wall_time_s"],
      paths.join(workdir, "summary.json")))


def _summary(config, steps: int, progress: _Progress,
             wall_time_s: float) -> Dict[str, Any]:
  """What ``summary.json`` holds."""
  last_eval, best = progress.last_eval, progress.best
  return {
      "name": config.name, "model": config.model, "stage": config.stage,
      "dataset": config.dataset, "steps": steps,
      "final_eval_top1": last_eval.get("eval_top1"),
      "final_eval_top5": last_eval.get("eval_top5"),
      "best_eval_top1": best["eval_top1"], "best_eval_top5": best["eval_top5"],
      "skipped_steps": progress.skipped, "wall_time_s": wall_time_s,
      "devices": jax.device_count(), "processes": jax.process_count(),
  }


def _initial_variables(config, model, stage1_dir, from_init_from: bool):
  """The variables a run starts from (a resumed one restores its own).

  Stage 1's last checkpoint's where ``stage1_dir`` is set, else
  ``config.init_from``'s where ``from_init_from``, else new ones.
  """
  variables = models.init_variables(model, config.image_size, config.seed)
  if stage1_dir is not None:
    variables = on_every_process(
        lambda: weights.restore_stage1_variables(stage1_dir, variables,
                                                 config.model),
        f"could not restore the last stage-1 checkpoint in {stage1_dir} "
        "(see their logs)")
    logging.info("stage 2: starting from the last stage-1 checkpoint in %s",
                 stage1_dir)
  elif from_init_from:
    variables = on_every_process(lambda: weights.load_variables(
        config.init_from, variables, config.model,
        fresh=[m.strip() for m in config.init_from_fresh.split(",")
               if m.strip()]).variables,
        f"could not load init_from={config.init_from} (see their logs)")
    logging.info("starting from the variables in %s", config.init_from)
  return variables


def _load_teacher(config, num_classes):
  """The frozen teacher and its converted variables."""
  teacher = build_teacher(config, num_classes)
  abstract = models.abstract_variables(teacher, config.image_size)
  try:
    variables = weights.load_variables(config.teacher_checkpoint, abstract,
                                       config.teacher_model).variables
  except Exception as e:  # orbax raises several types for a mismatch
    raise ConfigError(f"the teacher checkpoint {config.teacher_checkpoint} "
                      f"does not fit {config.teacher_model}: {e}") from None
  return teacher, variables



def _restriction_pictures(config, model, mesh, workdir, inputs=None):
  """What draws information restriction at each evaluation, or False.

  False without information restriction (nothing is erased, there is no
  second pass to show) or with ``config.restriction_images == 0``.
  """
  if not (config.information_restriction and config.restriction_images):
    return False
  return pictures.RestrictionPictures(config, model, mesh, workdir, inputs)


# Per-example metrics: written as histograms of every value, never averaged.
_HISTOGRAMS = (diagnostics.KEPT_PIXELS,)


def _bad_files(inputs) -> int:
  """Distinct bad image files the run's input engine met and skipped
  (``data.shared.bad_data``; 0 for an engine that decodes none)."""
  return len(getattr(inputs, "bad_files", ()))


def _write_train_metrics(writer, step: int, pending, schedule,
                         bad_files: int) -> Dict[str, float]:
  """Writes the train metrics of ``pending`` steps at ``step`` (and the
  count of bad files skipped so far); returns the scalars (means over the
  steps; ``skipped_steps``, how many ``skip_nonfinite_updates`` skipped)."""
  summary, histograms = _train_metrics(pending)
  summary["learning_rate"] = float(schedule(step - 1))
  writer.write_scalars(step, {**{f"train_{k}": v for k, v in summary.items()},
                              "data_bad_files": bad_files})
  if histograms:
    writer.write_histograms(step, {f"train_{k}": v
                                   for k, v in histograms.items()})
  return summary


def _train_metrics(pending) -> Tuple[Dict[str, float],
                                     Dict[str, np.ndarray]]:
  """The train metrics of ``pending`` steps: ``(scalars, histograms)``.

  Scalars are means over the steps (skips: their count); histograms
  (``_HISTOGRAMS``) the values of every step concatenated.
  """
  values = jax.device_get([m for _, m in pending])
  scalars, histograms = {}, {}
  for k in values[0]:
    if k in _HISTOGRAMS:
      histograms[k] = np.concatenate([v[k] for v in values])
    elif k != "finite":
      reduce = np.sum if k == "skipped_steps" else np.mean
      scalars[k] = float(reduce([v[k] for v in values]))
  return scalars, histograms


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float, str, bool)):
      out[f"{prefix}{k}"] = v
    else:
      out[f"{prefix}{k}"] = str(v)
  return out
