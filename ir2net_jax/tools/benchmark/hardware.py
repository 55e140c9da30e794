"""What a device can do and what a compiled step asks of it: peak FLOP/s per
device kind, model FLOP utilisation (MFU) and memory figures.

Peaks are the vendors' dense (no sparsity) figures for one JAX device:

* ``bf16``: bfloat16 on the tensor cores / MXUs.
* ``f32``: float32 matrix work at JAX's default precision, which XLA runs on
  the TF32 tensor cores of NVIDIA GPUs from Ampere on and as bfloat16 MXU
  passes on TPUs (``jax.default_matmul_precision``).
* ``f32_full``: float32 without tensor cores (CUDA cores); None on TPUs.

Sources: the NVIDIA H100 / H200 / A100 datasheets (H100 SXM: 989.4 bf16,
494.7 TF32, 66.9 float32 TFLOP/s; H200 and GH200 have H100 SXM's compute)
and Google Cloud's TPU system architecture pages (v4 275, v5e 197, v5p 459,
v6e 918 bf16 TFLOP/s per chip; a v3 chip's 123 is split over its two cores,
each a JAX device).
"""

import resource
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax

__all__ = ["Peak", "PEAK_FLOPS", "peak", "peak_flops", "mfu",
           "peak_memory_mb", "device_memory_limit_mb", "xla_memory_mb"]

_MB = 1e6


class Peak(NamedTuple):
  """Dense peak FLOP/s of one device (module docstring)."""
  bf16: float
  f32: Optional[float]
  f32_full: Optional[float]


# (device_kind substring, peak), most specific first: 'TPU v5 lite' before
# 'TPU v5', 'H200 NVL' before 'H200' (which also matches 'NVIDIA GH200').
PEAK_FLOPS: Tuple[Tuple[str, Peak], ...] = (
    ("H100 PCIe", Peak(756e12, 378e12, 51.2e12)),
    ("H100 NVL", Peak(835.5e12, 417.5e12, 60e12)),
    ("H100", Peak(989.4e12, 494.7e12, 66.9e12)),    # SXM: 'H100 80GB HBM3'
    ("H200 NVL", Peak(835.5e12, 417.5e12, 60e12)),
    ("H200", Peak(989.4e12, 494.7e12, 66.9e12)),    # SXM; also GH200
    ("A100", Peak(312e12, 156e12, 19.5e12)),
    ("TPU v6 lite", Peak(918e12, 918e12, None)),    # v6e (Trillium)
    ("TPU v5 lite", Peak(197e12, 197e12, None)),    # v5e
    ("TPU v5", Peak(459e12, 459e12, None)),         # v5p
    ("TPU v4", Peak(275e12, 275e12, None)),
    ("TPU v3", Peak(61.5e12, 61.5e12, None)),       # one of a chip's 2 cores
)


def peak(device_kind: str) -> Optional[Peak]:
  """The peaks of a device, by its ``device_kind``; None if not listed."""
  for key, value in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """Peak FLOP/s of one device for a step computing in ``dtype``.

  Args:
    device_kind: ``jax.Device.device_kind``, e.g. ``'NVIDIA H100 80GB HBM3'``.
    dtype: ``'bfloat16'`` or ``'float32'`` (the config's ``dtype``).

  Returns:
    ``Peak.bf16`` or ``Peak.f32``; None where unknown (e.g. CPUs).
  """
  p = peak(device_kind)
  if p is None:
    return None
  return p.bf16 if dtype == "bfloat16" else p.f32


def mfu(flops_per_step: float, step_s: float, device_kind: str, dtype: str,
        devices: int) -> Optional[float]:
  """Model FLOP utilisation: achieved / (peak per device * devices)."""
  p = peak_flops(device_kind, dtype)
  if p is None:
    return None
  return flops_per_step / step_s / (p * devices)


def peak_memory_mb(device: Optional[jax.Device] = None) -> Tuple[float, str]:
  """``(MB, source)``: the device's ``peak_bytes_in_use``, else (CPU, whose
  devices keep no statistics) the process's peak RSS. Both are high-water
  marks of the whole process."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / _MB, "device peak_bytes_in_use"
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
  return rss_kb * 1e3 / _MB, "process peak RSS"


def device_memory_limit_mb(device: Optional[jax.Device] = None
                           ) -> Optional[float]:
  """What the device's allocator may use (``bytes_limit``), None if unknown."""
  device = device or jax.local_devices()[0]
  limit = (device.memory_stats() or {}).get("bytes_limit")
  return limit / _MB if limit else None


def xla_memory_mb(compiled: Any) -> Dict[str, Optional[float]]:
  """XLA's memory plan of a compiled program on one device, in MB.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jit(f).lower(...).compile()``).

  Returns:
    ``{'xla_argument_mb', 'xla_output_mb', 'xla_temp_mb', 'xla_alias_mb',
    'xla_memory_mb'}``; the total is arguments + outputs + temporaries -
    aliases (donated inputs whose buffers the outputs reuse). All None when
    the backend gives no analysis.
  """
  keys = ("argument", "output", "temp", "alias")
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    analysis = None  # Some backends / versions raise instead of None.
  if analysis is None:
    return {**{f"xla_{k}_mb": None for k in keys}, "xla_memory_mb": None}
  sizes = {k: getattr(analysis, f"{k}_size_in_bytes") / _MB for k in keys}
  total = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
  return {**{f"xla_{k}_mb": v for k, v in sizes.items()},
          "xla_memory_mb": total}
