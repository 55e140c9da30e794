"""Throughput of the recipes: the real train step, inference, input pipeline.

  python -m ir2net_jax.benchmark                       # every recipe
  python -m ir2net_jax.benchmark --recipes=cifar_resnet20,ir2net_a_stage2 \
      --steps=20 --binary_compute_dtype=bfloat16
  python -m ir2net_jax.benchmark --recipes=ir2net_d_stage2 --json

For each recipe this compiles and times the very step ``train_and_evaluate``
runs: ``train.make_train_step`` under ``parallel.shard_step`` on a
``('data',)`` mesh of every local device (both information-restriction
passes, the loss, the backward pass, the optimizer update, the donated
state; for the ImageNet recipes also the ResNet-34 teacher's forward, with
randomly initialised weights so that no checkpoint is needed), on a
synthetic batch that stays on the devices. Nothing is read from disk and no
workdir is written.

Recipes (``--recipes``, comma-separated; default all): ``cifar_resnet20``,
``cifar_vgg_small``, ``cifar_resnet18`` (``configs/cifar10_*.py``, batch
128) and ``ir2net_{a,d}_stage{1,2}`` (``configs/imagenet.py:a,stage=1`` etc.,
batch 16, 224x224, with the teacher). ``--batch_size`` and ``--image_size``
replace those for every recipe; ``--binary_compute_dtype=bfloat16`` (``''``
for float32; the default ``auto`` is int8 for ImageNet stage 2 on CPU),
``--dtype=bfloat16`` and ``--set=field=value`` (repeatable, dotted names
reach ``model_kwargs`` / ``teacher_kwargs``) change config fields of every
recipe, so speed options can be compared. ``--xla_cpu_flags`` is
``config.xla_cpu_flags`` (``ir2net_jax.xla_cpu``), applied before JAX
starts: ``auto`` by default, ``''`` for XLA's own defaults. ``--tiny`` (tests) keeps one block
per stage and 32x32 ImageNet images. ``--json`` prints one JSON document
(environment, rows, pipelines) instead of the table.

Columns:

* ``compile s``: ``.lower(...).compile()`` of the train step (tracing
  included).
* ``step s``: median wall time of ``--steps`` steps after ``--warmup``
  warm-up steps, each ended with ``block_until_ready`` on the new state.
* ``img/s``: global batch / median step time.
* ``infer img/s``: ``model.apply(..., train=False)`` jitted, same batch,
  global batch / median call time.
* ``TFLOP/s`` and ``MFU``: model FLOPs of a train step (below) / step time,
  and that as a fraction of the devices' dense bfloat16 peak (``PEAK_FLOPS``;
  '-' where the device is not listed, e.g. CPUs).
* ``peak MB``: the first local device's ``peak_bytes_in_use`` (GPU, TPU) or,
  where devices keep no statistics (CPU), the process's peak RSS; both are
  high-water marks of the whole process, so they only grow from one recipe
  to the next (run one recipe per process for each one's own peak).
* ``xla MB``: what XLA's memory analysis of the compiled step says one
  device needs (arguments + outputs + temporaries - donated aliases).

Model FLOPs of one train step, per global batch of B images. ``costs``
counts forward multiply-accumulates (MACs) per example: BOPs (binary
convolutions) and FLOPs (real convolutions and linear layers). Binary
convolutions run as ordinary convolutions of +-1 values here, so both count
as MACs alike, at 2 FLOPs each. Training costs about 3 forward passes
(forward, gradient w.r.t. inputs, gradient w.r.t. weights), and IR2Net
trains on two passes (clean and erased batch); the frozen teacher runs one
forward pass::

  student_macs = bops + flops                 (student, per example)
  teacher_macs = bops + flops                 (teacher, per example; 0 if none)
  flops/step   = B * (2 * 3 * passes * student_macs + 2 * teacher_macs)
  MFU          = flops/step / step_s / (peak FLOP/s per device * devices)

with ``passes = 2`` (1 with ``information_restriction=False``). BatchNorm,
activations, pooling, the attention mask and the optimizer are not counted.

The input pipeline is timed on its own, on the host's CPUs: the ImageNet
train augmentation (fused JPEG decode + RandomResizedCrop, lighting, flip,
normalise; ``data.recipes.imagenet_train``) over JPEGs made here, and the
digits pipeline (``data.train_iterator`` on a digits data set built in a
temporary directory).
"""

import argparse
import ast
import contextlib
import dataclasses
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from ir2net_jax import costs, data, optim, parallel, train, xla_cpu
from ir2net_jax.data import sources

__all__ = ["Recipe", "RECIPES", "PEAK_FLOPS", "recipe_config",
           "apply_override", "train_step_flops", "peak_flops",
           "benchmark_recipe", "benchmark_pipelines", "main"]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A benchmarked recipe.

  Attributes:
    config_module: module with ``get_config(arg)``, e.g. ``configs.imagenet``.
    config_arg: its argument, e.g. ``'a,stage=2'``.
    batch_size: default global batch of the benchmark (not the recipe's).
  """
  config_module: str
  config_arg: str
  batch_size: int


RECIPES: Dict[str, Recipe] = {
    "cifar_resnet20": Recipe("configs.cifar10_resnet20", "", 128),
    "cifar_vgg_small": Recipe("configs.cifar10_vgg_small", "", 128),
    "cifar_resnet18": Recipe("configs.cifar10_resnet18", "", 128),
    **{f"ir2net_{v}_stage{s}": Recipe("configs.imagenet", f"{v},stage={s}", 16)
       for v in "ad" for s in (1, 2)},
}

# (device_kind substring, dense bfloat16 FLOP/s, float32 FLOP/s or None) per
# device, most specific first. float32 is the non-tensor-core rate.
PEAK_FLOPS: Tuple[Tuple[str, float, Optional[float]], ...] = (
    ("H100 PCIe", 756e12, 51e12),
    ("H100 NVL", 835e12, 60e12),
    ("H100", 989e12, 67e12),          # SXM
    ("H200", 989e12, 67e12),          # also GH200
    ("A100", 312e12, 19.5e12),
    ("V100", 125e12, 15.7e12),        # float16 tensor cores
    ("TPU v6 lite", 918e12, None),    # v6e (Trillium)
    ("TPU v5 lite", 197e12, None),    # v5e
    ("TPU v5", 459e12, None),         # v5p
    ("TPU v4", 275e12, None),
    ("TPU v3", 61.5e12, None),        # one core (a device) of a v3 chip
)

_MB = 1e6


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------


def _parse_value(text: str, current: Any) -> Any:
  """``text`` as a Python literal (else a string), fitted to ``current``.

  Booleans accept true/false/yes/no/1/0; an int is widened to a float field;
  a non-string literal for a string field stays the text; lists become
  tuples. Other mismatches are left to ConfigDict, which raises TypeError.
  """
  if isinstance(current, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"not a boolean: {text!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  if isinstance(current, str) and not isinstance(value, str):
    return text
  if isinstance(current, float) and isinstance(value, int):
    return float(value)
  return tuple(value) if isinstance(value, list) else value


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
  """Sets one config field from ``'field=value'``, in place.

  Dotted names reach into sub-configs (``model_kwargs.num_blocks=(1,1,1)``).
  The value is read by :func:`_parse_value` (a Python literal when it is
  one, else a string, fitted to the field's current type).

  Raises:
    ValueError: no ``=``, or a field that does not exist (new keys are
      allowed only inside ``*_kwargs``).
  """
  field, sep, text = assignment.partition("=")
  if not sep or not field:
    raise ValueError(f"--set wants field=value, got {assignment!r}")
  *parents, leaf = field.split(".")
  node = config
  for name in parents:
    node = node[name]
  if leaf not in node and not (parents and parents[-1].endswith("_kwargs")):
    raise ValueError(f"config has no field {field!r}")
  node[leaf] = _parse_value(text, node.get(leaf))


def _tiny_blocks(model: str) -> Optional[Tuple[int, ...]]:
  """One block per stage for ``model``; None if it has no ``num_blocks``."""
  if model == "cifar_vgg_small":
    return None
  return (1, 1, 1) if model == "cifar_resnet20" else (1, 1, 1, 1)


def recipe_config(name: str, batch_size: Optional[int] = None,
                  image_size: Optional[int] = None, tiny: bool = False,
                  overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of recipe ``name`` with the benchmark's changes.

  Args:
    name: a key of ``RECIPES``.
    batch_size: global batch; default the recipe's benchmark batch.
    image_size: input height and width; default the recipe's.
    tiny: one block per stage (student and teacher) and, for the ImageNet
      recipes, 32x32 images: for tests.
    overrides: ``'field=value'`` strings for :func:`apply_override`, applied
      last.

  Raises:
    ValueError: unknown recipe or bad override.
  """
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; choose from {list(RECIPES)}")
  recipe = RECIPES[name]
  config = importlib.import_module(recipe.config_module).get_config(
      recipe.config_arg)
  config.batch_size = batch_size or recipe.batch_size
  if tiny:
    blocks = _tiny_blocks(config.model)
    if blocks:
      config.model_kwargs.num_blocks = blocks
    if config.loss == "distillation":
      config.teacher_kwargs.num_blocks = (1, 1, 1, 1)
    if config.dataset == "imagenet2012":
      config.image_size = 32
  if image_size:
    config.image_size = image_size
  for assignment in overrides:
    apply_override(config, assignment)
  return config


def _num_classes(config) -> int:
  if config.num_classes > 0:
    return config.num_classes
  return sources.DATASETS[config.dataset].num_classes


# ----------------------------------------------------------------------------
# FLOPs, peaks, memory
# ----------------------------------------------------------------------------


def _forward_macs(model, image_size: int) -> int:
  """Forward MACs per example, binary (BOPs) and real (FLOPs) together."""
  summary = costs.summarize(model, (1, image_size, image_size, 3))
  return summary.bops + summary.flops


def train_step_flops(config, student, teacher=None) -> Dict[str, int]:
  """Model FLOPs of one train step of the global batch (module docstring).

  Args:
    config: the recipe's config (batch_size, image_size,
      information_restriction).
    student: the student model (without ``axis_name``).
    teacher: the teacher model, or None.

  Returns:
    ``{'student_macs', 'teacher_macs', 'flops_per_step'}``, MACs per example.
  """
  size = config.image_size
  student_macs = _forward_macs(student, size)
  teacher_macs = _forward_macs(teacher, size) if teacher is not None else 0
  passes = 2 if config.information_restriction else 1
  per_example = 2 * 3 * passes * student_macs + 2 * teacher_macs
  return {"student_macs": student_macs, "teacher_macs": teacher_macs,
          "flops_per_step": config.batch_size * per_example}


def peak_flops(device_kind: str) -> Optional[Tuple[float, Optional[float]]]:
  """``(dense bf16, fp32)`` peak FLOP/s of one device, None if unknown."""
  for key, bf16, fp32 in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return bf16, fp32
  return None


def peak_memory_mb() -> Tuple[float, str]:
  """``(MB, source)``: device ``peak_bytes_in_use``, else peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / _MB, "device peak_bytes_in_use"
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
  return rss_kb * 1e3 / _MB, "process peak RSS"


def _xla_memory_mb(compiled) -> Optional[float]:
  """Per-device bytes XLA plans for ``compiled``, in MB, if it says."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  used = (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)
  return used / _MB


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


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


def _synthetic_batch(config, num_classes: int, mesh) -> Dict[str, jax.Array]:
  """A random normalised batch, split over the mesh like real batches."""
  rng = np.random.default_rng(0)
  size, batch = config.image_size, config.batch_size
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  host = {"image": images.astype(jnp.dtype(config.dtype)),
          "label": rng.integers(0, num_classes, batch).astype(np.int32)}
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


def _models(config, num_classes: int):
  """``(student for the step, student without axis_name, teacher or None)``.

  Cheap (no JAX work); raises ValueError for bad model arguments.
  """
  model = train.build_model(config, num_classes, parallel.AXIS)
  plain = train.build_model(config, num_classes, None)
  teacher = None
  if config.loss == "distillation":
    teacher = train.build_teacher(config, num_classes)
  return model, plain, teacher


def _check(name: str, config, devices: int) -> None:
  """Fails fast, before anything is compiled, on a config that cannot run."""
  if config.batch_size % devices:
    raise ValueError(f"{name}: batch {config.batch_size} is not divisible by "
                     f"the {devices} devices")
  _models(config, _num_classes(config))


def benchmark_recipe(name: str, config, mesh, warmup: int = 2,
                     steps: int = 10, inference: bool = True
                     ) -> Dict[str, Any]:
  """Compiles and times one recipe's train step (and inference).

  Args:
    name: the row's name.
    config: from :func:`recipe_config`.
    mesh: a ``('data',)`` mesh; the batch must divide over its devices.
    warmup: untimed steps after compiling.
    steps: timed steps (the median is reported).
    inference: also time ``model.apply(..., train=False)``.

  Returns:
    One row (a flat dict; see the module docstring for the columns).
  """
  devices = mesh.devices.size
  _check(name, config, devices)
  num_classes = _num_classes(config)
  model, plain, teacher = _models(config, num_classes)
  variables = train.init_variables(model, config.image_size, config.seed)
  teacher_vars = {}
  if teacher is not None:  # Random weights: no checkpoint needed.
    teacher_vars = train.init_variables(teacher, config.image_size,
                                        config.seed + 1)
  batch = _synthetic_batch(config, num_classes, mesh)

  infer_s = None
  if inference:  # Before training donates buffers ``variables`` may share.
    infer_s = _inference_seconds(plain, parallel.replicate(variables, mesh),
                                 batch["image"], mesh, warmup, steps)

  tx = optim.create_optimizer(config, variables["params"], model,
                              steps_per_epoch=1000)
  state = parallel.replicate(train.create_train_state(variables, tx), mesh)
  teacher_vars = parallel.replicate(teacher_vars, mesh)
  step = train.sharded_train_step(model, tx, config, mesh, teacher)
  start = time.perf_counter()
  compiled = step.lower(state, batch, teacher_vars).compile()
  compile_s = time.perf_counter() - start

  current = [state]

  def run_once():
    current[0], _ = compiled(current[0], batch, teacher_vars)
    return current[0]

  step_s = _median_seconds(run_once, warmup, steps)
  flops = train_step_flops(config, plain, teacher)
  return _row(name, config, devices, compile_s, step_s, infer_s, flops,
              _xla_memory_mb(compiled))


def _row(name, config, devices, compile_s, step_s, infer_s, flops,
         xla_mb) -> Dict[str, Any]:
  """Assembles a result row; derived rates included."""
  kind = jax.local_devices()[0].device_kind
  peak = peak_flops(kind)
  achieved = flops["flops_per_step"] / step_s
  memory_mb, memory_source = peak_memory_mb()
  return {
      "recipe": name,
      "model": config.model,
      "stage": config.stage if config.model.startswith("ir2net") else None,
      "batch": config.batch_size,
      "image_size": config.image_size,
      "devices": devices,
      "dtype": config.dtype,
      "binary_compute_dtype": train.binary_compute_dtype(config),
      "compile_s": compile_s,
      "step_s": step_s,
      "images_per_s": config.batch_size / step_s,
      "inference_images_per_s": (config.batch_size / infer_s
                                 if infer_s else None),
      **flops,
      "tflops_per_s": achieved / 1e12,
      "peak_flops_per_device": peak[0] if peak else None,
      "mfu": achieved / (peak[0] * devices) if peak else None,
      "mfu_fp32": (achieved / (peak[1] * devices)
                   if peak and peak[1] else None),
      "peak_memory_mb": memory_mb,
      "peak_memory_source": memory_source,
      "xla_memory_mb": xla_mb,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


# ----------------------------------------------------------------------------
# Input pipelines
# ----------------------------------------------------------------------------


def _synthetic_jpegs(count: int, height: int = 375, width: int = 500,
                     seed: int = 0) -> List[bytes]:
  """JPEGs of smooth random images with some noise (natural-ish sizes)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  jpegs = []
  for _ in range(count):
    coarse = rng.uniform(0, 255, size=(1, height // 25, width // 25, 3))
    image = tf.image.resize(coarse, [height, width], method="bicubic")[0]
    image = image + rng.normal(0, 8, size=(height, width, 3))
    image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
    jpegs.append(tf.io.encode_jpeg(image, quality=90).numpy())
  return jpegs


def _examples_per_second(batches, batch_size: int, examples: int,
                         warmup_batches: int = 2) -> float:
  """Examples/s of an iterator of batches, after a few untimed batches."""
  iterator = iter(batches)
  for _ in range(warmup_batches):
    next(iterator)
  num_batches = max(1, -(-examples // batch_size))
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * batch_size / (time.perf_counter() - start)


def imagenet_pipeline_images_per_s(image_size: int = 224,
                                   examples: int = 512,
                                   batch_size: int = 32,
                                   num_jpegs: int = 64) -> float:
  """ImageNet train augmentation alone, examples/s on this host's CPUs.

  ``data.recipes.imagenet_train`` mapped in parallel over ``num_jpegs``
  500x375 JPEGs, repeated, batched, as the training pipeline maps it.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data import recipes  # pylint: disable=g-import-not-at-top

  def augment(index, jpeg):
    seed = tf.stack([tf.constant(0, tf.int64), index])
    return tf.cast(recipes.imagenet_train(jpeg, seed, image_size), tf.float32)

  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  ds = tf.data.Dataset.from_tensor_slices(_synthetic_jpegs(num_jpegs))
  ds = ds.repeat().enumerate().map(augment, num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  batches = ds.with_options(options).as_numpy_iterator()
  return _examples_per_second(batches, batch_size, examples)


def digits_pipeline_images_per_s(examples: int = 2048,
                                 batch_size: int = 64) -> float:
  """``data.train_iterator`` of the digits recipe, examples/s, after one
  epoch (which fills the cache); builds digits in a temporary directory."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  data_dir = tempfile.mkdtemp(prefix="ir2net_bench_digits_")
  try:
    config = digits.get_config()
    config.data_dir = data_dir
    batches = data.train_iterator(config, global_batch_size=batch_size,
                                  seed=0, process_index=0, process_count=1)
    epoch = -(-data.dataset_info(config).num_train // batch_size)
    return _examples_per_second(batches, batch_size, examples,
                                warmup_batches=epoch)
  finally:
    shutil.rmtree(data_dir, ignore_errors=True)


def benchmark_pipelines(image_size: int = 224, examples: int = 512
                        ) -> List[Dict[str, Any]]:
  """Both input pipelines; one dict per pipeline."""
  from ir2net_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline._hide_accelerators_from_tf()  # pylint: disable=protected-access
  imagenet = imagenet_pipeline_images_per_s(image_size, examples)
  with contextlib.redirect_stdout(sys.stderr):  # tfds prints as it builds.
    digits = digits_pipeline_images_per_s(max(examples, 64))
  return [
      {"pipeline": "imagenet_train", "image_size": image_size,
       "images_per_s": imagenet},
      {"pipeline": "digits_train", "image_size": 32, "images_per_s": digits},
  ]


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------


def environment() -> Dict[str, Any]:
  """Devices and versions, printed above the table."""
  device = jax.local_devices()[0]
  return {
      "device_kind": device.device_kind,
      "platform": device.platform,
      "local_devices": jax.local_device_count(),
      "jax_version": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "host_cpus": os.cpu_count(),
      "peak_memory_source": peak_memory_mb()[1],
  }


# (header, row key, format)
_ROW_COLUMNS = (
    ("recipe", "recipe", "{}"),
    ("batch", "batch", "{:d}"),
    ("size", "image_size", "{:d}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("step s", "step_s", "{:.4f}"),
    ("img/s", "images_per_s", "{:.1f}"),
    ("infer img/s", "inference_images_per_s", "{:.1f}"),
    ("GFLOP/step", "flops_per_step", "{:.1f}"),
    ("TFLOP/s", "tflops_per_s", "{:.3f}"),
    ("MFU %", "mfu", "{:.1f}"),
    ("peak MB", "peak_memory_mb", "{:.0f}"),
    ("xla MB", "xla_memory_mb", "{:.0f}"),
)
_SCALE = {"flops_per_step": 1e-9, "mfu": 100.0}


def _cell(row: Dict[str, Any], key: str, fmt: str) -> str:
  value = row.get(key)
  if value is None:
    return "-"
  return fmt.format(value * _SCALE.get(key, 1))


def _flags_lines(env, rows) -> List[str]:
  flags = {r.get("xla_flags", env["xla_flags"]) for r in rows}
  if len(flags) <= 1:
    return [f"XLA_FLAGS={(flags.pop() if flags else env['xla_flags'])!r}"]
  return [f"XLA_FLAGS for {r['recipe']}: {r['xla_flags']!r}" for r in rows]


def format_table(env: Dict[str, Any], rows: Sequence[Dict[str, Any]],
                 pipelines: Sequence[Dict[str, Any]]) -> str:
  """Header lines, one fixed-width row per recipe, one line of pipelines."""
  lines = [
      f"device: {env['device_kind']} x {env['local_devices']} "
      f"({env['platform']}), host CPUs: {env['host_cpus']}",
      f"jax {env['jax_version']}",
      *_flags_lines(env, rows),
      f"peak MB: {env['peak_memory_source']} (a high-water mark of the "
      "process); MFU: of the dense bf16 peak",
  ]
  header = [h for h, _, _ in _ROW_COLUMNS]
  body = [[_cell(r, k, f) for _, k, f in _ROW_COLUMNS] for r in rows]
  widths = [max(len(c) for c in col) for col in zip(header, *body)]
  fmt_line = lambda cells: "  ".join(
      [cells[0].ljust(widths[0])]
      + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])
  lines += [fmt_line(header), "-" * len(fmt_line(header))]
  lines += [fmt_line(cells) for cells in body]
  if pipelines:
    lines.append("input pipeline (host CPUs, img/s): " + ", ".join(
        f"{p['pipeline']} {p['image_size']}px {p['images_per_s']:.0f}"
        for p in pipelines))
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m ir2net_jax.benchmark",
      description=__doc__.split("\n\n")[0])
  parser.add_argument("--recipes", default=",".join(RECIPES),
                      help=f"comma-separated, from {list(RECIPES)}")
  parser.add_argument("--steps", type=int, default=10,
                      help="timed steps per recipe (median reported)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps after compiling")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="global batch for every recipe (default: 128 "
                           "CIFAR, 16 ImageNet)")
  parser.add_argument("--image_size", type=int, default=None,
                      help="input size for every recipe and the ImageNet "
                           "pipeline")
  parser.add_argument("--binary_compute_dtype", default=None,
                      help="config.binary_compute_dtype: 'auto' (the "
                           "default), '' (float32), int8, bfloat16")
  parser.add_argument("--dtype", default=None,
                      help="config.dtype (input images), e.g. bfloat16")
  parser.add_argument("--xla_cpu_flags", default=xla_cpu.AUTO,
                      help="added to XLA_FLAGS before JAX starts, as "
                           "config.xla_cpu_flags: 'auto' (per recipe, see "
                           "ir2net_jax.xla_cpu), '' for XLA's defaults, or "
                           "flags")
  parser.add_argument("--set", action="append", default=[],
                      metavar="FIELD=VALUE", dest="overrides",
                      help="any config field (repeatable), e.g. "
                           "--set=erase_lambda=0.2 "
                           "--set=model_kwargs.num_blocks=(1,1,1)")
  parser.add_argument("--tiny", action="store_true",
                      help="one block per stage, 32px ImageNet (tests)")
  parser.add_argument("--pipeline_examples", type=int, default=512,
                      help="examples timed per input pipeline")
  parser.add_argument("--skip_pipeline", action="store_true")
  parser.add_argument("--skip_inference", action="store_true")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON document instead of the table")
  args = parser.parse_args(argv)
  args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
  unknown = [r for r in args.recipes if r not in RECIPES]
  if unknown:
    parser.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  return args


def _overrides(args) -> List[str]:
  """``--dtype`` and ``--binary_compute_dtype`` as ``--set`` strings, first."""
  out = [f"{field}={getattr(args, field)}"
         for field in ("binary_compute_dtype", "dtype")
         if getattr(args, field) is not None]
  return out + list(args.overrides)


def _rows_in_subprocesses(args, flags: Dict[str, str]) -> List[Dict]:
  """Benchmarks each group of recipes that wants other XLA flags in a fresh
  process (XLA reads its flags once); rows come back in recipe order."""
  common = [f"--steps={args.steps}", f"--warmup={args.warmup}", "--json",
            "--skip_pipeline"] + [f"--set={o}" for o in _overrides(args)]
  common += [f"--{k}={getattr(args, k)}" for k in ("batch_size", "image_size")
             if getattr(args, k) is not None]
  common += [f"--{k}" for k in ("tiny", "skip_inference") if getattr(args, k)]
  rows = {}
  for value in dict.fromkeys(flags.values()):
    group = [name for name in args.recipes if flags[name] == value]
    if not args.json:
      print(f"[{','.join(group)}: XLA flags {value!r}, own process]",
            file=sys.stderr, flush=True)
    run = subprocess.run(
        [sys.executable, "-m", "ir2net_jax.benchmark",
         f"--recipes={','.join(group)}", f"--xla_cpu_flags={value}",
         *common], stdout=subprocess.PIPE, text=True, check=True)
    for row in json.loads(run.stdout)["rows"]:
      rows[row["recipe"]] = row
  return [rows[name] for name in args.recipes]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Runs the benchmark, prints the table (or JSON); returns the results."""
  args = parse_args(argv)
  configs = {name: recipe_config(name, args.batch_size, args.image_size,
                                 args.tiny, _overrides(args))
             for name in args.recipes}
  for config in configs.values():
    config.xla_cpu_flags = args.xla_cpu_flags
  flags = {name: xla_cpu.resolve(c) for name, c in configs.items()}
  if len(set(flags.values())) > 1:
    rows = _rows_in_subprocesses(args, flags)
  else:
    xla_cpu.apply_flags(next(iter(flags.values())))
    mesh = parallel.data_mesh(jax.local_devices())
    for name, config in configs.items():  # Fail before compiling anything.
      _check(name, config, mesh.devices.size)
    rows = []
    for name, config in configs.items():
      rows.append(benchmark_recipe(name, config, mesh, args.warmup,
                                   args.steps,
                                   inference=not args.skip_inference))
      if not args.json:
        print(f"[{name}: {rows[-1]['images_per_s']:.1f} img/s]",
              file=sys.stderr, flush=True)
  pipelines = ([] if args.skip_pipeline else benchmark_pipelines(
      args.image_size or 224, args.pipeline_examples))
  result = {"environment": environment(), "rows": rows,
            "pipelines": pipelines}
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    print(format_table(result["environment"], rows, pipelines))
  return result


if __name__ == "__main__":
  main()
