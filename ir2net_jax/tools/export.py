"""Writes a trained model with its binary weights as bits: ``ir2net-export``.

  ir2net-export --checkpoint=runs/digits/best --output=runs/digits/model.packed
  ir2net-export --checkpoint=gs://BUCKET/run --output=model.packed \
      --float_dtype=bfloat16
  ir2net-export --checkpoint=runs/digits/best --output=model.stablehlo \
      --format=stablehlo

``--format=packed`` (the default) writes the packed file that
``ir2net_jax.load_packed`` and ``ir2net-eval --packed`` read
(``ir2net_jax.deploy.export``): each binary convolution's weights as one
bit each, the layers that stay in float in ``--float_dtype``
(``export.FLOAT_DTYPES``). It prints the file's size next to the float32
model's.

``--format=stablehlo`` writes a ``jax.export`` serialisation of the packed
model's inference on the pure-JAX path, for ``--platforms``, with any batch
size: it runs with jax alone, without this package
(``ir2net_jax.deploy.stablehlo``; docs/deploy.md).

``--checkpoint`` is a training workdir (its newest checkpoint), its
``best/``, or converted weights (with ``--config``); the model must have
binary weights (CIFAR models, ImageNet stage 2).
"""

from absl import app, flags

from ir2net_jax.deploy import export, load, stablehlo
from ir2net_jax.storage import paths, preflight
from ir2net_jax.tools import checkpoint_cli

__all__ = ["main", "run"]


def _define_flags() -> None:
  flags.DEFINE_string("output", None, "The file to write (local or gs://).")
  flags.DEFINE_enum("format", "packed", ["packed", "stablehlo"],
                    "packed: for load_packed / ir2net-eval --packed; "
                    "stablehlo: a jax.export artifact that needs only jax.")
  flags.DEFINE_enum("float_dtype", "float32", list(export.FLOAT_DTYPES),
                    "What the layers kept in float are stored in: float32 "
                    "(exact), bfloat16 (every float layer; moves some "
                    "signs), bfloat16_head (the layers after the last "
                    "binary convolution; every binary sum stays exact).")
  flags.DEFINE_list("platforms", list(stablehlo.PLATFORMS),
                    "--format=stablehlo: the platforms it runs on.")
  flags.mark_flag_as_required("output")


def main(argv) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  preflight.check(paths.parent(FLAGS.output), "--output", written=True)
  if FLAGS.format == "packed":
    print(export.export_packed(FLAGS.checkpoint, FLAGS.output, FLAGS.config,
                               FLAGS.float_dtype).line())
    return
  data = export.encode_checkpoint(FLAGS.checkpoint, FLAGS.config,
                                  FLAGS.float_dtype)
  model = load.decode(data, how="jax", source=FLAGS.checkpoint)
  serialized = stablehlo.serialize(model, tuple(FLAGS.platforms))
  paths.write_atomic(FLAGS.output, serialized)
  print(f"{paths.resolve(FLAGS.output)}: {len(serialized) / 2**20:.2f} MiB, "
        f"jax.export for {', '.join(FLAGS.platforms)}, images (B, "
        f"{model.image_size}, {model.image_size}, 3) float32 -> logits "
        f"(B, {model.num_classes})")


def run() -> None:
  """The ``ir2net-export`` console script."""
  checkpoint_cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
