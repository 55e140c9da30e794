"""Binary convolutions on packed bits against XLA's float and int8 ones.

  python -m ir2net_jax.tools.benchmark.bits [--batches=1,16] [--repeats=20]
      [--json]

For the 3x3 binary convolutions of ResNet-18 (IR2Net's stages: 64 channels
at 56x56, 128 at 28, 256 at 14, 512 at 7), times on this process's first
device, jitted, median of ``--repeats`` calls after one warm-up:

* ``float32``: ``kernels.conv_nhwc`` of ±1 float32 operands (what inference
  runs today);
* ``int8``: the same operands in int8, int32 sums
  (``kernels.low_precision_conv``);
* ``bits``: ``deploy.bits.conv2d`` on packed operands (the pure-JAX
  XOR-popcount path), the activations' packing included;
* ``bits, packed input``: the same, given activations already packed.

Prints a table of milliseconds and each path's speed against float32.
"""

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ir2net_jax.deploy import bits
from ir2net_jax.nn import kernels

__all__ = ["LAYERS", "benchmark", "main"]

# (channels, spatial size) of ResNet-18's 3x3 stride-1 binary convolutions.
LAYERS = ((64, 56), (128, 28), (256, 14), (512, 7))


def _median_ms(fn: Callable, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))   # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _layer(batch: int, channels: int, size: int, repeats: int
           ) -> Dict[str, float]:
  rng = np.random.default_rng(channels)
  x = jnp.asarray(rng.choice([-1.0, 1.0], (batch, size, size, channels)),
                  jnp.float32)
  w = jnp.asarray(rng.choice([-1.0, 1.0], (3, 3, channels, channels)),
                  jnp.float32)
  packed_w = bits.pack_kernel(w)
  packed_x = bits.pack(x)
  paths = {
      "float32": (jax.jit(lambda a, b: kernels.conv_nhwc(a, b, 1, 1)),
                  (x, w)),
      "int8": (jax.jit(lambda a, b: kernels.low_precision_conv(
          a, b, 1, 1, "int8")), (x, w)),
      "bits": (jax.jit(lambda a, b: bits.conv2d(bits.pack(a), b, 3, 1, 1)),
               (x, packed_w)),
      "bits, packed input": (jax.jit(
          lambda a, b: bits.conv2d(a, b, 3, 1, 1)), (packed_x, packed_w)),
  }
  return {name: _median_ms(fn, args, repeats)
          for name, (fn, args) in paths.items()}


def benchmark(batches: Sequence[int], repeats: int) -> List[Dict]:
  """One row per (batch, layer): milliseconds per path."""
  return [{"batch": b, "channels": c, "size": s, **_layer(b, c, s, repeats)}
          for b in batches for c, s in LAYERS]


def _table(rows: List[Dict]) -> str:
  names = [k for k in rows[0] if k not in ("batch", "channels", "size")]
  head = ["batch", "layer"] + [f"{n} ms (vs float32)" for n in names]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in rows:
    cells = [str(r["batch"]), f"{r['channels']}@{r['size']}x{r['size']}"]
    cells += [f"{r[n]:.2f} ({r['float32'] / r[n]:.2f}x)" for n in names]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  rows = benchmark([int(b) for b in args.batches.split(",")], args.repeats)
  print(json.dumps(rows, indent=1) if args.json else _table(rows))


if __name__ == "__main__":
  main()
