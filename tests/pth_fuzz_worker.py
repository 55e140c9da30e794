"""Reads the ``.pth`` files of a manifest with ``ir2net_jax.io.pth``, one JSON
line a file, under a cap on its address space (run by ``test_pth.py``).

Manifest: ``{"memory_cap": bytes, "cases": [{"file", "expect"}]}`` where
``expect`` is ``"refused"``, ``"any"`` (refused or read, never another
error) or the path of a ``.npz`` holding the exact ``state_dict`` expected,
with ``"may_refuse": true`` where refusing it is right too. Each line says
``outcome``: ``equal``, ``refused``, ``read`` (``any`` only), ``mismatch``,
``crash`` (any exception but ``ConversionError``) or ``memory`` (a
``MemoryError`` turned into a refusal: the reader tried to allocate).
"""

import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ir2net_jax.io import pth  # noqa: E402  pylint: disable=g-import-not-at-top


def _compare(got, expected_npz: str) -> str:
  """Where ``got['state_dict']`` differs from the ``.npz``; '' if nowhere."""
  with np.load(expected_npz) as z:
    expected = {k: z[k] for k in z.files}
  state = got.get("state_dict") if isinstance(got, dict) else None
  if not isinstance(state, dict) or set(state) != set(expected):
    return f"keys {sorted(state or {})[:5]} != {sorted(expected)[:5]}"
  for k, v in expected.items():
    g = state[k]
    if not (isinstance(g, np.ndarray) and g.dtype == v.dtype
            and g.shape == v.shape and np.array_equal(g, v)):
      return f"{k}: {getattr(g, 'dtype', type(g))} {np.shape(g)}"
  return ""


def _peak_rss_kib() -> int:
  """This address space's peak resident memory (KiB).

  Not ``ru_maxrss``: Linux carries that across ``fork`` + ``exec``, so it
  reports the parent's size when the parent (a long pytest run) is large.
  ``VmHWM`` belongs to the address space that ``exec`` made.
  """
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1])
  raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
  manifest = json.load(open(sys.argv[1]))
  cap = manifest["memory_cap"]
  resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
  for i, case in enumerate(manifest["cases"]):
    start = time.perf_counter()
    detail = ""
    try:
      got = pth.read_torch_zip(case["file"])
    except pth.ConversionError as e:
      detail = str(e)
      outcome = "memory" if "MemoryError" in detail else "refused"
    except BaseException as e:  # pylint: disable=broad-except
      outcome, detail = "crash", repr(e)
    else:
      if case["expect"] == "any":
        outcome = "read"
      elif case["expect"] == "refused":
        outcome, detail = "mismatch", "read, though it should be refused"
      else:
        detail = _compare(got, case["expect"])
        outcome = "mismatch" if detail else "equal"
    print(json.dumps({"case": i, "outcome": outcome, "detail": detail[:300],
                      "seconds": time.perf_counter() - start,
                      "peak_rss_kib": _peak_rss_kib()}), flush=True)


if __name__ == "__main__":
  main()
