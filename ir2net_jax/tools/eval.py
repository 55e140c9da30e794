"""Evaluates a checkpoint without training: ``ir2net-eval``.

  ir2net-eval --config=imagenet:a,stage=2 --checkpoint=weights/ir2net_a \
      --config.data_dir=/data/tfds
  python -m ir2net_jax.tools.eval --checkpoint=runs/digits/best

``--checkpoint`` is one of

* a training workdir: its newest readable checkpoint (``checkpoints/``);
* ``workdir/best`` (or ``workdir/checkpoints``): its newest one;
* converted weights (``ir2net-convert``'s output).

``--packed=FILE`` evaluates a packed model (``ir2net-export``'s output)
instead, its binary convolutions on bits, with the config the file records
(``--config.data_dir=`` and the other overrides apply) or ``--config``'s
data; ``--convolution`` says how its packed convolutions run (``auto``: the
native kernel on CPUs where it is built, else pure JAX).

``--config`` may be left out for a workdir or its ``best/`` when the workdir
holds the ``config.json`` its run recorded; ``--config.field=value``
overrides fields either way (e.g. ``--config.data_dir`` where the data moved).
How the evaluation's processes start is its own to say
(``--config.coordinator_address``, ``num_processes``, ``process_id``, or
the cluster environment), never the recorded run's.
It prints top-1, top-5 and the number of examples, and writes them as JSON
to ``--output`` (default ``<checkpoint>/eval_<dataset>_<split>.json``).

The eval is the trainer's (``train.evaluate.evaluate``): every example of
``config.eval_split`` counted once, over all devices and hosts. Everything
that can be wrong (no checkpoint, one of another model, no data) is reported
before anything is compiled.
"""

import json
import re

import jax
from absl import app, flags

from ir2net_jax.deploy import evaluate as packed_evaluate
from ir2net_jax.deploy import packed
from ir2net_jax.storage import paths, preflight
from ir2net_jax.tools import checkpoint_cli
from ir2net_jax.train import evaluate, parallel

__all__ = ["default_output", "main", "run"]


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _file_name(dataset: str, split: str) -> str:
  return f"eval_{_safe(dataset)}_{_safe(split)}.json"


def default_output(checkpoint: str, dataset: str, split: str) -> str:
  """``<checkpoint>/eval_<dataset>_<split>.json``."""
  return paths.join(paths.resolve(checkpoint), _file_name(dataset, split))


def _define_flags() -> None:
  """The flags of this command alone (``checkpoint_cli.define`` has the
  others)."""
  flags.DEFINE_string("output", None, "JSON file for the result (default: "
                      "<checkpoint>/eval_<dataset>_<split>.json, or "
                      "<packed>.eval_<dataset>_<split>.json).")
  flags.DEFINE_string("packed", None, "A packed model file (ir2net-export) "
                      "to evaluate instead of --checkpoint.")
  flags.DEFINE_enum("convolution", "auto", list(packed.CONVOLUTIONS),
                    "--packed: how binary convolutions run.")


def main(argv) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.checkpoint) == bool(FLAGS.packed):
    raise app.UsageError("pass --checkpoint=RUN or --packed=FILE (one)")
  if FLAGS.output:   # before the evaluation: a bucket that cannot be used
    preflight.check(paths.parent(FLAGS.output), "--output", written=True)
  if FLAGS.packed:
    result = packed_evaluate.evaluate_packed(FLAGS.config, FLAGS.packed,
                                             FLAGS.convolution)
    output = FLAGS.output or (f"{paths.resolve(FLAGS.packed)}."
                              + _file_name(result["dataset"], result["split"]))
  else:
    result = evaluate.evaluate(FLAGS.config, FLAGS.checkpoint)
    output = FLAGS.output or default_output(
        FLAGS.checkpoint, result["dataset"], result["split"])
  if jax.process_index() == 0:
    paths.write_atomic(output, json.dumps(result, indent=1))
  print(f"{result['checkpoint']}: {result['dataset']} {result['split']}: "
        f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
        f"({result['count']} examples) -> {output}")
  parallel.shutdown_distributed()


def run() -> None:
  """The ``ir2net-eval`` console script."""
  checkpoint_cli.run(main, _define_flags, checkpoint_required=False)


if __name__ == "__main__":
  run()
