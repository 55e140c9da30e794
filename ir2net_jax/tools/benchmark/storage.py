"""A run with its workdir in a bucket against the same run on a local disk.

  python -m ir2net_jax.tools.benchmark.storage --config=RECIPE
      --bucket=gs://BUCKET/bench [--steps=N] [--repeats=R]
      [--config.field=value ...] [--json]

Runs ``config`` through the training loop (``train.loop.train_and_evaluate``)
``repeats`` times with a local temporary workdir and ``repeats`` times with
a new workdir under ``--bucket``, alternately, and prints the median loop
img/s of each (``benchmark.loop.loop_images_per_s``: steps after the first
over their wall time, from the run's ``steps_per_sec``) and their ratio.
Checkpoints (``config.checkpoint_every_steps``) and TensorBoard files go to
the bucket asynchronously; the ratio says how much of the local speed a
bucket run keeps. The bucket's runs are deleted afterwards.

For a server on this machine, point the clients at it first
(``STORAGE_EMULATOR_HOST``, ``TENSORSTORE_GCS_HTTP_URL``,
``GOOGLE_AUTH_TOKEN_FOR_TESTING``; docs/pods.md).
"""

import statistics
import tempfile
import uuid
from typing import Any, Dict, Optional, Sequence

from absl import flags
import jax

from ir2net_jax import data
from ir2net_jax.storage import paths
from ir2net_jax.train import loop as loop_lib
from ir2net_jax.tools.benchmark import loop as loop_bench

__all__ = ["benchmark_storage", "format_row", "main"]

FLAGS = flags.FLAGS


def _loop_rate(config, workdir: str) -> float:
  loop_lib.train_and_evaluate(config, workdir)
  return loop_bench.loop_images_per_s(workdir,
                                      config.batch_size)["loop_images_per_s"]


def benchmark_storage(config, steps: int, bucket: str,
                      repeats: int = 3) -> Dict[str, Any]:
  """Median loop img/s of ``repeats`` local and bucket runs, alternated."""
  config = config.copy_and_resolve_references()
  config.unlock()
  config.num_train_steps = steps
  local, remote = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(repeats):
      local.append(_loop_rate(config, paths.join(tmp, f"run{i}")))
      url = paths.join(paths.resolve(bucket), uuid.uuid4().hex[:12])
      try:
        remote.append(_loop_rate(config, url))
      finally:
        if paths.exists(url):
          paths.rmtree(url)
  return {
      "config": config.name, "input_engine": data.resolve_engine(config),
      "batch": config.batch_size, "steps": steps, "repeats": repeats,
      "checkpoint_every_steps": config.checkpoint_every_steps,
      "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "local_images_per_s": local, "bucket_images_per_s": remote,
      "bucket": bucket,
      "bucket_over_local": (statistics.median(remote)
                            / statistics.median(local)),
  }


def format_row(row: Dict[str, Any]) -> str:
  """One row as a Markdown table."""
  head = ["config", "engine", "batch", "steps", "checkpoint every",
          "local loop img/s", "bucket loop img/s", "bucket / local"]
  spread = lambda v: (f"{statistics.median(v):.0f} ({min(v):.0f}-"
                      f"{max(v):.0f})")
  cells = [row["config"], row["input_engine"], str(row["batch"]),
           str(row["steps"]), str(row["checkpoint_every_steps"]),
           spread(row["local_images_per_s"]),
           spread(row["bucket_images_per_s"]),
           f"{row['bucket_over_local']:.1%}"]
  return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
                    "| " + " | ".join(cells) + " |",
                    f"\nmedians of {row['repeats']} runs each, alternated; "
                    f"{row['devices']} x {row['device_kind']}; bucket "
                    f"{row['bucket']}"])


def _define_flags() -> None:
  flags.DEFINE_string("bucket", None, "a bucket URL for the runs "
                      "(gs://BUCKET/bench); each run gets a new folder, "
                      "deleted afterwards")
  flags.DEFINE_integer("steps", 200, "train steps of each run")
  flags.DEFINE_integer("repeats", 3, "runs of each kind")
  flags.mark_flags_as_required(["bucket"])


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command line (module docstring)."""
  loop_bench.command(argv, _define_flags, lambda: benchmark_storage(
      FLAGS.config, FLAGS.steps, FLAGS.bucket, FLAGS.repeats), format_row)


if __name__ == "__main__":
  main()
