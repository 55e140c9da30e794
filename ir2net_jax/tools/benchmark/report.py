"""The benchmark's output: environment, the ratio to the float baseline, the
table, and merging earlier ``--json`` documents."""

import json
import os
import time
from typing import Any, Dict, List, Sequence

import jax

from ir2net_jax.tools.benchmark import hardware
from ir2net_jax.tools.benchmark.recipes import BASELINE

__all__ = ["environment", "add_baseline_ratios", "format_table",
           "format_pipelines", "load_json"]


def environment() -> Dict[str, Any]:
  """Devices, versions and date, printed above the table."""
  device = jax.local_devices()[0]
  return {
      "device_kind": device.device_kind,
      "platform": device.platform,
      "local_devices": jax.local_device_count(),
      "device_memory_limit_mb": hardware.device_memory_limit_mb(device),
      "jax_version": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "host_cpus": os.cpu_count(),
      "peak_memory_source": hardware.peak_memory_mb(device)[1],
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  }


def add_baseline_ratios(rows: Sequence[Dict[str, Any]]) -> None:
  """Sets each row's ``vs_float_resnet18``, in place: its img/s over the
  img/s of the ``float_resnet18`` row with the same dtype, image size and
  remat (None where there is none)."""
  key = lambda r: (r["dtype"], r["image_size"], r.get("remat", False))
  base = {key(r): r["images_per_s"] for r in rows if r["recipe"] == BASELINE}
  for r in rows:
    b = base.get(key(r))
    r["vs_float_resnet18"] = r["images_per_s"] / b if b else None


# (header, row key, format)
_ROW_COLUMNS = (
    ("recipe", "recipe", "{}"),
    ("dtype", "dtype", "{}"),
    ("remat", "remat", "{}"),
    ("batch", "batch", "{:d}"),
    ("size", "image_size", "{:d}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("step s", "step_s", "{:.4f}"),
    ("img/s", "images_per_s", "{:.1f}"),
    ("/R18", "vs_float_resnet18", "{:.2f}"),
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
  if value is None or value is False:
    return "-"
  if value is True:
    return "yes"
  return fmt.format(value * _SCALE.get(key, 1))


def _flags_lines(env, rows) -> List[str]:
  used = {r.get("xla_flags", env["xla_flags"]) for r in rows}
  if len(used) <= 1:
    return [f"XLA_FLAGS={(used.pop() if used else env['xla_flags'])!r}"]
  return [f"XLA_FLAGS for {r['recipe']}: {r['xla_flags']!r}" for r in rows]


def format_table(env: Dict[str, Any], rows: Sequence[Dict[str, Any]],
                 pipelines: Sequence[Dict[str, Any]] = ()) -> str:
  """Header lines, one fixed-width row per recipe, one line of pipelines."""
  lines = [
      f"device: {env['device_kind']} x {env['local_devices']} "
      f"({env['platform']}), host CPUs: {env['host_cpus']}, "
      f"{env.get('date', '')}",
      f"jax {env['jax_version']}",
      *_flags_lines(env, rows),
      f"peak MB: {env['peak_memory_source']} (a high-water mark of the "
      "process); MFU: of the dense peak for the dtype (float32: TF32 on "
      "NVIDIA); /R18: img/s over float_resnet18's (goal for IR2Net-A: "
      ">= 0.33)",
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
    lines.append(format_pipelines(pipelines))
  return "\n".join(lines)


def format_pipelines(pipelines: Sequence[Dict[str, Any]]) -> str:
  """One line: each input pipeline's images/s (``benchmark.pipeline``)."""
  return "input pipeline (img/s; host CPUs, digits_device: the device): " + ", ".join(
      f"{p['pipeline']} {p['image_size']}px {p['images_per_s']:.0f}"
      for p in pipelines)


def load_json(paths: Sequence[str]) -> Dict[str, Any]:
  """Earlier ``--json`` documents as one: the first one's environment, and
  every document's rows and pipelines in order."""
  docs = []
  for path in paths:
    with open(path) as f:
      docs.append(json.load(f))
  return {"environment": docs[0]["environment"],
          "rows": [r for d in docs for r in d["rows"]],
          "pipelines": [p for d in docs for p in d["pipelines"]]}
