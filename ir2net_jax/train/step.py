"""The training and evaluation steps, and what they run on.

* ``build_model`` / ``build_teacher``: the networks a config names, with
  the dtypes and kernels of ``backend.policy`` for the backend;
* ``TrainState`` and ``create_train_state``: what a step changes;
* ``make_train_step`` / ``make_eval_step``: the per-device steps
  (``axis_name='data'`` collectives), and ``sharded_train_step`` /
  ``sharded_eval_step``: the same under ``jit(shard_map)`` over the
  ``('data',)`` mesh.

Nothing here imports TensorFlow: the input pipeline is the loop's.
"""

from typing import Any, Callable, Dict, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from ir2net_jax import models
from ir2net_jax.backend import policy
from ir2net_jax.configs import ConfigError
from ir2net_jax.nn import losses, objective
from ir2net_jax.train import diagnostics, divergence, parallel

__all__ = ["TrainState", "build_model", "build_teacher", "create_train_state",
           "make_train_step", "sharded_train_step", "make_eval_step",
           "sharded_eval_step"]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


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
                       config, mesh, teacher: Optional[nn.Module] = None,
                       batch_fn: Optional[Callable] = None) -> Callable:
  """``make_train_step`` as ``jit(shard_map)`` over ``mesh``: replicated state
  (donated) and teacher variables, the batch split along ``'data'``.

  With ``batch_fn`` (the on-device input engine's ``(data, step) ->
  global batch``) the step's second argument is ``data`` instead of a batch,
  and the step draws batch ``state.step`` from it inside the same program.
  """
  specs = dict(in_specs=(P(), P(parallel.AXIS), P()), out_specs=(P(), P()))
  per_device = make_train_step(model, tx, config, teacher)
  if batch_fn is None:
    return parallel.shard_step(per_device, mesh, donate_argnums=(0,), **specs)
  sharded = jax.shard_map(per_device, mesh=mesh, **specs)

  def drawn(state: TrainState, data, teacher_vars):
    return sharded(state, batch_fn(data, state.step), teacher_vars)

  return jax.jit(drawn, donate_argnums=(0,))


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


def make_eval_step(model: nn.Module,
                   logits_fn: Optional[Callable] = None) -> Callable:
  """Per-device eval step ``(variables, batch) -> global sums``.

  Returns the number of real (unmasked) examples, of top-1 / top-5 hits and
  their cross-entropy, summed over devices, so padding never counts.
  ``logits_fn(variables, images) -> logits`` replaces the model's eval
  apply where given (a packed model's, ``deploy.evaluate``).
  """
  if logits_fn is None:
    logits_fn = lambda v, x: model.apply(v, x, train=False)[0]

  def step(variables, batch):
    logits = logits_fn(variables, batch["image"])
    labels, mask = batch["label"], batch["mask"]
    top1 = jnp.argmax(logits, -1) == labels
    k = min(5, logits.shape[-1])
    top5 = jnp.any(lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.maximum(labels, 0))
    sums = {"count": jnp.sum(mask), "top1": jnp.sum(top1 * mask),
            "top5": jnp.sum(top5 * mask), "loss": jnp.sum(loss * mask)}
    return lax.psum(sums, parallel.AXIS)

  return step


def sharded_eval_step(model: nn.Module, mesh,
                      logits_fn: Optional[Callable] = None) -> Callable:
  """``make_eval_step`` as ``jit(shard_map)`` over ``mesh``: replicated
  variables, the batch split along ``'data'``."""
  return parallel.shard_step(make_eval_step(model, logits_fn), mesh,
                             in_specs=(P(), P(parallel.AXIS)), out_specs=P())
