"""How a run computes on its backend: dtypes, kernels and XLA:CPU flags.

Every backend-dependent choice is made here, from the config and the
backend, and nowhere else:

=========================  ==============================  ===============
choice                     CPU                             GPU / TPU
=========================  ==============================  ===============
conv / dense dtype         ``config.dtype``                ``config.dtype``
binary conv operands       int8 for IR2Net stage 2         the layer dtype
                           ('auto'), else the layer dtype
grouped conv weight grad   tap by tap (``kernels``)        XLA's
XLA flags                  ``xla_cpu`` flags ('auto')      none
=========================  ==============================  ===============

With ``config.dtype='bfloat16'`` every convolution and dense layer computes
in bfloat16 with float32 parameters (the Flax ImageNet example's
convention); BatchNorm, the losses and the attention map stay in float32,
and binary convolutions sum their ±1 products in float32, which is exact.

The backend is an argument, so a CPU process can build the program a GPU or
TPU would run (``jax.export`` with ``platforms=['cuda']``).
"""

import dataclasses
import os
from typing import Any, Dict, Optional

from absl import logging
import jax

from ir2net_jax.backend import xla_cpu

__all__ = ["Policy", "resolve", "binary_compute_dtype", "xla_cpu_flags",
           "apply_xla_cpu_flags", "grouped_conv_by_taps", "platform"]

# Backend names of jax.default_backend() and jax.export's platforms.
_PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu",
              "tpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class Policy:
  """The choices ``resolve`` makes for one config on one backend.

  Attributes:
    backend: ``'cpu'``, ``'gpu'`` or ``'tpu'``.
    dtype: computation dtype of every convolution and dense layer; None
      computes in the parameters' dtype (float32), ``'bfloat16'`` is mixed
      precision.
    binary_compute_dtype: operand dtype of the binary convolutions; None is
      ``dtype``'s (see ``layers.BinaryConv``).
    grouped_conv_by_taps: grouped convolutions' weight gradient as per-tap
      contractions (``kernels.grouped_conv``), for XLA:CPU.
    xla_cpu_flags: flags for ``xla_cpu.apply_flags``; '' off the CPU.
  """
  backend: str
  dtype: Optional[str]
  binary_compute_dtype: Optional[str]
  grouped_conv_by_taps: bool
  xla_cpu_flags: str

  def model_kwargs(self) -> Dict[str, Any]:
    """The student's module attributes (``models.create_model`` kwargs)."""
    return {"dtype": self.dtype, "compute_dtype": self.binary_compute_dtype,
            "grouped_conv_by_taps": self.grouped_conv_by_taps}

  def teacher_kwargs(self) -> Dict[str, Any]:
    """The real-valued teacher's module attributes."""
    return {"dtype": self.dtype}


def platform(backend: Optional[str] = None) -> str:
  """``'cpu'``, ``'gpu'`` or ``'tpu'`` for a backend or jax.export platform
  name (``'cuda'``, ``'rocm'``); None is ``jax.default_backend()``."""
  name = backend or jax.default_backend()
  if name not in _PLATFORMS:
    raise ValueError(f"unknown backend {name!r}; choose one of "
                     f"{sorted(_PLATFORMS)}")
  return _PLATFORMS[name]


def binary_compute_dtype(config, backend: Optional[str] = None
                         ) -> Optional[str]:
  """The binary convolutions' operand dtype ``config.binary_compute_dtype``
  stands for (None: the layer dtype).

  Every choice is exact for binary weights (see ``layers.BinaryConv``), so
  ``'auto'`` picks by speed: int8 on CPU for the IR2Net models' stage 2,
  whose training step it made about 1.15x faster (the CIFAR models' 16-64
  channel layers were slower in int8); the layer dtype otherwise (bfloat16
  with ``config.dtype='bfloat16'``).

  Args:
    config: the run's config.
    backend: backend or export platform (default: ``jax.default_backend()``).
  """
  value = config.binary_compute_dtype
  if value != "auto":
    return value or None
  if (platform(backend) == "cpu" and config.model.startswith("ir2net")
      and config.stage == 2):
    return "int8"
  return None


def grouped_conv_by_taps(backend: Optional[str] = None) -> bool:
  """Whether grouped convolutions take their weight gradient tap by tap: on
  XLA:CPU only."""
  return platform(backend) == "cpu"


def xla_cpu_flags(config, cpu_count: Optional[int] = None) -> str:
  """The XLA flags ``config.xla_cpu_flags`` stands for, should the run land
  on the CPU.

  They are applied before JAX starts, when the backend is not known yet;
  GPU and TPU backends ignore them (``--xla_cpu_*`` flags, and the host
  device count only splits the CPU platform).

  Args:
    config: the run's config; ``xla_cpu_flags`` other than ``'auto'`` is
      returned as is.
    cpu_count: cores this process may use (default: its CPU affinity).

  Returns:
    For ``'auto'``: ``xla_cpu.EIGEN_CONV_FLAGS`` for the CIFAR models unless
    their binary convolutions run in int8 (Eigen's float32 convolutions were
    faster for their 32x32, batch-128 shapes, its int8 ones much slower);
    ``xla_cpu.DATA_PARALLEL_FLAGS`` for the ImageNet models on two or more
    cores when BatchNorm is synchronised and the batches split evenly (so
    the two devices compute what one would); '' (XLA's defaults) otherwise.
  """
  if config.xla_cpu_flags != xla_cpu.AUTO:
    return config.xla_cpu_flags
  if config.model.startswith("cifar_"):
    int8 = binary_compute_dtype(config, backend="cpu") == "int8"
    return "" if int8 else xla_cpu.EIGEN_CONV_FLAGS
  batches = (config.batch_size, config.get("eval_batch_size", -1))
  if (config.model.startswith("ir2net_") and config.sync_batch_stats
      and all(b % 2 == 0 for b in batches if b > 0)
      and (cpu_count or _cpu_count()) >= 2):
    return xla_cpu.DATA_PARALLEL_FLAGS
  return ""


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS has no affinity call.
    return os.cpu_count() or 1


def resolve(config, backend: Optional[str] = None,
            cpu_count: Optional[int] = None) -> Policy:
  """The policy of ``config`` on ``backend``.

  Args:
    config: the run's config (``dtype``, ``binary_compute_dtype``,
      ``xla_cpu_flags``, ``model``, ``stage``, batch sizes).
    backend: ``'cpu'``, ``'gpu'``, ``'tpu'`` or a jax.export platform
      (``'cuda'``); default ``jax.default_backend()``.
    cpu_count: cores, for the CPU flags (default: this process's).

  Raises:
    ValueError: an unknown backend.
  """
  target = platform(backend)
  return Policy(
      backend=target,
      dtype=None if config.dtype == "float32" else config.dtype,
      binary_compute_dtype=binary_compute_dtype(config, target),
      grouped_conv_by_taps=grouped_conv_by_taps(target),
      xla_cpu_flags=(xla_cpu_flags(config, cpu_count) if target == "cpu"
                     else ""))


_WARNED_FLAGS = set()


def apply_xla_cpu_flags(config) -> Optional[str]:
  """Applies :func:`xla_cpu_flags` as the commands do, where JAX's backends
  have not started yet; so ``train_and_evaluate`` from Python computes what
  ``launch.py`` computes.

  Where they have started (a notebook that ran JAX code first), the flags
  cannot take effect: a warning, once per set of flags, names them and
  what differs (speed; with the Eigen flags, float32 rounding of the
  convolutions).

  Returns:
    The flags added to ``XLA_FLAGS``, joined, or None where none were.
  """
  flags = xla_cpu_flags(config)
  try:
    added = xla_cpu.apply_flags(flags)
  except RuntimeError:
    if flags not in _WARNED_FLAGS:
      _WARNED_FLAGS.add(flags)
      logging.warning(
          "xla_cpu_flags=%r stand for XLA flags %r, which this process "
          "cannot apply: it ran JAX code before the run started. The run "
          "trains as launch.py would, but at XLA's default speed and "
          "convolution rounding (its metrics differ in the last digits). "
          "For the same numbers, call ir2net_jax.train_and_evaluate before "
          "any other JAX code, set XLA_FLAGS=%r before starting Python, "
          "or pass xla_cpu_flags=''.", config.xla_cpu_flags, flags, flags)
    return None
  return " ".join(added) or None
