"""The restriction grid: one row per image, drawn with numpy and PIL::

  input | attention (viridis, 0 = dark) | mask (white = kept) | erased input

``restriction_grid`` lays out ``nn.restriction.restriction_maps``' output
as a uint8 RGB picture (no matplotlib); ``save_png`` writes it.
"""

import io
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ir2net_jax.storage import paths

__all__ = ["restriction_grid", "save_png", "viridis", "COLUMNS", "MIN_CELL",
           "GAP", "HEADER", "LABEL"]

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
                     header: bool = True,
                     row_labels: Optional[Sequence[str]] = None
                     ) -> np.ndarray:
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
    row_labels: text for each row (two short lines fit beside a
      ``MIN_CELL`` row), drawn above its kept fraction; the label column
      widens to fit it.

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
  font = ImageFont.load_default()
  label_width = LABEL
  if row_labels:
    label_width = max([LABEL] + [int(font.getlength(line)) + 8
                                 for text in row_labels
                                 for line in text.split("\n")])
  grid = np.empty((top + GAP + n * (ch + GAP), width + label_width, 3),
                  np.uint8)
  grid[...] = _BACKGROUND
  grid[:top] = _PAPER
  grid[:, width:] = _PAPER
  for c, column in enumerate(cells):
    big = column.repeat(scale, axis=1).repeat(scale, axis=2)
    x = GAP + c * (cw + GAP)
    for r in range(n):
      y = top + GAP + r * (ch + GAP)
      grid[y:y + ch, x:x + cw] = big[r]
  return _annotate(grid, header, cw, ch, top, width, attention, mask, font,
                   row_labels)


def _annotate(grid: np.ndarray, header: bool, cw: int, ch: int, top: int,
              width: int, attention: np.ndarray, mask: np.ndarray, font,
              row_labels: Optional[Sequence[str]]) -> np.ndarray:
  """``restriction_grid``'s text: the column titles, and each row's label,
  kept fraction and smallest attention over the mean."""
  picture = Image.fromarray(grid)
  draw = ImageDraw.Draw(picture)
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
    text = f"kept\n{kept:.0%}\nmin/mean\n{ratio:.2f}"
    if row_labels:
      text = f"{row_labels[r]}\n{text}"
      y = top + GAP + r * (ch + GAP)
    else:
      y = top + GAP + r * (ch + GAP) + max(0, ch // 2 - 24)
    draw.text((width + 4, y), text, fill=(0, 0, 0), font=font)
  return np.asarray(picture)


def save_png(grid: np.ndarray, path: str) -> None:
  """Writes a uint8 (H, W, 3) picture as PNG (parent directories made),
  to a local path or a bucket URL, whole."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(grid, np.uint8)).save(buffer, format="PNG")
  paths.write_atomic(path, buffer.getvalue())
