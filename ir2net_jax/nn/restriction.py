"""Information restriction: erase what the network does not attend to.

Shapes: the feature map ``F`` is (B, h, w, C) (NHWC), images are (B, H, W, 3).
Everything is vectorised over the batch and jittable; no gradient flows through
the mask.

The attention map, its upsampling and the threshold are computed in float32
even when the network runs in bfloat16. The mask is a discrete choice: a
pixel whose attention lies near ``lam`` times the mean is kept or erased
whole, and the second forward pass sees a different image. bfloat16 keeps 8
bits of mantissa, so a mean over hundreds of channels and a per-column norm
rounded to it would move the attention by up to ~0.4 % and flip such pixels
on rounding noise alone: the restriction would then depend on the number
format, not on what the network attends to, and a bfloat16 run's mask would
drift from the float32 run's by more than its features do.

``restriction_maps`` gives a model's attention, mask and erased images for
pictures (``ir2net_jax.train.pictures``).
"""

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

__all__ = [
    "attention_map", "upsample_bilinear_align_corners", "erase_mask",
    "information_restriction", "restriction_maps",
]

DEFAULT_LAMBDA = 0.15


def attention_map(feature: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Spatial attention ``at(F)`` of the reference, (B, h, w, C) -> (B, h, w).

  ``a = mean_c(F^2)``, then each column is divided by its L2 norm along H:
  the reference calls ``F.normalize`` on the (B, h, w) map with its default
  ``dim=1``, which is the H axis, not the whole map.
  """
  a = jnp.mean(jnp.square(feature), axis=-1)
  norm = jnp.sqrt(jnp.sum(jnp.square(a), axis=1, keepdims=True))
  return a / jnp.maximum(norm, eps)


def _linear_taps(in_size: int, out_size: int, dtype):
  """Indices and weights of 1-D linear interpolation, align_corners=True.

  Mirrors PyTorch: ``src = i * (in - 1) / (out - 1)``, ``i0 = floor(src)``,
  ``i1 = min(i0 + 1, in - 1)``, ``w1 = src - i0``, ``w0 = 1 - w1``.
  """
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  src = jnp.arange(out_size, dtype=dtype) * jnp.asarray(scale, dtype)
  i0 = jnp.floor(src).astype(jnp.int32)
  i0 = jnp.minimum(i0, in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  w1 = src - i0.astype(dtype)
  return i0, i1, 1 - w1, w1


def upsample_bilinear_align_corners(a: jax.Array,
                                    size: Tuple[int, int]) -> jax.Array:
  """Bilinear upsampling with ``align_corners=True``, (B, h, w) -> (B, H, W).

  ``jax.image.resize`` has no align_corners mode; corner pixels here equal
  the input's corners, as in ``F.interpolate(..., align_corners=True)``.
  """
  _, h, w = a.shape
  out_h, out_w = size
  h0, h1, hw0, hw1 = _linear_taps(h, out_h, a.dtype)
  w0, w1, ww0, ww1 = _linear_taps(w, out_w, a.dtype)
  rows0, rows1 = a[:, h0, :], a[:, h1, :]          # (B, H, w)
  def horizontal(rows):
    return ww0 * rows[:, :, w0] + ww1 * rows[:, :, w1]   # (B, H, W)
  return (hw0[:, None] * horizontal(rows0) + hw1[:, None] * horizontal(rows1))


def erase_mask(attention: jax.Array, size: Tuple[int, int],
               lam: float = DEFAULT_LAMBDA) -> jax.Array:
  """0/1 mask of the pixels to keep, (B, h, w) -> (B, H, W) in attention dtype.

  A pixel is kept where the upsampled attention is strictly greater than
  ``lam`` times its per-example mean.
  """
  up = upsample_bilinear_align_corners(jax.lax.stop_gradient(attention), size)
  threshold = lam * jnp.mean(up, axis=(1, 2), keepdims=True)
  return (up > threshold).astype(attention.dtype)


def information_restriction(feature: jax.Array, images: jax.Array,
                            lam: float = DEFAULT_LAMBDA
                            ) -> Tuple[jax.Array, jax.Array]:
  """Erases the regions of ``images`` that ``feature`` does not attend to.

  Args:
    feature: (B, h, w, C) last feature map of the clean forward pass, any
      float dtype (the attention is computed in float32 or wider).
    images: (B, H, W, 3) the (normalised) clean batch.
    lam: threshold factor lambda (0.15 in the paper).

  Returns:
    ``(erased, mask)``: ``images * mask`` on every channel, (B, H, W, 3), and
    the (B, H, W) mask in the images' dtype. Neither carries a gradient.
  """
  feature = jax.lax.stop_gradient(feature)
  # float32 (float64 under x64): see the module docstring.
  feature = feature.astype(jnp.promote_types(feature.dtype, jnp.float32))
  mask = erase_mask(attention_map(feature), images.shape[1:3], lam)
  mask = mask.astype(images.dtype)
  return images * mask[..., None], mask


def restriction_maps(model, variables: Any, images: jax.Array,
                     erase_lambda: float = DEFAULT_LAMBDA,
                     train: bool = False) -> Dict[str, jax.Array]:
  """Attention, erase mask and erased images of information restriction.

  Jittable (``erase_lambda`` and ``train`` static). The feature map comes
  from one clean forward pass; attention and mask are computed as the
  training objective computes them, in float32 or wider.

  Args:
    model: the student, returning ``(logits, feature)``.
    variables: ``{'params', 'batch_stats'}``.
    images: (N, H, W, 3) normalised images.
    erase_lambda: the threshold factor (``config.erase_lambda``).
    train: False (default): BatchNorm with running statistics; True: with the
      statistics of ``images``, as the objective's clean pass. Pictures use
      False: a picture of a few images would otherwise depend on which
      images share its batch. Outside ``shard_map``, ``train=True`` needs a
      model without a BatchNorm ``axis_name``.

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
  erased, mask = information_restriction(feature, images, erase_lambda)
  # What erase_mask thresholds: the same functions, the same float32 cast.
  wide = feature.astype(jnp.promote_types(feature.dtype, jnp.float32))
  attention = upsample_bilinear_align_corners(attention_map(wide),
                                             images.shape[1:3])
  return {"attention": attention.astype(jnp.float32),
          "mask": mask.astype(jnp.float32),
          "erased": erased.astype(jnp.float32)}
