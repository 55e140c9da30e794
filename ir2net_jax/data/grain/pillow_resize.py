"""Pillow's antialiased bilinear resize as the integers it computes with,
so that another implementation (``window_resize``, on the accelerators) can
reproduce its pixels exactly.

``Image.resize(size, BILINEAR, box)`` on an 8-bit image
(libImaging/Resample.c) resizes in two passes, one an axis. For each axis
it computes, in float64, each output pixel's first input pixel and weights
(``precompute_coeffs``), turns the weights into integers in units of 2^-22
(``normalize_coeffs_8bpc``), and for each output pixel sums ``level *
weight`` in int32 from 2^21, then floors to a level, clipped to [0, 255].
Each pass is rounded so, and the order of the passes shows in the pixels:
:func:`vertical_first`. :func:`resize_coefficients` computes the integers
on the host (numpy, about 40 µs for both axes of a 224-pixel output).
"""

import functools
import math

import numpy as np
import PIL

__all__ = ["PRECISION_BITS", "resize_taps", "resize_coefficients",
           "vertical_first"]

# Pillow's fixed point for 8-bit images: weights in units of 2^-22.
PRECISION_BITS = 22
_PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


def resize_taps(canvas: int, image_size: int) -> int:
  """How many input pixels, at most, Pillow's bilinear filter reads for one
  output pixel of a window at most ``canvas`` pixels long resized to S:
  those within ``max(1, C / S)`` of its centre, ``ceil(2 max(1, C / S))``,
  and one for the rounding of the ends (Pillow's own bound, its ``ksize``,
  is looser)."""
  return math.ceil(2 * max(1.0, canvas / image_size)) + 1


def resize_coefficients(start, end, in_size, out_size: int,
                        taps: int) -> np.ndarray:
  """Pillow's bilinear resize of an axis as the integers it computes with.

  What ``Image.resize(BILINEAR, box)`` computes for the box's ``start`` and
  ``end`` on an axis (Resample.c's ``precompute_coeffs`` and
  ``normalize_coeffs_8bpc``: the same float64 operations in the same order,
  from the box in float32 as Pillow takes it), so that
  ``window_resize.resize_windows`` reproduces Pillow's pixels exactly.
  Axes broadcast: pass (2,) arrays for a window's rows and columns at once.

  Args:
    start, end: float (...), the window's first and end coordinates.
    in_size: int (...), the pixels the image has on the axis (no weight
      reaches past them).
    out_size: S.
    taps: K, at least the pixels any output pixel reads
      (:func:`resize_taps`).

  Returns:
    int32 (..., S, 1 + K): column 0 each output pixel's first input pixel,
    the rest its weights in units of 2^-22 (zeros past the pixels it
    reads).
  """
  in0 = np.asarray(start, np.float32)[..., None]
  in1 = np.asarray(end, np.float32)[..., None]
  scale = (in1 - in0).astype(np.float64) / out_size
  filterscale = np.maximum(scale, 1.0)   # the bilinear filter's support is 1
  center = in0 + _half_steps(out_size) * scale
  # C's (int) truncates toward zero; whole numbers are exact in float64.
  first = np.maximum(0.0, np.trunc(center - filterscale + 0.5))
  last = np.minimum(np.asarray(in_size)[..., None],
                    np.trunc(center + filterscale + 0.5))
  needed = int((last - first).max())
  if needed > taps:
    raise ValueError(f"a window of {float(np.max(in1 - in0))} pixels "
                     f"resized to {out_size} reads {needed} pixels an output "
                     f"pixel, more than taps={taps}.")
  # (..., K, S), so that numpy's inner loops run along S.
  pixel = first[..., None, :] + np.arange(taps, dtype=np.float64)[:, None]
  weights = pixel - center[..., None, :]
  weights += 0.5
  weights *= (1.0 / filterscale)[..., None]
  np.abs(weights, out=weights)
  np.subtract(1.0, weights, out=weights)
  np.maximum(weights, 0.0, out=weights)
  weights *= pixel < last[..., None, :]
  total = weights[..., 0, :]
  for tap in range(1, taps):   # Pillow's order of summation, to the last bit
    total = total + weights[..., tap, :]
  weights /= total[..., None, :]
  weights *= 1 << PRECISION_BITS
  weights += 0.5
  out = np.empty(first.shape + (1 + taps,), np.int32)
  out[..., 0] = first
  out[..., 1:] = np.swapaxes(weights, -1, -2)   # truncated, as C's (int)
  return out


@functools.lru_cache(maxsize=None)
def _half_steps(size: int) -> np.ndarray:
  """float64 (S,): 0.5, 1.5, ... (Pillow's ``xx + 0.5``)."""
  steps = np.arange(size) + 0.5
  steps.flags.writeable = False
  return steps


def vertical_first(height: int, width: int, image_size: int) -> bool:
  """Whether Pillow resizes an (h, w) image to (S, S) vertical pass first.

  Pillow resizes in two passes, each rounded to levels, so their order
  shows in the pixels. Up to Pillow 12 the horizontal pass always runs
  first; from 13 on, the vertical one does where the height shrinks by more
  than twice as many pixels as the width (``ImagingResampleInner``).
  """
  if not _PILLOW_13:
    return False
  return height - image_size > 0 and (
      height - image_size > 2 * (width - image_size))
