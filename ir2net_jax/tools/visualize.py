"""Draws information restriction for image files: ``python -m
ir2net_jax.tools.visualize``.

  python -m ir2net_jax.tools.visualize --checkpoint=WORKDIR \\
      --images='photos/*.jpg,more/' [--config=SPEC_OR_FILE] \\
      [--output=grid.png] [--batch_stats=eval|train]

One row per image: input | attention | mask (white = kept) | erased input
(``train.grid.restriction_grid`` of ``nn.restriction.restriction_maps``).
``WORKDIR`` is a training workdir (its latest checkpoint; its recorded
config is used when ``--config`` is omitted), ``WORKDIR/best``, or
converted weights (``ir2net-convert``'s output; needs ``--config``). Images
are brought to the model's input with the data set's eval recipe
(``data.images.load_images``).

BatchNorm mode: evaluation (running statistics) by default, so that each
image's maps depend on that image alone; ``--batch_stats=train`` reproduces
the training objective's mode on the given images.
"""

from typing import Any, Dict, Tuple

import jax
import numpy as np
from absl import flags, logging

from ir2net_jax import configs
from ir2net_jax.data import images as images_lib
from ir2net_jax.data.shared.specs import DataError
from ir2net_jax.nn import restriction
from ir2net_jax.tools import checkpoint_cli
from ir2net_jax.train import evaluate, grid, pictures

__all__ = ["VisualizeError", "load_model", "main", "run"]


class VisualizeError(configs.ConfigError):
  """A checkpoint, config or image the command was given cannot be used."""


def load_model(config, checkpoint: str) -> Tuple[Any, Dict[str, Any]]:
  """``evaluate.load_model``, its errors as ``VisualizeError``."""
  try:
    return evaluate.load_model(config, checkpoint)
  except evaluate.CheckpointError as e:
    raise VisualizeError(str(e)) from None


def main(argv) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise VisualizeError(f"unexpected arguments: {argv[1:]}")
  if not f["verbosity"].present:  # orbax logs several lines per restore
    logging.set_verbosity(logging.WARNING)
  try:   # the recorded one where --config is left out
    config = evaluate.config_for(f.config, f.checkpoint)
  except (configs.ConfigError, evaluate.CheckpointError) as e:
    raise VisualizeError(str(e)) from None
  try:
    images = images_lib.load_images(config, f.images)  # before compiling
  except DataError as e:
    raise VisualizeError(str(e)) from None
  model, variables = load_model(config, f.checkpoint)
  train = f.batch_stats == "train"
  maps = jax.jit(lambda v, x: restriction.restriction_maps(
      model, v, x, config.erase_lambda, train=train))(variables, images)
  picture = grid.restriction_grid(images, jax.device_get(maps),
                                  **pictures.display_normalization(config))
  grid.save_png(picture, f.output)
  kept = float(np.mean(np.asarray(maps["mask"])))
  print(f"wrote {f.output}: {len(images)} images, {picture.shape[1]}x"
        f"{picture.shape[0]} px, {kept:.0%} of the pixels kept "
        f"(erase_lambda={config.erase_lambda}, BatchNorm {f.batch_stats} "
        "mode)")


def _define_flags() -> None:
  """The flags of this command alone (``checkpoint_cli.define`` has the
  others)."""
  flags.DEFINE_string("images", None, "Comma-separated image files, glob "
                      "patterns or directories (.png, .jpg).")
  flags.DEFINE_string("output", "restriction.png", "The PNG to write.")
  flags.DEFINE_enum("batch_stats", "eval", ["eval", "train"],
                    "BatchNorm mode: running statistics (eval) or those of "
                    "the given images, as the training objective (train).")
  flags.mark_flag_as_required("images")


def run() -> None:
  """Console entry point."""
  checkpoint_cli.run(main, _define_flags)


if __name__ == "__main__":
  run()
