"""See information restriction: attention, erase mask and erased input.

Information restriction (SPEC section 3, ``restriction``) turns the clean
pass's last feature map into an attention map, thresholds it into a 0/1
mask and feeds the masked ("erased") image to a second pass. This module
draws that, one row per image::

  input | attention (viridis, 0 = dark) | mask (white = kept) | erased input

* ``restriction_maps`` computes the three maps with the functions the
  training objective uses (``restriction.attention_map``,
  ``restriction.upsample_bilinear_align_corners``,
  ``restriction.information_restriction``).
* ``restriction_grid`` lays them out as a uint8 RGB picture (numpy and PIL
  only, no matplotlib); ``save_png`` writes it.
* ``RestrictionPictures`` is what training calls at every evaluation: the
  same first ``config.restriction_images`` eval images every time, written to
  ``workdir/restriction/step_{step:06d}.png`` and as the TensorBoard image
  ``restriction``. Runs with ``information_restriction=False`` draw none:
  their objective erases nothing (its mask is all ones).
* The command line draws the grid for image files::

    python -m ir2net_jax.visualize --checkpoint=WORKDIR \\
        --images='photos/*.jpg,more/' [--config=SPEC_OR_FILE] \\
        [--output=grid.png] [--batch_stats=eval|train]

  ``WORKDIR`` is a training workdir (its latest checkpoint; its recorded
  config is used when ``--config`` is omitted), ``WORKDIR/best``, or
  converted weights (``python -m ir2net_jax.convert``; needs ``--config``).
  Images are brought to the model's input with the data set's eval recipe.
  ``load_config`` / ``load_variables`` read the checkpoint with
  ``ir2net_jax.evaluate``'s loader.

BatchNorm mode. The objective computes the mask in training mode: the clean
pass normalises with the statistics of its own training batch. A picture of
a few images would then depend on which images share its batch (and their
number, 8 rather than the run's batch size), so pictures use evaluation mode
by default (``train=False``: running statistics): each image's maps depend on
that image alone, and they show the network that evaluation measures.
``train=True`` reproduces the objective's mode on the given batch.
"""

import glob
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ir2net_jax import restriction

__all__ = ["restriction_maps", "restriction_grid", "save_png", "viridis",
           "display_normalization", "first_eval_images", "RestrictionPictures",
           "load_config", "load_variables", "load_images", "main", "run"]

Variables = Dict[str, Any]

# viridis at 33 evenly spaced points (matplotlib's values, rounded), linearly
# interpolated between them: perceptually uniform and readable in grey.
_VIRIDIS = np.array([
    (68, 1, 84), (71, 13, 96), (72, 24, 106), (72, 35, 116), (71, 45, 123),
    (69, 55, 129), (66, 64, 134), (62, 73, 137), (59, 82, 139), (55, 91, 141),
    (51, 99, 141), (47, 107, 142), (44, 114, 142), (41, 122, 142),
    (38, 130, 142), (35, 137, 142), (33, 145, 140), (31, 152, 139),
    (31, 160, 136), (34, 167, 133), (40, 174, 128), (50, 182, 122),
    (63, 188, 115), (78, 195, 107), (94, 201, 98), (112, 207, 87),
    (132, 212, 75), (152, 216, 62), (173, 220, 48), (194, 223, 35),
    (216, 226, 25), (236, 229, 27), (253, 231, 37),
], np.float64)

COLUMNS = ("input", "attention", "mask (white: kept)", "erased input")
MIN_CELL = 96       # smaller images are enlarged by an integer factor
GAP = 4             # pixels between and around cells
HEADER = 18         # height of the title row
LABEL = 64          # width of the "kept NN%" column on the right
_BACKGROUND = (150, 150, 150)   # between cells: sets off white and black
_PAPER = (255, 255, 255)        # under the titles and labels

# Display normalisation (mean, std) of the data sets the pipeline serves;
# others fall back to their spec's value_range.
_NORMALIZATION = {
    "digits": ("DIGITS_MEAN", "DIGITS_STD"),
    "cifar10": ("IMAGENET_MEAN", "IMAGENET_STD"),
    "imagenet2012": ("IMAGENET_MEAN", "IMAGENET_STD"),
}


def restriction_maps(model, variables: Variables, images: jax.Array,
                     erase_lambda: float = restriction.DEFAULT_LAMBDA,
                     train: bool = False) -> Dict[str, jax.Array]:
  """Attention, erase mask and erased images of information restriction.

  Jittable (``erase_lambda`` and ``train`` static). The feature map comes
  from one clean forward pass; attention and mask are computed as the
  training objective computes them (``restriction``), in float32 or wider.

  Args:
    model: the student, returning ``(logits, feature)``.
    variables: ``{'params', 'batch_stats'}``.
    images: (N, H, W, 3) normalised images.
    erase_lambda: the threshold factor (``config.erase_lambda``).
    train: False (default): BatchNorm with running statistics; True: with the
      statistics of ``images``, as the objective's clean pass (see the module
      docstring). Outside ``shard_map``, ``train=True`` needs a model without
      a BatchNorm ``axis_name``.

  Returns:
    ``attention`` (N, H, W) float32, the upsampled attention that the mask
    thresholds; ``mask`` (N, H, W) float32, 1 = kept; ``erased`` (N, H, W, 3)
    float32, ``images * mask``.
  """
  if train:
    (_, feature), _ = model.apply(variables, images, train=True,
                                  mutable=["batch_stats"])
  else:
    _, feature = model.apply(variables, images, train=False)
  erased, mask = restriction.information_restriction(feature, images,
                                                     erase_lambda)
  # What erase_mask thresholds: the same functions, the same float32 cast.
  wide = feature.astype(jnp.promote_types(feature.dtype, jnp.float32))
  attention = restriction.upsample_bilinear_align_corners(
      restriction.attention_map(wide), images.shape[1:3])
  return {"attention": attention.astype(jnp.float32),
          "mask": mask.astype(jnp.float32),
          "erased": erased.astype(jnp.float32)}


def viridis(x: np.ndarray) -> np.ndarray:
  """The viridis colormap: values in [0, 1] (clipped), shape S -> S + (3,)
  uint8."""
  pos = np.clip(np.asarray(x, np.float64), 0, 1) * (len(_VIRIDIS) - 1)
  i0 = np.minimum(np.floor(pos).astype(np.int64), len(_VIRIDIS) - 2)
  w = (pos - i0)[..., None]
  rgb = (1 - w) * _VIRIDIS[i0] + w * _VIRIDIS[i0 + 1]
  return np.round(rgb).astype(np.uint8)


def _to_pixels(images: np.ndarray, value_range, mean, std) -> np.ndarray:
  """Normalised (N, H, W, 3) -> uint8, undoing the normalisation."""
  x = np.asarray(images, np.float64)
  if mean is not None and std is not None:
    x = x * np.asarray(std, np.float64) + np.asarray(mean, np.float64)
  elif value_range is not None:
    lo, hi = value_range
    x = (x - lo) / (hi - lo)
  else:  # per image, its own range
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    x = (x - lo) / np.maximum(hi - lo, 1e-12)
  return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def restriction_grid(images, maps: Dict[str, Any],
                     value_range: Optional[Tuple[float, float]] = None, *,
                     mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None,
                     scale: Optional[int] = None,
                     header: bool = True) -> np.ndarray:
  """One row per image: input, attention, mask, erased input.

  Cell ``(r, c)`` (row r, column c of ``COLUMNS``) starts at pixel
  ``y = header_height + GAP + r * (scale * H + GAP)``,
  ``x = GAP + c * (scale * W + GAP)``, with ``header_height = HEADER`` with
  ``header``, else 0. A ``LABEL`` pixels wide column on the right gives each
  row's kept fraction.

  Args:
    images: (N, H, W, 3) the normalised clean images.
    maps: ``restriction_maps``' output (arrays, on the host or a device).
    value_range: the normalised range (lo, hi) that maps to black..white
      (e.g. ``recipes.normalized_range(mean, std)``); used when ``mean`` and
      ``std`` are not given. Neither: each image is stretched to its range.
    mean: per-channel mean of the normalisation, to undo it exactly.
    std: per-channel std of the normalisation.
    scale: integer enlargement (nearest neighbour, so each pixel and the
      mask's edge stay sharp); default the smallest making a cell at least
      ``MIN_CELL`` pixels.
    header: draw the column titles above the grid.

  Returns:
    uint8 (H', W', 3). The attention is divided by each image's maximum
    (dark = none); the mask is pure white (kept) or black (erased).
  """
  images = np.asarray(images, np.float32)
  n, h, w, _ = images.shape
  attention = np.asarray(maps["attention"], np.float64)
  peak = attention.max(axis=(1, 2), keepdims=True)
  attention = attention / np.where(peak > 0, peak, 1)
  mask = np.asarray(maps["mask"]) > 0.5
  mask_rgb = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=-1)
  cells = [_to_pixels(images, value_range, mean, std), viridis(attention),
           mask_rgb,
           _to_pixels(np.asarray(maps["erased"]), value_range, mean, std)]
  scale = scale or max(1, -(-MIN_CELL // max(h, w)))
  ch, cw = h * scale, w * scale
  top = HEADER if header else 0
  width = GAP + len(cells) * (cw + GAP)
  grid = np.empty((top + GAP + n * (ch + GAP), width + LABEL, 3), np.uint8)
  grid[...] = _BACKGROUND
  grid[:top] = _PAPER
  grid[:, width:] = _PAPER
  for c, column in enumerate(cells):
    big = column.repeat(scale, axis=1).repeat(scale, axis=2)
    x = GAP + c * (cw + GAP)
    for r in range(n):
      y = top + GAP + r * (ch + GAP)
      grid[y:y + ch, x:x + cw] = big[r]
  picture = Image.fromarray(grid)
  draw = ImageDraw.Draw(picture)
  font = ImageFont.load_default()
  if header:
    for c, title in enumerate(COLUMNS):
      left, _, right, _ = draw.textbbox((0, 0), title, font=font)
      x = GAP + c * (cw + GAP) + max(0, (cw - (right - left)) // 2)
      draw.text((x, 3), title, fill=(0, 0, 0), font=font)
  # The smallest attention over the mean: the mask erases nothing while it
  # is above erase_lambda.
  low = attention.min(axis=(1, 2)) / np.maximum(
      attention.mean(axis=(1, 2)), 1e-12)
  for r, (kept, ratio) in enumerate(zip(mask.mean(axis=(1, 2)), low)):
    y = top + GAP + r * (ch + GAP) + max(0, ch // 2 - 24)
    draw.text((width + 4, y), f"kept\n{kept:.0%}\nmin/mean\n{ratio:.2f}",
              fill=(0, 0, 0), font=font)
  return np.asarray(picture)


def save_png(grid: np.ndarray, path: str) -> None:
  """Writes a uint8 (H, W, 3) picture as PNG (parent directories made)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.asarray(grid, np.uint8)).save(path, format="PNG")


def display_normalization(config) -> Dict[str, Any]:
  """``restriction_grid`` keyword arguments that undo ``config.dataset``'s
  normalisation: ``mean`` and ``std`` where known, else ``value_range``."""
  from ir2net_jax.data import recipes, sources  # pylint: disable=g-import-not-at-top
  names = _NORMALIZATION.get(config.dataset)
  if names:
    return {"mean": getattr(recipes, names[0]),
            "std": getattr(recipes, names[1])}
  return {"value_range": sources.read_settings(config).spec.value_range}


def first_eval_images(config, count: int) -> np.ndarray:
  """The first ``count`` images of the eval split, (n, S, S, 3), n <= count.

  The same on every process of a multi-host run (each reads the start of the
  whole split), in the config's dtype, after the eval recipe.
  """
  from ir2net_jax import data  # pylint: disable=g-import-not-at-top
  batch = next(data.eval_iterator(config, global_batch_size=count,
                                  process_index=0, process_count=1))
  return batch["image"][batch["mask"] > 0]


class RestrictionPictures:
  """The restriction grid of fixed eval images, drawn at every evaluation.

  The images are the first ``config.restriction_images`` of the eval split,
  read once. Every process runs the same jitted forward (a multi-host run
  needs that); process 0 alone writes
  ``workdir/restriction/step_{step:06d}.png`` and the TensorBoard image
  ``restriction``. BatchNorm in evaluation mode (module docstring).

  Args:
    config: the run's config.
    model: the student (its BatchNorm ``axis_name`` is unused in eval mode).
    mesh: the run's mesh; variables passed to ``__call__`` are replicated
      on it.
    workdir: the run's directory.
  """

  def __init__(self, config, model, mesh, workdir: str):
    from ir2net_jax import parallel  # pylint: disable=g-import-not-at-top
    images = first_eval_images(config, config.restriction_images)
    self.host_images = np.asarray(images, np.float32)
    self.images = parallel.replicate(images, mesh)
    self.directory = os.path.join(workdir, "restriction")
    self.display = display_normalization(config)
    lam = config.erase_lambda
    self._maps = jax.jit(lambda v, x: restriction_maps(model, v, x, lam),
                         out_shardings=parallel.replicated(mesh))

  def __call__(self, step: int, variables: Variables, writer) -> None:
    maps = self._maps(variables, self.images)
    if jax.process_index() != 0:
      return
    maps = {k: np.asarray(v.addressable_data(0)) for k, v in maps.items()}
    grid = restriction_grid(self.host_images, maps, **self.display)
    save_png(grid, os.path.join(self.directory, f"step_{step:06d}.png"))
    writer.write_images(step, {"restriction": grid[None]})


# ---------------------------------------------------------------------------
# Loading a checkpoint and image files (the command line).


class VisualizeError(ValueError):
  """A checkpoint, config or image the command was given cannot be used."""


def load_config(checkpoint: str):
  """The config that the workdir of ``checkpoint`` recorded
  (``evaluate.recorded_config``), or None (e.g. converted weights)."""
  from ir2net_jax import config_checks, evaluate  # pylint: disable=g-import-not-at-top
  path = evaluate.recorded_config(checkpoint)
  return None if path is None else config_checks.read_recorded_config(path)


def _num_classes(config) -> int:
  if config.num_classes > 0:
    return config.num_classes
  from ir2net_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.read_settings(config).spec.num_classes


def load_variables(config, checkpoint: str) -> Tuple[Any, Variables]:
  """The model ``config`` names and its variables from ``checkpoint``: a
  workdir, ``workdir/best`` or converted weights (``evaluate.load_variables``).

  Returns:
    ``(model, {'params', 'batch_stats'})``; the model has no BatchNorm
    ``axis_name`` (it runs outside ``shard_map``).

  Raises:
    VisualizeError: no checkpoint there, or one that does not fit the model.
  """
  from ir2net_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  num_classes = _num_classes(config)
  try:
    _, _, variables = evaluate.load_variables(config, checkpoint, num_classes)
  except evaluate.CheckpointError as e:
    raise VisualizeError(str(e)) from None
  return train.build_model(config, num_classes), variables


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _image_files(patterns: str) -> Sequence[str]:
  files = []
  for pattern in filter(None, (p.strip() for p in patterns.split(","))):
    if os.path.isdir(pattern):
      found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern))
    else:
      found = sorted(glob.glob(os.path.expanduser(pattern)))
    found = [f for f in found if f.lower().endswith(_IMAGE_SUFFIXES)]
    if not found:
      raise VisualizeError(f"--images: {pattern!r} matches no .png / .jpg "
                           "file")
    files += found
  if not files:
    raise VisualizeError("--images is empty; pass files, globs or "
                         "directories, separated by commas")
  return files


def load_images(config, patterns: str) -> np.ndarray:
  """Image files -> (N, S, S, 3) float32, as the data set's eval recipe
  prepares its own images.

  ImageNet: the recipe decodes, resizes the shorter side and centre-crops.
  Digits: converted to grey, then the recipe's bilinear resize to S. Others
  (CIFAR-10): resized on the shorter side and centre-cropped to S unless
  they are S x S already, then the recipe.

  Args:
    config: the run's config (``dataset``, ``image_size``).
    patterns: comma-separated files, glob patterns or directories.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data import augment, sources  # pylint: disable=g-import-not-at-top
  settings = sources.read_settings(config)
  spec, size = settings.spec, settings.image_size
  out = []
  for path in _image_files(patterns):
    encoded = tf.io.read_file(path)
    if spec.decoders:  # the recipe decodes (JPEG bytes; PNG decodes too)
      image = spec.eval_recipe(encoded, size)
    else:
      channels = 1 if config.dataset == "digits" else 3
      image = tf.io.decode_image(encoded, channels=channels,
                                 expand_animations=False)
      if config.dataset != "digits" and tuple(image.shape[:2]) != (size, size):
        image = augment.center_crop(augment.resize_shorter_side(image, size),
                                    size)
      image = spec.eval_recipe(image, size)
    out.append(np.asarray(image, np.float32))
  return np.stack(out)


def main(argv) -> None:
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise VisualizeError(f"unexpected arguments: {argv[1:]}")
  if not f["verbosity"].present:  # orbax logs several lines per restore
    logging.set_verbosity(logging.WARNING)
  config = f.config if f.config is not None else load_config(f.checkpoint)
  if config is None:
    raise VisualizeError(f"{f.checkpoint} has no recorded config.json (e.g. "
                         "converted weights); pass --config=SPEC_OR_FILE")
  images = load_images(config, f.images)       # checked before compiling
  model, variables = load_variables(config, f.checkpoint)
  train = f.batch_stats == "train"
  maps = jax.jit(lambda v, x: restriction_maps(
      model, v, x, config.erase_lambda, train=train))(variables, images)
  grid = restriction_grid(images, jax.device_get(maps),
                          **display_normalization(config))
  save_png(grid, f.output)
  kept = float(np.mean(np.asarray(maps["mask"])))
  print(f"wrote {f.output}: {len(images)} images, {grid.shape[1]}x"
        f"{grid.shape[0]} px, {kept:.0%} of the pixels kept "
        f"(erase_lambda={config.erase_lambda}, BatchNorm {f.batch_stats} "
        "mode)")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Recipe (digits:smoke) or config file; default: the "
      "config recorded in the checkpoint's workdir.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Training workdir, workdir/best, "
                      "or converted weights.")
  flags.DEFINE_string("images", None, "Comma-separated image files, glob "
                      "patterns or directories (.png, .jpg).")
  flags.DEFINE_string("output", "restriction.png", "The PNG to write.")
  flags.DEFINE_enum("batch_stats", "eval", ["eval", "train"],
                    "BatchNorm mode: running statistics (eval) or those of "
                    "the given images, as the training objective (train).")
  flags.mark_flags_as_required(["checkpoint", "images"])


def run() -> None:
  """Console entry point."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from ir2net_jax import configs  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main, argv=configs.expand_config_flag(sys.argv))


if __name__ == "__main__":
  run()
