"""XLA:CPU compiler flags that make the binary networks train faster.

XLA reads ``XLA_FLAGS`` once, when JAX starts its backends, so these flags
are applied before any JAX computation, from the ``xla_cpu_flags`` config
field: by the entry points (``launch.py``, ``python -m
ir2net_jax.tools.benchmark``, the tests) and by ``train_and_evaluate``
called from Python first thing (``policy.apply_xla_cpu_flags``, which warns
once where JAX has already started and the flags cannot apply). They change how XLA:CPU runs operations, not
what they compute, and are ignored by the GPU and TPU backends.

``EIGEN_CONV_FLAGS`` keeps convolutions out of XLA:CPU's YNNPACK fusions
(matrix products stay in them), so they run on XLA's Eigen convolutions.
For these networks' float32 convolutions (3x3, 16 to 512 channels, their
input and weight gradients) that made the CIFAR ResNet-20 training step about 1.3x
faster on the project's 2-core x86 CPU (VGG-Small and ResNet-18: 1.2-1.3x).
The ImageNet models' training steps, though, were as fast or up to 1.2x
faster with XLA's defaults (YNNPACK convolutions), and Eigen's int8
convolutions are 10-40x slower than YNNPACK's.

``DATA_PARALLEL_FLAGS`` splits the host into two XLA:CPU devices, so the
train loop runs its data-parallel step on them (half the batch each,
BatchNorm statistics and gradients summed over both, as on two GPUs). The two
halves' operations then fill each other's idle gaps on the cores: the
ImageNet models' training steps (batch 16, 224x224, teacher included) were
1.0-1.25x faster on two cores. It computes what one device computes up to
float32 summation order (the tests compare the two).

``'auto'`` (the config default) picks by model, ``binary_compute_dtype`` and
the number of cores (``ir2net_jax.backend.policy.xla_cpu_flags``);
``docs/performance.md`` has the measurements.

``jit_run_once`` compiles a program that runs once (a model's
initialisation) with LLVM at optimisation level 1 instead of XLA:CPU's 2:
most of such a program's compile time is LLVM optimising its random-number
loops, which run once, for microseconds. A model's initialisation then
compiled 3-5x faster (digits' ResNet-20: 6.0 s to 1.3 s; IR2Net-A: 6.5 s
to 2.1 s, on a 2-core AMD EPYC) and ran as fast.
"""

import os
import shlex
from typing import Any, Callable, List, Sequence

__all__ = ["AUTO", "DATA_PARALLEL_FLAGS", "EIGEN_CONV_FLAGS",
           "RUN_ONCE_OPTIONS", "apply_flags", "jit_run_once"]

EIGEN_CONV_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type="
                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
DATA_PARALLEL_FLAGS = "--xla_force_host_platform_device_count=2"
# XLA:CPU compiler options of ``jit_run_once``.
RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 1}


AUTO = "auto"


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0]


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


def apply_flags(flags: str, environ=os.environ) -> List[str]:
  """Adds ``flags`` to ``XLA_FLAGS`` unless the user set those flags already.

  Args:
    flags: space-separated XLA flags, e.g. ``EIGEN_CONV_FLAGS``; '' does
      nothing.
    environ: the environment to change (the process's by default).

  Returns:
    The flags that were added; a flag already named in ``XLA_FLAGS`` keeps
    the user's value and is not added.

  Raises:
    ValueError: a flag does not start with ``--``.
    RuntimeError: JAX's backends already started in this process (they would
      not see the flags); call this before any JAX computation.
  """
  wanted: Sequence[str] = shlex.split(flags or "")
  for flag in wanted:
    if not flag.startswith("--"):
      raise ValueError(f"xla_cpu_flags: {flag!r} is not an XLA flag "
                       "(--name=value); use '' for none")
  present = {_flag_name(f) for f in shlex.split(environ.get("XLA_FLAGS", ""))}
  added = [f for f in wanted if _flag_name(f) not in present]
  if not added:
    return []
  if environ is os.environ and _backends_started():
    raise RuntimeError(
        f"xla_cpu_flags {added} must be set before JAX starts its backends, "
        "and this process has already run JAX code; set them in XLA_FLAGS "
        "before starting Python, or pass --config.xla_cpu_flags=''")
  environ["XLA_FLAGS"] = " ".join(
      [environ.get("XLA_FLAGS", "")] + added).strip()
  return added


def jit_run_once(fn: Callable[..., Any], *args) -> Any:
  """``jax.jit(fn)(*args)``, compiled for a program that runs once.

  Where JAX's default backend is XLA:CPU it is compiled with
  ``RUN_ONCE_OPTIONS`` (LLVM at level 1: 3-5x less compile time for a
  model's initialisation, the same values up to the rounding of a fused
  multiply-add); on other backends as ``jax.jit`` compiles it. Nothing is
  cached in memory: the persistent compilation cache, where enabled, still
  applies. Under a transformation (``jax.eval_shape``, an outer ``jit``) it
  is ``jax.jit(fn)(*args)``: traced into the outer program, not compiled on
  its own.

  Args:
    fn: a function of arrays (pytrees), as ``jax.jit`` takes.
    *args: its arguments.

  Returns:
    ``fn(*args)``, computed by the compiled program.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
    return jax.jit(fn)(*args)
  options = (dict(RUN_ONCE_OPTIONS) if jax.default_backend() == "cpu"
             else None)
  return jax.jit(fn).lower(*args).compile(compiler_options=options)(*args)
