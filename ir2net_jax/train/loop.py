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

import json
import time
from typing import Any, Dict, Tuple

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
from ir2net_jax.train import (config_checks, divergence, evaluate,
                              metric_writer, optim, parallel, pictures,
                              preemption, resume, startup)
from ir2net_jax.train.preemption import Preempted
from ir2net_jax.train.step import (build_teacher, create_train_state,
                                   sharded_eval_step, sharded_train_step)

__all__ = ["train_and_evaluate"]


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """Trains and evaluates one stage as the config says; returns the summary.

  Resumes from the newest checkpoint in ``workdir`` that every process can
  read, if there is one (``Checkpoints.restore``: corrupt newer ones are
  reported and set aside, and so are ``best/``'s of later steps; an I/O
  error stops the run and moves nothing; ``resume.check_resume``
  says what may change); a finished run started again only reports its
  result and writes nothing. A new run starts from ``config.init_from``'s
  converted variables if set, else (stage 2 of an IR2Net model) from the
  last stage-1 checkpoint; a resumed one reads neither.

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
  workdir = paths.resolve(workdir)
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
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else config.num_epochs * steps_per_epoch)

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
  state = create_train_state(variables, tx)

  # From here on the workdir is written to.
  is_host0 = jax.process_index() == 0
  paths.makedirs(workdir)
  checkpoints = checkpoints_lib.Checkpoints(workdir, config.keep_checkpoints)
  best = {"eval_top1": -1.0, "eval_top5": -1.0}
  skipped = 0   # steps that skip_nonfinite_updates skipped, over the run
  if checkpoints.latest_step() is not None:
    state, meta = checkpoints.restore(state)   # newest readable one
    best = meta.get("best", best)   # the one best/ holds
    skipped = meta.get("skipped_steps", 0)
    logging.info("resumed from step %d", int(state.step))
  start_step = int(state.step)
  finished = start_step >= num_steps  # started again: only report its result
  if is_host0 and not finished:
    resume.record_config(workdir, config)
  state = parallel.replicate(state, mesh)
  teacher_vars = parallel.replicate(teacher_vars, mesh)

  train_step = sharded_train_step(model, tx, config, mesh, teacher,
                                  batch_fn=inputs.batch_fn())
  eval_step = sharded_eval_step(model, mesh)

  writer = metric_writer.MetricWriter(
      workdir, just_logging=not is_host0 or finished)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
  report = metric_writer.ReportProgress(
      num_train_steps=num_steps, writer=writer,
      every_steps=config.log_every_steps)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch)
  ckpt_every = (config.checkpoint_every_steps
                if config.checkpoint_every_steps > 0 else steps_per_epoch)
  train_iter = inputs.train_batches(start_step)
  logging.info("training %s for %d steps (%d per epoch) on %d devices, "
               "input engine %s", config.name, num_steps, steps_per_epoch,
               jax.device_count(), inputs.engine)

  # pending: (step, metrics) since the last logging step, not yet written;
  # every one of them is checked for divergence before anything is
  # evaluated or saved.
  pending, last_eval = [], {}
  pictures = None  # pictures.RestrictionPictures or False, at the first eval
  meta = lambda: {"model": config.model, "stage": config.stage,
                  "name": config.name, "best": best, **last_eval,
                  "skipped_steps": skipped + divergence.count_skipped(pending)}
  try:
    with preemption.StopSignals() as stop_signals:
      for step in range(start_step + 1, num_steps + 1):
        # A signal gives up the wait for a batch, and the first step.
        stop_signals.interruptible = step == start_step + 1
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          with stop_signals.waiting():
            waiting = time.perf_counter()
            batch = next(train_iter)
            report.waited(time.perf_counter() - waiting)
          state, metrics = train_step(state, batch, teacher_vars)
        stop_signals.interruptible = False
        pending.append((step, metrics))
        stop = stop_signals.stop_requested(step)
        log_now = step % config.log_every_steps == 0 or step == num_steps
        end_of_epoch = step % steps_per_epoch == 0
        eval_now = not stop and (step == num_steps or (
            end_of_epoch and
            (step // steps_per_epoch) % config.eval_every_epochs == 0))
        if log_now or eval_now or stop or step % ckpt_every == 0:
          divergence.check(pending, config, checkpoints.latest_step())
        if log_now:
          summary = _write_train_metrics(writer, step, pending, schedule,
                                         _bad_files(inputs))
          skipped += int(summary.get("skipped_steps", 0))
          report.latest(summary)
          pending = []
        # After the logging step's sync: steps/s counts steps done, not
        # steps dispatched.
        report(step)
        is_best = False
        if eval_now:
          last_eval = evaluate.evaluate_split(
              eval_step, {"params": state.params,
                          "batch_stats": state.batch_stats}, config, mesh,
              inputs)
          writer.write_scalars(step, last_eval)
          if pictures is None:  # made once, at the first evaluation
            pictures = _restriction_pictures(config, model, mesh, workdir,
                                             inputs)
          if pictures:
            pictures(step, {"params": state.params,
                            "batch_stats": state.batch_stats}, writer)
          logging.info("step %d (epoch %.2f): eval top-1 %.4f top-5 %.4f",
                       step, step / steps_per_epoch, last_eval["eval_top1"],
                       last_eval["eval_top5"])
          if last_eval["eval_top1"] > best["eval_top1"]:
            best = {"eval_top1": last_eval["eval_top1"],
                    "eval_top5": last_eval["eval_top5"], "step": step}
            is_best = True
        if step % ckpt_every == 0 or step == num_steps or is_best or stop:
          checkpoints.save(step, state, meta(), best=is_best)
          writer.flush()   # TensorBoard keeps up with the checkpoints
        if stop:
          checkpoints.wait()
          raise Preempted(step, stop_signals.signum,
                          checkpoints.step_path(step))
    if not last_eval:  # a finished run started again: report its result
      last_eval = evaluate.evaluate_split(
          eval_step, {"params": state.params,
                      "batch_stats": state.batch_stats}, config, mesh,
          inputs)
  except preemption.Interrupted as e:  # in step: state is step - 1's
    if step - 1 == start_step:   # nothing new to save
      raise Preempted(start_step, e.signum, None) from None
    divergence.check(pending, config, checkpoints.latest_step())
    checkpoints.save(step - 1, state, meta())
    writer.flush()
    checkpoints.wait()
    raise Preempted(step - 1, e.signum,
                    checkpoints.step_path(step - 1)) from None
  finally:
    # Whatever stops the loop, a save in flight (of a checked, finite state)
    # is finished, and the metrics written so far reach the disk.
    writer.close()
    checkpoints.wait()
    checkpoints.close()
    close_source(train_iter)   # grain: its worker processes and shared memory
  summary = _summary(config, max(num_steps, start_step), last_eval, best,
                     skipped, time.time() - start_time)
  summary["bad_files"] = _bad_files(inputs)
  if is_host0 and not finished:
    paths.write_atomic(paths.join(workdir, "summary.json"),
                       json.dumps(summary, indent=1))
  logging.info("done: %s", json.dumps(summary))
  return summary


def _summary(config, steps: int, last_eval: Dict[str, float],
             best: Dict[str, float], skipped: int,
             wall_time_s: float) -> Dict[str, Any]:
  """What ``summary.json`` holds."""
  return {
      "name": config.name, "model": config.model, "stage": config.stage,
      "dataset": config.dataset, "steps": steps,
      "final_eval_top1": last_eval.get("eval_top1"),
      "final_eval_top5": last_eval.get("eval_top5"),
      "best_eval_top1": best["eval_top1"], "best_eval_top5": best["eval_top5"],
      "skipped_steps": skipped, "wall_time_s": wall_time_s,
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
