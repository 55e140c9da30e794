"""The command line of ``python -m ir2net_jax.tools.benchmark`` (absl flags, and
``--config.*`` overrides through ml_collections' config flags)."""

import json
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
from absl import flags

from ir2net_jax.backend import policy, xla_cpu
from ir2net_jax.data.engines import tensorflow_installed
from ir2net_jax.train import parallel
from ir2net_jax.tools.benchmark import recipes, report, step
from ir2net_jax.tools.benchmark.recipes import RECIPES, UsageError

__all__ = ["UsageError", "parse_flags", "main", "run"]

# Flags a child process gets as given (all but recipes, xla_cpu_flags, json,
# skip_pipeline, pipeline_examples and from_json).
_FORWARDED = ("steps", "warmup", "per_device_batch", "batch_size",
              "image_size", "tiny", "remat", "profile", "profile_steps",
              "skip_inference")


def _define_flags(values: flags.FlagValues) -> None:
  define = lambda kind, name, default, text, **kw: kind(
      name, default, text, flag_values=values, **kw)
  define(flags.DEFINE_list, "recipes", list(RECIPES),
         f"comma-separated, from {list(RECIPES)}")
  define(flags.DEFINE_integer, "steps", 10,
         "timed steps per recipe (median reported)", lower_bound=1)
  define(flags.DEFINE_integer, "warmup", 2, "untimed steps after compiling",
         lower_bound=0)
  define(flags.DEFINE_integer, "per_device_batch", None,
         "batch per device for every recipe (global = this x devices)",
         lower_bound=1)
  define(flags.DEFINE_integer, "batch_size", None,
         "global batch for every recipe (default: 128 CIFAR, 16 ImageNet)",
         lower_bound=1)
  define(flags.DEFINE_integer, "image_size", None,
         "input size for every recipe and the ImageNet pipeline",
         lower_bound=1)
  define(flags.DEFINE_bool, "tiny", False,
         "one block per stage, 32px ImageNet (tests)")
  define(flags.DEFINE_bool, "remat", False,
         "config.remat=True: rematerialise each residual block")
  define(flags.DEFINE_string, "profile", None,
         "write a jax.profiler trace of --profile_steps steps per recipe to "
         "DIR/RECIPE (tensorboard --logdir=DIR)")
  define(flags.DEFINE_integer, "profile_steps", 3, "steps traced",
         lower_bound=1)
  define(flags.DEFINE_string, "xla_cpu_flags", xla_cpu.AUTO,
         "added to XLA_FLAGS before JAX starts, as config.xla_cpu_flags: "
         "'auto' (per recipe, see ir2net_jax.backend.xla_cpu), '' for XLA's "
         "defaults, or flags")
  define(flags.DEFINE_integer, "pipeline_examples", 512,
         "examples timed per input pipeline", lower_bound=1)
  define(flags.DEFINE_bool, "skip_pipeline", False,
         "leave out the input-pipeline benchmark (which needs TensorFlow)")
  define(flags.DEFINE_bool, "skip_inference", False, "time training only")
  define(flags.DEFINE_bool, "json", False,
         "print one JSON document instead of the table")
  define(flags.DEFINE_list, "from_json", [],
         "files of earlier --json outputs: print their rows as one table "
         "(or, with --json, one document) and run nothing")


def parse_flags(argv: Sequence[str]) -> Tuple[flags.FlagValues, List[str]]:
  """``(benchmark flags, --config.* overrides)`` from a full ``argv``.

  Raises:
    UsageError: an unknown flag, a bad value, an unknown recipe, or a
      pipeline benchmark without TensorFlow.
  """
  values = flags.FlagValues()
  _define_flags(values)
  if any(a in ("-h", "--help", "-help") for a in argv[1:]):
    from ir2net_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
    print(benchmark.__doc__ + "\nFlags:\n" + values.get_help())
    sys.exit(0)
  try:
    rest = values(list(argv), known_only=True)[1:]
  except flags.Error as e:
    raise UsageError(str(e)) from None
  overrides, i = [], 0
  while i < len(rest):  # --config.X=V, or --config.X V (a non-boolean)
    if not recipes.CONFIG_ARG.match(rest[i]):
      raise UsageError(f"unknown flag or argument {rest[i]!r}; see --help")
    takes_next = ("=" not in rest[i] and i + 1 < len(rest)
                  and not rest[i + 1].startswith("-"))
    overrides += rest[i:i + 1 + takes_next]
    i += 1 + takes_next
  unknown = [r for r in values.recipes if r not in RECIPES]
  if unknown:
    raise UsageError(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
  if values.per_device_batch and values.batch_size:
    raise UsageError("--per_device_batch and --batch_size both set; give one")
  if not (values.skip_pipeline or values.from_json or tensorflow_installed()):
    raise UsageError("the input-pipeline benchmark needs TensorFlow, which "
                     "is not installed; pass --skip_pipeline")
  return values, overrides


def _rows_in_subprocesses(values: flags.FlagValues, overrides: Sequence[str],
                          xla_flags: Dict[str, str]) -> List[Dict]:
  """Benchmarks each group of recipes that wants other XLA flags in a fresh
  process (XLA reads its flags once); rows come back in recipe order."""
  common = ["--json", "--skip_pipeline", *overrides]
  common += [values[name].serialize() for name in _FORWARDED
             if values[name].value != values[name].default]
  rows = {}
  for value in dict.fromkeys(xla_flags.values()):
    group = [name for name in values.recipes if xla_flags[name] == value]
    if not values.json:
      print(f"[{','.join(group)}: XLA flags {value!r}, own process]",
            file=sys.stderr, flush=True)
    run = subprocess.run(
        [sys.executable, "-m", "ir2net_jax.tools.benchmark",
         f"--recipes={','.join(group)}", f"--xla_cpu_flags={value}",
         *common], stdout=subprocess.PIPE, text=True, check=True)
    for row in json.loads(run.stdout)["rows"]:
      rows[row["recipe"]] = row
  return [rows[name] for name in values.recipes]


def _rows_here(values: flags.FlagValues, configs: Dict[str, Any],
               xla_flags: str) -> List[Dict[str, Any]]:
  """Benchmarks every recipe in this process, under ``xla_flags``."""
  xla_cpu.apply_flags(xla_flags)
  mesh = parallel.data_mesh(jax.local_devices())
  devices = mesh.devices.size
  for name, config in configs.items():  # Fail before compiling anything.
    if values.per_device_batch:
      config.batch_size = values.per_device_batch * devices
    step.check(name, config, devices)
  rows = []
  for name, config in configs.items():
    rows.append(step.benchmark_recipe(
        name, config, mesh, values.warmup, values.steps,
        inference=not values.skip_inference, profile_dir=values.profile,
        profile_steps=values.profile_steps))
    if not values.json:
      print(f"[{name}: {rows[-1]['images_per_s']:.1f} img/s]",
            file=sys.stderr, flush=True)
  return rows


def _run(values: flags.FlagValues, overrides: Sequence[str]
         ) -> Dict[str, Any]:
  """Benchmarks the recipes (and pipelines): the result document."""
  # The device count is known only once the XLA flags are applied; until
  # then any even global batch lets 'auto' split the host.
  batch = (2 * values.per_device_batch if values.per_device_batch
           else values.batch_size)
  configs = {name: recipes.recipe_config(name, batch, values.image_size,
                                         values.tiny, overrides, values.remat)
             for name in values.recipes}
  for config in configs.values():
    config.xla_cpu_flags = values.xla_cpu_flags
  xla_flags = {name: policy.xla_cpu_flags(c) for name, c in configs.items()}
  if len(set(xla_flags.values())) > 1:
    rows = _rows_in_subprocesses(values, overrides, xla_flags)
  else:
    rows = _rows_here(values, configs, next(iter(xla_flags.values())))
  pipelines = []
  if not values.skip_pipeline:
    from ir2net_jax.tools.benchmark import pipeline  # pylint: disable=g-import-not-at-top
    pipelines = pipeline.benchmark_pipelines(values.image_size or 224,
                                             values.pipeline_examples)
  return {"environment": report.environment(), "rows": rows,
          "pipelines": pipelines}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Runs the benchmark, prints the table (or JSON); returns the results.

  Args:
    argv: the arguments after the program name (default: ``sys.argv[1:]``).

  Raises:
    UsageError: bad flags or configs, before anything is compiled.
  """
  args = list(sys.argv[1:] if argv is None else argv)
  if "--bits" in args:   # packed inference: its own flags (bits.main)
    from ir2net_jax.tools.benchmark import bits  # pylint: disable=g-import-not-at-top
    bits.main([a for a in args if a != "--bits"])
    return {}
  values, overrides = parse_flags(["benchmark", *args])
  if values.from_json:
    result = report.load_json(values.from_json)
  else:
    result = _run(values, overrides)
  report.add_baseline_ratios(result["rows"])
  if values.json:
    print(json.dumps(result, indent=1))
  else:
    print(report.format_table(result["environment"], result["rows"],
                              result["pipelines"]))
  return result


def run() -> None:
  """The ``ir2net-benchmark`` console script (and ``python -m
  ir2net_jax.tools.benchmark``): ``main``, with a usage error as one line and
  exit status 1 instead of a traceback."""
  try:
    main()
  except UsageError as e:
    sys.exit(f"error: {e}")
