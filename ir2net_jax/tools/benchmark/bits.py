"""Inference on packed bits against XLA's float32 and int8 convolutions.

  ir2net-benchmark --bits [--batches=1,64] [--repeats=20] [--network=ir2net_a]
  python -m ir2net_jax.tools.benchmark.bits [same flags] [--json]

Times on this process's first device, jitted, the median of ``--repeats``
calls after one warm-up, in one process, so that every ratio compares
numbers taken side by side.

**Layers**: ResNet-18's 3x3 binary convolutions (IR2Net's stages: 64
channels at 56x56, 128 at 28, 256 at 14, 512 at 7), each path from ±1
float32 activations to the sums:

* ``float32``: ``kernels.conv_nhwc`` of ±1 float32 operands (what the float
  model's inference runs);
* ``int8``: the same operands in int8, int32 sums
  (``kernels.low_precision_conv``);
* ``jax bits``: ``deploy.bits.conv2d``, the pure-JAX XOR-popcount path
  (packing included);
* ``native``: ``deploy.native.conv2d``, the C++ kernel, on the widest
  instruction set this CPU has (packing included), and ``native avx2`` /
  ``native portable`` where ``--isas`` asks for narrower ones.

**Network**: the whole model ``--network`` names (stage 2, 1000 classes,
224x224) in evaluation mode: the float32 model, and its packed form with
the native kernel and on the pure-JAX path.

The table's header names the CPU and its popcount flags.
"""

import argparse
import json
import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ir2net_jax import models
from ir2net_jax.deploy import bits, native, packed
from ir2net_jax.nn import kernels

__all__ = ["LAYERS", "benchmark", "cpu", "main", "network"]

# (channels, spatial size) of ResNet-18's 3x3 stride-1 binary convolutions.
LAYERS = ((64, 56), (128, 28), (256, 14), (512, 7))
# The CPU flags that decide the kernel's instruction set.
_FLAGS = ("avx2", "avx512f", "avx512_vpopcntdq", "popcnt", "asimd")


def cpu() -> Dict[str, str]:
  """This host's CPU model and the flags that matter here."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() in ("flags", "Features"):
          flags.update(value.split())
  except OSError:
    pass
  return {"cpu": model,
          "flags": " ".join(f for f in _FLAGS if f in flags),
          "native": (native.best_isa() if native.available()
                     else f"unavailable: {native.unavailable_reason()}")}


def _median_ms(fn: Callable, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))   # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _native_paths(isas: Sequence[str]) -> List[str]:
  """The widest instruction set, then those of ``isas`` this CPU has."""
  here = native.isas_here()
  return here[-1:] + [i for i in isas if i in here[:-1]]


def _layer(batch: int, channels: int, size: int, repeats: int,
           isas: Sequence[str]) -> Dict[str, float]:
  rng = np.random.default_rng(channels)
  x = jnp.asarray(rng.choice([-1.0, 1.0], (batch, size, size, channels)),
                  jnp.float32)
  w = jnp.asarray(rng.choice([-1.0, 1.0], (3, 3, channels, channels)),
                  jnp.float32)
  packed_w = bits.pack_kernel(w)
  paths = {
      "float32": (jax.jit(lambda a, b: kernels.conv_nhwc(a, b, 1, 1)),
                  (x, w)),
      "int8": (jax.jit(lambda a, b: kernels.low_precision_conv(
          a, b, 1, 1, "int8")), (x, w)),
      "jax bits": (jax.jit(lambda a, b: bits.conv2d(bits.pack(a), b, 1, 1)),
                   (x, packed_w)),
  }
  for i, isa in enumerate(_native_paths(isas)):
    paths["native" if i == 0 else f"native {isa}"] = (jax.jit(
        lambda a, b, isa=isa: native.conv2d(native.pack_signs(a, isa=isa), b,
                                            1, 1, isa)),
        (x, packed_w))
  return {name: _median_ms(fn, args, repeats)
          for name, (fn, args) in paths.items()}


def network(name: str, batch: int, repeats: int, image_size: int = 224,
            num_blocks=None) -> Dict[str, float]:
  """Milliseconds of the whole model ``name`` (stage 2 for IR2Net) on a
  batch: float32, and packed with each available convolution."""
  kwargs = {"stage": 2} if name.startswith("ir2net") else {}
  if num_blocks:
    kwargs["num_blocks"] = num_blocks
  model = models.create_model(name, **kwargs)
  variables = models.init_variables(model, image_size, 0)
  images = jax.random.normal(jax.random.key(0),
                             (batch, image_size, image_size, 3))
  packed_kernels = packed.pack_kernels(model, variables, image_size)
  row = {"float32": _median_ms(jax.jit(
      lambda v, x: model.apply(v, x, train=False)[0]), (variables, images),
                               repeats)}
  for how in (["native"] if native.available() else []) + ["jax"]:
    row[{"native": "native", "jax": "jax bits"}[how]] = _median_ms(
        jax.jit(lambda v, k, x, how=how: packed.apply_packed(
            model, v, k, x, how)[0]), (variables, packed_kernels, images),
        repeats)
  return row


def benchmark(batches: Sequence[int], repeats: int,
              isas: Sequence[str] = ("avx2",), network_name: str = "",
              network_repeats: int = 5, **network_kwargs) -> List[Dict]:
  """One row per (batch, layer), then per batch for ``network_name``:
  milliseconds per path."""
  rows = [{"batch": b, "layer": f"{c}@{s}x{s}",
           **_layer(b, c, s, repeats, isas)}
          for b in batches for c, s in LAYERS]
  if network_name:
    rows += [{"batch": b, "layer": network_name,
              **network(network_name, b, network_repeats, **network_kwargs)}
             for b in batches]
  return rows


def table(rows: List[Dict], host: Dict[str, str]) -> str:
  """Markdown: each path's milliseconds and its speed against float32."""
  names = list(dict.fromkeys(k for r in rows for k in r
                             if k not in ("batch", "layer")))
  head = ["batch", "layer"] + [f"{n} ms (vs float32)" for n in names]
  lines = [f"CPU: {host['cpu']} (flags: {host['flags'] or 'none listed'}; "
           f"native kernel: {host['native']})", "",
           "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in rows:
    cells = [str(r["batch"]), r["layer"]]
    cells += [f"{r[n]:.2f} ({r['float32'] / r[n]:.1f}x)" if n in r else "-"
              for n in names]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", default="1,64")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--isas", default="avx2",
                      help="narrower instruction sets to time as well")
  parser.add_argument("--network", default="ir2net_a",
                      help="a whole model to time ('' for none)")
  parser.add_argument("--network_repeats", type=int, default=5)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  host = cpu()
  rows = benchmark([int(b) for b in args.batches.split(",")], args.repeats,
                   [i for i in args.isas.split(",") if i], args.network,
                   args.network_repeats)
  print(json.dumps({"host": host, "rows": rows}, indent=1) if args.json
        else table(rows, host))


if __name__ == "__main__":
  main()
