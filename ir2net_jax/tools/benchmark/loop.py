"""The loop against its step: what a whole run costs beyond the train step.

  python -m ir2net_jax.tools.benchmark.loop --config=RECIPE [--steps=N]
      [--random_weights] [--config.field=value ...] [--json]

Two measurements of one config on this machine's devices:

* ``step img/s``: its train step alone, compiled and timed on a synthetic
  batch already on the devices (``benchmark.step.benchmark_recipe``, the
  median of timed steps);
* ``loop img/s``: a real run of the same config through the training loop
  (``train.loop.train_and_evaluate``, what ``launch.py`` runs) in a
  temporary workdir, for ``--steps`` steps with its input engine, logging,
  evaluation and checkpoints as the config sets them: steps after the first
  (which compiles) over their wall time, from the run's ``steps_per_sec``.

``loop / step`` is the share of the step's speed the run keeps; what is lost
is the loop's cost: waiting for data (``input wait``, the share of the
loop's time spent in ``next(batches)``, from the run's
``input_wait_fraction``), host syncs, logging, evaluation and checkpoints.
``host CPU`` is the CPU time of this process and its (finished) children
over the run's wall time, in cores. Where the grain engine leaves the
resize of the train windows to the devices (``config.input_resize``), the
row also times that resize alone (``device resize img/s``: the jitted
``grain_inputs.finish_batch`` on a synthetic batch of canvases already on
the devices), which the loop's step runs and the step alone does not.

``--random_weights`` times configs that start from weights without having
them: an IR2Net stage 2 without its stage-1 run starts from randomly
initialised variables (``config.init_from``), and a distillation run
without a converted teacher distils from a randomly initialised one
(``config.teacher_checkpoint``), both written to the temporary directory.
The speed is the same; the accuracy means nothing.
"""

import functools
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Sequence

from absl import app, flags, logging
import jax
from ml_collections import config_flags
import numpy as np

from ir2net_jax import configs, data, models
from ir2net_jax.io import weights
from ir2net_jax.train import (loop as loop_lib, parallel, run_metrics,
                              startup, step as step_lib)
from ir2net_jax.tools import command_line
from ir2net_jax.tools.benchmark import step as step_bench

__all__ = ["loop_images_per_s", "resize_images_per_s", "benchmark_loop",
           "format_row", "main"]

FLAGS = flags.FLAGS


def _cpu_seconds() -> float:
  usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                resource.RUSAGE_CHILDREN)]
  return sum(u.ru_utime + u.ru_stime for u in usage)


def loop_images_per_s(workdir: str, batch_size: int) -> Dict[str, float]:
  """The loop's rate and input wait from a finished run's scalars.

  Returns:
    ``{'loop_images_per_s', 'input_wait_fraction'}`` over every reported
    interval after the first step.
  """
  scalars = run_metrics.read_scalars(
      workdir, ["steps_per_sec", "input_wait_fraction"])
  rates = scalars.get("steps_per_sec", [])
  if not rates:
    raise ValueError(f"{workdir} has no steps_per_sec: run more steps than "
                     "config.log_every_steps (--steps).")
  steps = seconds = waited = 0.0
  previous = 1   # the first step (which compiles) is not reported
  waits = dict(scalars.get("input_wait_fraction", []))
  for step, rate in rates:
    interval = (step - previous) / rate
    steps, seconds = steps + step - previous, seconds + interval
    waited += waits.get(step, 0.0) * interval
    previous = step
  return {"loop_images_per_s": steps * batch_size / seconds,
          "input_wait_fraction": waited / seconds}


def resize_images_per_s(config, mesh, repeats: int = 20) -> Optional[float]:
  """The device's resize of the train windows, img/s, or None where
  ``config`` resizes them on the host.

  The whole device finish (windows resized, lighting, flip, normalisation)
  of a synthetic batch of ``config.batch_size`` canvases on ``mesh``, each
  window 1.2 S a side (the middle of what the host sends); the median of
  ``repeats`` timed calls.
  """
  if data.train_resize(config) != "device":
    return None
  from ir2net_jax.data.grain import (  # pylint: disable=g-import-not-at-top
      grain_inputs, host_recipes, pillow_resize)
  size, batch = config.image_size, config.batch_size
  side = host_recipes.canvas_size(size)
  axis = pillow_resize.resize_coefficients(
      0.0, 1.2 * size, side, size, pillow_resize.resize_taps(side, size))
  rng = np.random.default_rng(0)
  host = {"image": rng.integers(0, 256, (batch, side, side, 3), np.uint8),
          "resize": np.broadcast_to(axis, (batch, 2) + axis.shape),
          "vertical_first": np.zeros(batch, bool),
          "shift": np.zeros((batch, 3), np.int32),
          "flip": rng.random(batch) < 0.5,
          "label": np.zeros(batch, np.int32)}
  placed = jax.device_put(host, parallel.batch_sharding(mesh))
  finish = jax.jit(functools.partial(grain_inputs.finish_batch,
                                     dtype=jax.numpy.dtype(config.dtype)))
  jax.block_until_ready(finish(placed))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(finish(placed))
    times.append(time.perf_counter() - start)
  return batch / float(np.median(times))


def _random_weights(config, directory: str) -> None:
  """Points ``config`` at randomly initialised weights where it needs
  weights it does not have (module docstring)."""
  classes = startup.num_classes(config, data.dataset_info(config))
  if (config.model.startswith("ir2net") and config.stage == 2
      and not config.init_from and not config.stage1_checkpoint):
    model = step_lib.build_model(config, classes)
    config.init_from = os.path.join(directory, "student")
    weights.save_variables(config.init_from, models.init_variables(
        model, config.image_size, config.seed))
  if config.loss == "distillation" and not config.teacher_checkpoint:
    teacher = step_lib.build_teacher(config, classes)
    config.teacher_checkpoint = os.path.join(directory, "teacher")
    weights.save_variables(config.teacher_checkpoint, models.init_variables(
        teacher, config.image_size, config.seed + 1))


def benchmark_loop(config, steps: int, workdir: Optional[str] = None,
                   random_weights: bool = False) -> Dict[str, Any]:
  """Times ``config``'s step, then a run of it; one row."""
  config = config.copy_and_resolve_references()
  config.unlock()
  config.num_train_steps = steps
  mesh = parallel.data_mesh(jax.devices())
  with tempfile.TemporaryDirectory() as tmp:
    if random_weights:
      _random_weights(config, tmp)
    timed = config.copy_and_resolve_references()
    timed.num_classes = startup.prepare(config, training=True).num_classes
    row = step_bench.benchmark_recipe(config.name, timed, mesh,
                                      inference=False)
    resize = resize_images_per_s(config, mesh)
    workdir = workdir or os.path.join(tmp, "run")
    cpu, start = _cpu_seconds(), time.perf_counter()
    summary = loop_lib.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    rates = loop_images_per_s(workdir, config.batch_size)
  return {
      "config": config.name, "dataset": config.dataset,
      "input_engine": data.resolve_engine(config),
      "input_resize": data.train_resize(config),
      "batch": config.batch_size, "steps": steps, "dtype": config.dtype,
      "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "step_images_per_s": row["images_per_s"],
      "resize_images_per_s": resize, **rates,
      "loop_over_step": rates["loop_images_per_s"] / row["images_per_s"],
      "run_wall_s": wall, "host_cpu_cores": cpu / wall,
      "host_cores": os.cpu_count(),
      "final_eval_top1": summary.get("final_eval_top1"),
  }


def format_row(row: Dict[str, Any]) -> str:
  """One row as a Markdown table."""
  head = ["config", "engine", "batch", "steps", "step img/s",
          "device resize img/s", "loop img/s", "loop / step", "input wait",
          "run wall s", "host CPU (cores)"]
  engine = row["input_engine"]
  if row.get("input_resize") == "device":
    engine += ", windows resized on the device"
  cells = [row["config"], engine, str(row["batch"]),
           str(row["steps"]), f"{row['step_images_per_s']:.0f}",
           ("-" if row.get("resize_images_per_s") is None
            else f"{row['resize_images_per_s']:.0f}"),
           f"{row['loop_images_per_s']:.0f}", f"{row['loop_over_step']:.2f}",
           f"{row['input_wait_fraction']:.0%}", f"{row['run_wall_s']:.0f}",
           f"{row['host_cpu_cores']:.1f} of {row['host_cores']}"]
  return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
                    "| " + " | ".join(cells) + " |",
                    f"\n{row['devices']} x {row['device_kind']}"])


def command(argv: Optional[Sequence[str]], define_flags: Callable[[], None],
            row: Callable[[], Dict[str, Any]],
            format_table: Callable[[Dict[str, Any]], str]) -> None:
  """A benchmark's command line: ``--config`` (required), ``--json`` and
  ``define_flags``' own flags; prints ``row()`` as a table or as JSON."""
  config_flags.DEFINE_config_file(
      "config", None, "Recipe name (digits:smoke, imagenet:a,stage=2, ...) "
      "or file (configs/*.py).", lock_config=True)
  flags.DEFINE_bool("json", False, "print the row as JSON")
  define_flags()
  flags.mark_flags_as_required(["config"])
  logging.set_verbosity(logging.WARNING)

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    result = row()
    print(json.dumps(result, indent=1) if FLAGS.json else format_table(result))
  command_line.run_app(run, configs.expand_config_flag(
      list(sys.argv if argv is None else argv)))


def _define_flags() -> None:
  flags.DEFINE_integer("steps", 100, "train steps of the run")
  flags.DEFINE_string("workdir", None, "keep the run here (default: a "
                      "temporary directory, removed)")
  flags.DEFINE_bool("random_weights", False, "start a stage 2 or a "
                    "distillation that lacks its weights from random ones")


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command line (module docstring)."""
  command(argv, _define_flags, lambda: benchmark_loop(
      FLAGS.config, FLAGS.steps, FLAGS.workdir, FLAGS.random_weights),
          format_row)


if __name__ == "__main__":
  main()
