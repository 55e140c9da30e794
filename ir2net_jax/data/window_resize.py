"""RandomResizedCrop's resize on the accelerators: Pillow's antialiased
bilinear filter, as jax ops on windows of fixed-size canvases.

The grain engine can leave the resize of each train window to the devices
(``config.input_resize``): the host sends each decoded window unresized at
the top left of a (C, C) canvas (``host_recipes.imagenet_train_parts``),
with the window's place in it, and :func:`resize_windows` resizes them all
in the train step. The filter is Pillow's (``Image.resize(BILINEAR, box)``,
what the reference and ``host_recipes`` use): output pixel ``i`` samples
the window at ``center = start + (i + 0.5) * scale`` (``scale = length /
S``) with the triangle of half-width ``max(1, scale)`` in input pixels,
weights normalised over the pixels the image has (the canvas's padding is
never read), the horizontal pass first, rounded to levels, then the
vertical one. Pillow computes in fixed point, this in float32: where a
pixel's exact value lies half-way between two levels (the weights are often
simple fractions), the two may round it differently. About 95% of pixels
come out equal, the rest one level apart (two, once in millions).

It is two small matrix products per image ((S, C) by (C, C, 3), then by
(C, S)): about 0.25 GFLOP an image at S = 224, C = 336, in float32 at full
precision, a few percent of a binary ResNet's step on a GPU; on a CPU it
costs more than Pillow's resize, so ``input_resize='auto'`` keeps the resize
on the host there.
"""

import jax
import jax.numpy as jnp

__all__ = ["resize_weights", "resize_windows"]


def resize_weights(start, length, extent, out_size: int, in_size: int):
  """Pillow's bilinear resize of one axis as a matrix.

  Args:
    start: float (), the window's first coordinate, in input pixels.
    length: float (), its length.
    extent: int (), how many input pixels there are (the rest, up to
      ``in_size``, is padding that gets no weight).
    out_size: S.
    in_size: C.

  Returns:
    float32 (S, C): row ``i`` holds output pixel ``i``'s weights.
  """
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  center = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pixel = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  weights = jnp.maximum(
      0.0, 1.0 - jnp.abs(pixel[None, :] - center[:, None]) / support)
  weights = jnp.where(jnp.arange(in_size)[None, :] < extent, weights, 0.0)
  return weights / weights.sum(axis=1, keepdims=True)


def _levels(x):
  """Rounded to uint8 levels as Pillow's fixed-point passes round them
  (half up), kept in float32."""
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def _resize_one(canvas, window, extent, size: int):
  """One canvas's window -> float32 (S, S, 3) levels: Pillow's horizontal
  pass, rounded to levels, then its vertical pass, rounded."""
  width = resize_weights(window[1], window[3], extent[1], size,
                         canvas.shape[1])
  height = resize_weights(window[0], window[2], extent[0], size,
                          canvas.shape[0])
  highest = jax.lax.Precision.HIGHEST
  columns = _levels(jnp.einsum("lk,jkc->jlc", width,
                               canvas.astype(jnp.float32), precision=highest))
  return _levels(jnp.einsum("ij,jlc->ilc", height, columns,
                            precision=highest))


def resize_windows(canvases, windows, extents, size: int):
  """Resizes each canvas's window to (S, S), as Pillow would, rounded.

  Args:
    canvases: uint8 (B, C, C, 3).
    windows: float32 (B, 4), ``(top, left, height, width)`` in each
      canvas's pixels.
    extents: int32 (B, 2), the height and width of each canvas's image.
    size: S.

  Returns:
    uint8 (B, S, S, 3).
  """
  return jax.vmap(_resize_one, in_axes=(0, 0, 0, None))(
      canvases, windows, extents, size).astype(jnp.uint8)
