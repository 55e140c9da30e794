"""The two-stage IR2Net training loop: ``train_and_evaluate(config, workdir)``.

Data flows one way: config -> (data, model, teacher, optimizer) -> a
``shard_map``-ed train step over a ``('data',)`` mesh -> orbax checkpoints,
TensorBoard files in the workdir (``metric_writer``, no TensorFlow needed)
and ``summary.json``.

Everything that can be wrong with a run (a config value that cannot work,
missing data, a missing stage-1 checkpoint or teacher, a workdir that holds a
run of another config: see ``config_checks``) is checked before the workdir
is touched and before anything is compiled.

The compute path (``build_model``, ``create_train_state``,
``make_train_step``, ``sharded_train_step``) needs no TensorFlow: only
``train_and_evaluate`` imports the input pipeline (``ir2net_jax.data``),
which does.
"""

import functools
import json
import logging as pylogging
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec as P

from ir2net_jax import checkpoints as ckpt_lib
from ir2net_jax import (config_checks, convert, diagnostics, divergence,
                        losses, metric_writer, models, objective, optim,
                        parallel, policy, preemption)
from ir2net_jax.config_checks import ConfigError, validate_config
from ir2net_jax.config_checks import eval_batch_size as _eval_batch_size
from ir2net_jax.divergence import DivergenceError
from ir2net_jax.preemption import Preempted

__all__ = ["TrainState", "ConfigError", "DivergenceError", "Preempted",
           "validate_config", "build_model", "build_teacher",
           "create_train_state", "binary_compute_dtype", "make_train_step",
           "sharded_train_step", "make_eval_step", "sharded_eval_step",
           "evaluate_split", "train_and_evaluate"]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# Kept here for callers that read the choice from the trainer.
binary_compute_dtype = policy.binary_compute_dtype


def build_model(config, num_classes: int, axis_name: Optional[str] = None,
                backend: Optional[str] = None) -> nn.Module:
  """The student model the config names.

  Args:
    config: the run's config.
    num_classes: classifier outputs.
    axis_name: BatchNorm synchronisation axis (with
      ``config.sync_batch_stats``).
    backend: where it will run, ``'cpu'``, ``'gpu'``, ``'tpu'`` or a
      jax.export platform (default: JAX's default backend): its dtypes and
      kernels are ``policy.resolve(config, backend)``'s.

  Raises:
    ConfigError: ``config.remat`` for a model without residual blocks.
  """
  kwargs = dict(config.model_kwargs)
  kwargs.update(num_classes=num_classes,
                information_recovery=config.information_recovery,
                zero_to_one=config.zero_to_one,
                axis_name=axis_name if config.sync_batch_stats else None,
                **policy.resolve(config, backend).model_kwargs())
  if config.model.startswith("ir2net"):
    kwargs["stage"] = config.stage
  model = models.create_model(config.model, **kwargs)
  if config.remat:
    if not hasattr(model, "remat"):
      raise ConfigError(f"config.remat=True, but {config.model} has no "
                        "residual blocks to rematerialise; set remat=False")
    model = model.clone(remat=True)
  return model


def _loss_fn(config) -> Callable:
  return (losses.distribution_loss if config.loss == "distillation"
          else losses.cross_entropy)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config, teacher: Optional[nn.Module] = None) -> Callable:
  """The per-device train step ``(state, batch, teacher_vars) -> (state,
  metrics)``, to be run under ``shard_map`` with axis ``'data'``.

  The loss is ``pmean``-ed over devices *inside* the differentiated function,
  so the gradient is already the global batch's (no second pmean).

  ``metrics['finite']`` says whether the loss, gradient and new state are
  finite (``divergence.finite_flags``; the host checks them). With
  ``config.skip_nonfinite_updates`` a non-finite step returns the old
  parameters, BatchNorm statistics and optimizer state (only ``step``
  advances) and ``metrics['skipped_steps']`` is 1.

  With ``config.diagnostics`` the metrics also hold the BNN diagnostics of
  ``diagnostics.step_metrics`` (``'diag/...'`` scalars and the (B,) vector
  ``'kept_pixels_per_image'``); without, the step is the program it was
  before they existed.
  """
  loss_fn = _loss_fn(config)
  with_diagnostics = config.get("diagnostics", False)

  def step(state: TrainState, batch, teacher_vars):
    images, labels = batch["image"], batch["label"]
    if teacher is not None:
      target, _ = teacher.apply(teacher_vars, images, train=False)
      target = lax.stop_gradient(target.astype(jnp.float32))
    else:
      target = labels

    def global_loss(params):
      loss, aux = objective.two_pass_objective(
          params, state.batch_stats, model, images, target, loss_fn,
          config.erase_lambda,
          information_restriction=config.information_restriction,
          diagnostics=with_diagnostics)
      return lax.pmean(loss, parallel.AXIS), aux

    (loss, aux), grads = jax.value_and_grad(global_loss, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_stats = aux.batch_stats
    if not config.sync_batch_stats:
      batch_stats = lax.pmean(batch_stats, parallel.AXIS)
    top1 = jnp.mean(jnp.argmax(aux.logits_clean, -1) == labels)
    metrics = {
        "loss": loss,
        "loss_clean": lax.pmean(aux.loss_terms[0], parallel.AXIS),
        "loss_erased": lax.pmean(aux.loss_terms[1], parallel.AXIS),
        "top1": lax.pmean(top1, parallel.AXIS),
        "kept_pixels": lax.pmean(jnp.mean(aux.mask), parallel.AXIS),
        "grad_norm": optax.tree.norm(grads),
    }
    updated = (params, batch_stats, opt_state)
    metrics["finite"] = divergence.finite_flags(loss, grads, updated)
    if config.get("skip_nonfinite_updates", False):
      updated, metrics["skipped_steps"] = divergence.keep_if_finite(
          metrics["finite"], updated,
          (state.params, state.batch_stats, state.opt_state))
    params, batch_stats, opt_state = updated
    if with_diagnostics:
      metrics.update(diagnostics.step_metrics(
          aux.diagnostics, state.params, params,
          aux.mask if config.information_restriction else None,
          parallel.AXIS, config.zero_to_one))
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return step


def sharded_train_step(model: nn.Module, tx: optax.GradientTransformation,
                       config, mesh, teacher: Optional[nn.Module] = None
                       ) -> Callable:
  """``make_train_step`` as ``jit(shard_map)`` over ``mesh``: replicated state
  (donated) and teacher variables, the batch split along ``'data'``."""
  return parallel.shard_step(
      make_train_step(model, tx, config, teacher), mesh,
      in_specs=(P(), P(parallel.AXIS), P()), out_specs=(P(), P()),
      donate_argnums=(0,))


def create_train_state(variables: Dict[str, Any],
                       tx: optax.GradientTransformation) -> TrainState:
  """Step 0 of training from ``{'params', 'batch_stats'}``."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=tx.init(variables["params"]))


def build_teacher(config, num_classes: int,
                  backend: Optional[str] = None) -> nn.Module:
  """The frozen teacher the config names (eval mode only, never trained),
  in the dtype ``policy.resolve(config, backend)`` picks. ``config.remat``
  does not apply: a network that is not differentiated keeps no
  activations for a backward pass."""
  return models.create_model(
      config.teacher_model, num_classes=num_classes,
      **{**policy.resolve(config, backend).teacher_kwargs(),
         **dict(config.teacher_kwargs)})


def make_eval_step(model: nn.Module) -> Callable:
  """Per-device eval step ``(variables, batch) -> global sums``.

  Returns the number of real (unmasked) examples and of top-1 / top-5 hits,
  summed over devices, so padding never counts.
  """

  def step(variables, batch):
    logits, _ = model.apply(variables, batch["image"], train=False)
    labels, mask = batch["label"], batch["mask"]
    top1 = jnp.argmax(logits, -1) == labels
    k = min(5, logits.shape[-1])
    top5 = jnp.any(lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
    sums = {"count": jnp.sum(mask), "top1": jnp.sum(top1 * mask),
            "top5": jnp.sum(top5 * mask)}
    return lax.psum(sums, parallel.AXIS)

  return step


def init_variables(model, image_size, seed) -> Dict[str, Any]:
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(seed), x)


def _load_teacher(config, num_classes):
  teacher = build_teacher(config, num_classes)
  abstract = jax.eval_shape(
      lambda: init_variables(teacher, config.image_size, 0))
  try:
    variables = convert.load_variables(config.teacher_checkpoint, abstract)
  except Exception as e:  # orbax raises several types for a mismatch
    raise ConfigError(f"the teacher checkpoint {config.teacher_checkpoint} "
                      f"does not fit {config.teacher_model}: {e}") from None
  return teacher, variables


def sharded_eval_step(model: nn.Module, mesh) -> Callable:
  """``make_eval_step`` as ``jit(shard_map)`` over ``mesh``: replicated
  variables, the batch split along ``'data'``."""
  return parallel.shard_step(make_eval_step(model), mesh,
                             in_specs=(P(), P(parallel.AXIS)), out_specs=P())


def evaluate_split(eval_step: Callable, variables, config,
                   mesh) -> Dict[str, float]:
  """One pass of ``sharded_eval_step`` over ``config``'s eval split.

  Args:
    eval_step: ``sharded_eval_step(model, mesh)``.
    variables: ``{'params', 'batch_stats'}``, replicated over ``mesh``.
    config: the data fields (``data.eval_iterator``) and eval batch size.
    mesh: the ``('data',)`` mesh.

  Returns:
    ``eval_top1`` and ``eval_top5`` (fractions) and ``eval_count``, the
    number of examples, each counted once.
  """
  from ir2net_jax import data  # pylint: disable=g-import-not-at-top
  totals = {"count": 0.0, "top1": 0.0, "top5": 0.0}
  it = data.eval_iterator(config, global_batch_size=_eval_batch_size(config))
  for batch in data.prefetch_to_device(it, config.prefetch,
                                       parallel.batch_sharding(mesh)):
    sums = eval_step(variables, batch)
    for k in totals:
      totals[k] += float(sums[k])
  count = max(totals["count"], 1.0)
  return {"eval_top1": totals["top1"] / count,
          "eval_top5": totals["top5"] / count, "eval_count": totals["count"]}


class _DropLibraryInfo(pylogging.Filter):
  """Keeps INFO lines of orbax / tfds (several per checkpoint) out of the log."""
  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/xla_bridge")

  def filter(self, record):
    return (record.levelno >= pylogging.WARNING
            or not any(p in record.pathname for p in self._NOISY))


def _quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """Trains and evaluates one stage as the config says; returns the summary.

  Resumes from the newest checkpoint in ``workdir`` that every process can
  read, if there is one (``Checkpoints.restore``: corrupt newer ones are
  reported and set aside, and so are ``best/``'s of later steps; an I/O
  error stops the run and moves nothing; ``config_checks.check_resume``
  says what may change); a finished run started again only reports its
  result and writes nothing. A new run starts from ``config.init_from``'s
  converted variables if set, else (stage 2 of an IR2Net model) from the
  last stage-1 checkpoint; a resumed one reads neither.

  Raises:
    DivergenceError: a step's loss, gradient or new state was not finite
      (unless ``config.skip_nonfinite_updates``); nothing from that step on
      was evaluated or saved.
    Preempted: SIGTERM or SIGINT arrived; a checkpoint of the step in flight
      was saved (and waited for) first. No ``summary.json`` is written.
  """
  # The input pipeline imports TensorFlow; the step does not.
  from ir2net_jax import data  # pylint: disable=g-import-not-at-top
  start_time = time.time()
  _quiet_library_logs()
  parallel.init_distributed(config)
  validate_config(config)
  info = data.dataset_info(config)            # DataError if missing
  config_checks.check_num_classes(config, info)
  num_classes = config.num_classes if config.num_classes > 0 else info.num_classes
  workdir = os.path.abspath(workdir)
  resuming = ckpt_lib.latest_step(
      os.path.join(workdir, "checkpoints")) is not None
  # Stage 2 starts from stage 1's last checkpoint unless it starts from
  # init_from's variables or resumes its own checkpoint.
  from_stage1 = (config.model.startswith("ir2net") and config.stage == 2
                 and not config.init_from and not resuming)
  stage1_dir = (ckpt_lib.stage1_directory(config, workdir) if from_stage1
                else None)
  if from_stage1:
    ckpt_lib.check_stage1(config, stage1_dir)
  config_checks.check_resume(workdir, config)
  steps_per_epoch = info.num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f"config.batch_size={config.batch_size} is larger than "
                      f"the {info.num_train} training examples")
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else config.num_epochs * steps_per_epoch)

  mesh = parallel.data_mesh()
  model = build_model(config, num_classes, parallel.AXIS)
  teacher, teacher_vars = (None, {})
  if config.loss == "distillation":
    teacher, teacher_vars = _load_teacher(config, num_classes)
  variables = init_variables(model, config.image_size, config.seed)
  if from_stage1:
    variables = ckpt_lib.restore_stage1_variables(stage1_dir, variables,
                                                  config.model)
    logging.info("stage 2: starting from the last stage-1 checkpoint in %s",
                 stage1_dir)
  elif config.init_from and not resuming:
    variables = ckpt_lib.restore_converted(
        config.init_from, variables, config.model,
        fresh=[m.strip() for m in config.init_from_fresh.split(",")
               if m.strip()])
    logging.info("starting from the variables in %s", config.init_from)
  tx = optim.create_optimizer(config, variables["params"], model,
                              steps_per_epoch)
  state = create_train_state(variables, tx)

  # From here on the workdir is written to.
  is_host0 = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  checkpoints = ckpt_lib.Checkpoints(workdir, config.keep_checkpoints)
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
    config_checks.record_config(workdir, config)
  state = parallel.replicate(state, mesh)
  teacher_vars = parallel.replicate(teacher_vars, mesh)

  train_step = sharded_train_step(model, tx, config, mesh, teacher)
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
  train_iter = data.prefetch_to_device(
      data.train_iterator(config, global_batch_size=config.batch_size,
                          seed=config.seed, start_step=start_step,
                          num_classes=num_classes),
      config.prefetch, parallel.batch_sharding(mesh))
  logging.info("training %s for %d steps (%d per epoch) on %d devices",
               config.name, num_steps, steps_per_epoch, jax.device_count())

  # pending: (step, metrics) since the last logging step, not yet written;
  # every one of them is checked for divergence before anything is
  # evaluated or saved.
  pending, last_eval = [], {}
  pictures = None  # visualize.RestrictionPictures or False, at the first eval
  meta = lambda: {"model": config.model, "stage": config.stage,
                  "name": config.name, "best": best, **last_eval,
                  "skipped_steps": skipped + divergence.count_skipped(pending)}
  try:
    with preemption.StopSignals() as stop_signals:
      for step in range(start_step + 1, num_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = train_step(state, next(train_iter), teacher_vars)
        pending.append((step, metrics))
        report(step)
        stop = stop_signals.stop_requested(step)
        log_now = step % config.log_every_steps == 0 or step == num_steps
        end_of_epoch = step % steps_per_epoch == 0
        eval_now = not stop and (step == num_steps or (
            end_of_epoch and
            (step // steps_per_epoch) % config.eval_every_epochs == 0))
        if log_now or eval_now or stop or step % ckpt_every == 0:
          divergence.check(pending, config, checkpoints.latest_step())
        if log_now:
          summary, histograms = _train_metrics(pending)
          skipped += int(summary.get("skipped_steps", 0))
          summary["learning_rate"] = float(schedule(step - 1))
          writer.write_scalars(step, {f"train_{k}": v
                                      for k, v in summary.items()})
          if histograms:
            writer.write_histograms(step, {f"train_{k}": v
                                           for k, v in histograms.items()})
          pending = []
        is_best = False
        if eval_now:
          last_eval = evaluate_split(
              eval_step, {"params": state.params,
                          "batch_stats": state.batch_stats}, config, mesh)
          writer.write_scalars(step, last_eval)
          if pictures is None:  # made once, at the first evaluation
            pictures = _restriction_pictures(config, model, mesh, workdir)
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
        if stop:
          checkpoints.wait()
          raise Preempted(step, stop_signals.signum,
                          checkpoints.step_path(step))
    if not last_eval:  # a finished run started again: report its result
      last_eval = evaluate_split(
          eval_step, {"params": state.params,
                      "batch_stats": state.batch_stats}, config, mesh)
  finally:
    # Whatever stops the loop, a save in flight (of a checked, finite state)
    # is finished, and the metrics written so far reach the disk.
    writer.close()
    checkpoints.wait()
    checkpoints.close()
  summary = {
      "name": config.name, "model": config.model, "stage": config.stage,
      "dataset": config.dataset, "steps": max(num_steps, start_step),
      "final_eval_top1": last_eval.get("eval_top1"),
      "final_eval_top5": last_eval.get("eval_top5"),
      "best_eval_top1": best["eval_top1"], "best_eval_top5": best["eval_top5"],
      "skipped_steps": skipped,
      "wall_time_s": time.time() - start_time,
      "devices": jax.device_count(), "processes": jax.process_count(),
  }
  if is_host0 and not finished:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  logging.info("done: %s", json.dumps(summary))
  return summary


def _restriction_pictures(config, model, mesh, workdir):
  """What draws information restriction at each evaluation, or False.

  False without information restriction (nothing is erased, there is no
  second pass to show) or with ``config.restriction_images == 0``.
  """
  if not (config.information_restriction and config.restriction_images):
    return False
  from ir2net_jax import visualize  # pylint: disable=g-import-not-at-top
  return visualize.RestrictionPictures(config, model, mesh, workdir)


# Per-example metrics: written as histograms of every value, never averaged.
_HISTOGRAMS = (diagnostics.KEPT_PIXELS,)


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
