"""Classifies your images with a trained model: ``ir2net-predict``.

  ir2net-predict --checkpoint=runs/digits/best --images='photos/*.png,more/'
  ir2net-predict --checkpoint=runs/digits --images=a.png --json --top_k=3
  ir2net-predict --checkpoint=runs/digits --images=a.png --pictures=a_maps.png

``--checkpoint`` is a training workdir (its newest checkpoint), its
``best/``, or converted weights (``ir2net-convert``'s output, with
``--config``). ``--images`` takes files, glob patterns and directories,
separated by commas. Each image is prepared as the data set's eval recipe
prepares its own and classified in evaluation mode; the command prints each
image's ``--top_k`` classes with their probabilities, as a table or, with
``--json``, as JSON (and writes that JSON to ``--output`` where given).
Class names are the data set's (a folder's subfolders, a tfds builder's
label names; numbers where it names none).

``--packed=FILE`` classifies with a packed model (``ir2net-export``'s
output) instead, its binary convolutions on bits, its class names and eval
recipe the file's.

``--pictures=PNG`` also draws each image with its predicted class and the
model's restriction maps: attention, the erase mask and the erased input
(``ir2net_jax.train.grid``).
"""

import json
import os

from absl import app, flags, logging

from ir2net_jax.configs import ConfigError
from ir2net_jax.data import images as images_lib
from ir2net_jax.deploy import load, packed
from ir2net_jax.storage import paths, preflight
from ir2net_jax.tools import checkpoint_cli
from ir2net_jax.train import evaluate, grid, pictures, predict

__all__ = ["main", "run"]


def _define_flags() -> None:
  """The flags of this command alone (``checkpoint_cli.define`` has the
  others)."""
  flags.DEFINE_string("images", None, "Comma-separated image files, glob "
                      "patterns or directories.")
  flags.DEFINE_integer("top_k", 5, "Classes shown per image.", lower_bound=1)
  flags.DEFINE_bool("json", False, "Print JSON instead of the table.")
  flags.DEFINE_string("output", None, "Also write the JSON to this file.")
  flags.DEFINE_string("pictures", None, "A PNG of each image with its class "
                      "and restriction maps.")
  flags.DEFINE_string("packed", None, "A packed model file (ir2net-export) "
                      "to classify with instead of --checkpoint.")
  flags.mark_flag_as_required("images")


def _result(config, checkpoint: str, found: predict.Predictions):
  return {"checkpoint": checkpoint, "model": config.model,
          "dataset": config.dataset,
          "predictions": [p.as_dict() for p in found.predictions]}


def _draw(config, found: predict.Predictions, output: str) -> None:
  maps = predict.restriction_maps(found, config.erase_lambda)
  labels = [f"{_short(os.path.basename(p.path))}\n"
            f"{_short(p.classes[0])} {p.probabilities[0]:.0%}"
            for p in found.predictions]
  grid.save_png(grid.restriction_grid(
      found.images, maps, row_labels=labels,
      **pictures.display_normalization(config)), output)


def _short(text: str, most: int = 24) -> str:
  return text if len(text) <= most else text[:most - 3] + "..."


def _check_source(source: str, config, is_packed: bool) -> None:
  """Raises where ``source`` is not there or no config is known (one line,
  ``checkpoint_cli.run``).

  Raises:
    StorageError, CheckpointError, ConfigError: naming ``source``.
  """
  preflight.check(source, "--packed" if is_packed else "--checkpoint",
                  holds="files" if is_packed else "checkpoint")
  if not paths.exists(source):
    raise evaluate.CheckpointError(
        f"--packed={source}: no such file; write one with ir2net-export"
        if is_packed else
        f"--checkpoint={source}: no such directory; pass a training "
        "workdir, its best/, or converted weights (ir2net-convert)")
  if config is None:
    raise ConfigError(
        f"{source} is not a packed model" if is_packed else
        f"{source} has no recorded config.json (e.g. converted weights); "
        "pass --config=RECIPE")


def _predict_packed(config, path: str, patterns: str, top_k: int
                    ) -> predict.Predictions:
  """``predict.predict`` with the packed model file ``path``."""
  model = load.load_packed(path)
  files, images = images_lib.load_image_files(config, patterns)
  return predict.classify(
      config, files, images, model, top_k, model.model, model.variables,
      model.class_names,
      lambda: packed.on_bits(model.kernels, model.how, model.folds))


def main(argv) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not f["verbosity"].present:  # orbax logs several lines per restore
    logging.set_verbosity(logging.WARNING)
  config = f.config   # the recorded one where --config is left out
  if bool(f.checkpoint) == bool(f.packed):
    raise app.UsageError("pass --checkpoint=RUN or --packed=FILE (one)")
  source = f.checkpoint or f.packed
  _check_source(source, config, bool(f.packed))
  for flag in ("output", "pictures"):   # before anything is computed
    if f[flag].value:
      preflight.check(paths.parent(f[flag].value), f"--{flag}", written=True)
  found = (_predict_packed(config, f.packed, f.images, f.top_k)
           if f.packed else
           predict.predict(config, f.checkpoint, f.images, f.top_k))
  result = _result(config, source, found)
  if f.output:
    paths.write_atomic(f.output, json.dumps(result, indent=1))
  print(json.dumps(result, indent=1) if f.json
        else predict.table(found.predictions))
  if f.pictures:
    _draw(config, found, f.pictures)
    if not f.json:
      print(f"wrote {f.pictures}")


def run() -> None:
  """The ``ir2net-predict`` console script."""
  checkpoint_cli.run(main, _define_flags, checkpoint_required=False)


if __name__ == "__main__":
  run()
