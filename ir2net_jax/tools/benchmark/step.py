"""Compiling and timing one recipe's train step (and inference): one row of
the table. The package docstring defines the columns and the FLOP count."""

import os
import statistics
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ir2net_jax.train import optim, parallel, step as step_lib
from ir2net_jax import models
from ir2net_jax.backend import policy
from ir2net_jax.models import costs
from ir2net_jax.tools.benchmark import hardware
from ir2net_jax.tools.benchmark.recipes import UsageError

__all__ = ["train_step_flops", "check", "benchmark_recipe"]


def _forward_macs(model, image_size: int) -> int:
  """Forward MACs per example, binary (BOPs) and real (FLOPs) together."""
  summary = costs.summarize(model, (1, image_size, image_size, 3))
  return summary.bops + summary.flops


def train_step_flops(config, student, teacher=None) -> Dict[str, int]:
  """Model FLOPs of one train step of the global batch.

  Args:
    config: the recipe's config (batch_size, image_size,
      information_restriction).
    student: the student model (without ``axis_name``).
    teacher: the teacher model, or None.

  Returns:
    ``{'student_macs', 'teacher_macs', 'flops_per_step'}``, MACs per example:
    ``flops_per_step = B * (2 * 3 * passes * student_macs + 2 *
    teacher_macs)`` with ``passes`` 2 under information restriction, else 1.
  """
  size = config.image_size
  student_macs = _forward_macs(student, size)
  teacher_macs = _forward_macs(teacher, size) if teacher is not None else 0
  passes = 2 if config.information_restriction else 1
  per_example = 2 * 3 * passes * student_macs + 2 * teacher_macs
  return {"student_macs": student_macs, "teacher_macs": teacher_macs,
          "flops_per_step": config.batch_size * per_example}


def _median_seconds(run_once: Callable[[], Any], warmup: int,
                    steps: int) -> float:
  """Median wall time of ``steps`` calls after ``warmup`` untimed ones."""
  for _ in range(warmup):
    jax.block_until_ready(run_once())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run_once())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _profile(run_once: Callable[[], Any], log_dir: str, steps: int) -> None:
  """A ``jax.profiler`` trace of ``steps`` more calls, for TensorBoard."""
  with jax.profiler.trace(log_dir):
    for step in range(steps):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        jax.block_until_ready(run_once())


def _synthetic_batch(config, mesh) -> Dict[str, jax.Array]:
  """A random normalised batch, split over the mesh like real batches."""
  rng = np.random.default_rng(0)
  size, batch = config.image_size, config.batch_size
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  host = {"image": images.astype(jnp.dtype(config.dtype)),
          "label": rng.integers(0, config.num_classes, batch).astype(np.int32)}
  return jax.device_put(host, parallel.batch_sharding(mesh))


def _inference_seconds(model, variables, images, mesh, warmup: int,
                       steps: int) -> float:
  """Median time of ``model.apply(..., train=False)`` on the global batch,
  split over the mesh as the eval step is (``shard_map``, logits out)."""
  apply = parallel.shard_step(
      lambda v, x: model.apply(v, x, train=False)[0], mesh,
      in_specs=(P(), P(parallel.AXIS)), out_specs=P(parallel.AXIS))
  compiled = apply.lower(variables, images).compile()
  return _median_seconds(lambda: compiled(variables, images), warmup, steps)


def _models(config):
  """``(student for the step, student without axis_name, teacher or None)``.

  Cheap (no JAX work); raises ValueError for bad model arguments.
  """
  model = step_lib.build_model(config, config.num_classes, parallel.AXIS)
  plain = step_lib.build_model(config, config.num_classes, None)
  teacher = None
  if config.loss == "distillation":
    teacher = step_lib.build_teacher(config, config.num_classes)
  return model, plain, teacher


def check(name: str, config, devices: int) -> None:
  """Fails fast, before anything is compiled, on a config that cannot run.

  Raises:
    UsageError: a batch the devices cannot split, or bad model arguments.
  """
  if config.batch_size % devices:
    raise UsageError(f"{name}: batch {config.batch_size} is not divisible by "
                     f"the {devices} devices; use --per_device_batch")
  try:
    _models(config)
  except ValueError as e:
    raise UsageError(f"{name}: {e}") from None


def benchmark_recipe(name: str, config, mesh, warmup: int = 2,
                     steps: int = 10, inference: bool = True,
                     profile_dir: Optional[str] = None,
                     profile_steps: int = 3) -> Dict[str, Any]:
  """Compiles and times one recipe's train step (and inference).

  Args:
    name: the row's name.
    config: from ``recipes.recipe_config``.
    mesh: a ``('data',)`` mesh; the batch must divide over its devices.
    warmup: untimed steps after compiling.
    steps: timed steps (the median is reported).
    inference: also time ``model.apply(..., train=False)``.
    profile_dir: if set, trace ``profile_steps`` more steps into
      ``profile_dir/name`` after timing.
    profile_steps: steps traced.

  Returns:
    One row (a flat dict; the package docstring describes the columns).
  """
  devices = mesh.devices.size
  check(name, config, devices)
  model, plain, teacher = _models(config)
  variables = models.init_variables(model, config.image_size, config.seed)
  teacher_vars = {}
  if teacher is not None:  # Random weights: no checkpoint needed.
    teacher_vars = models.init_variables(teacher, config.image_size,
                                        config.seed + 1)
  batch = _synthetic_batch(config, mesh)

  infer_s = None
  if inference:  # Before training donates buffers ``variables`` may share.
    infer_s = _inference_seconds(plain, parallel.replicate(variables, mesh),
                                 batch["image"], mesh, warmup, steps)

  tx = optim.create_optimizer(config, variables["params"], model,
                              steps_per_epoch=1000)
  state = parallel.replicate(step_lib.create_train_state(variables, tx), mesh)
  teacher_vars = parallel.replicate(teacher_vars, mesh)
  step = step_lib.sharded_train_step(model, tx, config, mesh, teacher)
  start = time.perf_counter()
  compiled = step.lower(state, batch, teacher_vars).compile()
  compile_s = time.perf_counter() - start

  current = [state]

  def run_once():
    current[0], _ = compiled(current[0], batch, teacher_vars)
    return current[0]

  step_s = _median_seconds(run_once, warmup, steps)
  if profile_dir:
    _profile(run_once, os.path.join(profile_dir, name), profile_steps)
  flops = train_step_flops(config, plain, teacher)
  return _row(name, config, devices, compile_s, step_s, infer_s, flops,
              hardware.xla_memory_mb(compiled))


def _row(name, config, devices, compile_s, step_s, infer_s, flops,
         xla_memory) -> Dict[str, Any]:
  """Assembles a result row; derived rates included."""
  kind = jax.local_devices()[0].device_kind
  memory_mb, memory_source = hardware.peak_memory_mb()
  return {
      "recipe": name,
      "model": config.model,
      "stage": config.stage if config.model.startswith("ir2net") else None,
      "batch": config.batch_size,
      "per_device_batch": config.batch_size // devices,
      "image_size": config.image_size,
      "devices": devices,
      "dtype": config.dtype,
      "remat": bool(config.get("remat", False)),
      "binary_compute_dtype": policy.binary_compute_dtype(config),
      "compile_s": compile_s,
      "step_s": step_s,
      "images_per_s": config.batch_size / step_s,
      "inference_images_per_s": (config.batch_size / infer_s
                                 if infer_s else None),
      **flops,
      "tflops_per_s": flops["flops_per_step"] / step_s / 1e12,
      "peak_flops_per_device": hardware.peak_flops(kind, config.dtype),
      "mfu": hardware.mfu(flops["flops_per_step"], step_s, kind,
                          config.dtype, devices),
      "peak_memory_mb": memory_mb,
      "peak_memory_source": memory_source,
      **xla_memory,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
