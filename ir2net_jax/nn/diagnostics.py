"""BNN diagnostics, computed inside the train step (``config.diagnostics``).

Per binary convolution (``layers.BinaryConv``, found by module type: each
one ``sow``s into the ``'diagnostics'`` collection, which the train step makes
mutable only when diagnostics are on, so with them off the program is the
one without diagnostics):

* ``act_in_clip``: the fraction of the inputs of the layer's binary
  activation (the values ``sign`` is applied to, in the computation dtype)
  with ``|x| <= c``, ``c = binarize.clipping_range(activation_estimator)``
  (1 for ApproxSign and clipped STE): where the surrogate gradient can be
  nonzero. Over the first ``act_sample_size(B_local)`` examples (one in
  ``ACT_SAMPLE``, at least one) of each device's batch in the *clean* pass
  (the erased pass sees partly zeroed images, a training-only input), then
  ``pmean``-ed over devices: an estimate from 1/8 of the global batch. Estimators without clipping
  (``ste_sign``, ``swish_sign``) pass gradient everywhere; their layers
  report no ``act_in_clip`` (it would always be 1).
* ``latent_gt1``: the fraction of the latent (real) kernel's entries with
  ``|w| > 1``, in the parameters the step starts from (those its forward
  pass binarises). Under clipped STE such weights get no gradient from the
  loss, only weight decay.
* ``flip_ratio``: the fraction of the kernel's entries whose binarised value
  changed in the step, ``binarize.sign(w_after) != binarize.sign(w_before)``
  (``sign(0) = 0`` unless ``zero_to_one``), ``w_after`` the parameters the
  step returns (a step skipped by ``skip_nonfinite_updates`` flips nothing).
  This is larq's ``FlipRatio``: the fraction of changed binary weights from
  one batch to the next, averaged over the logging period (the host averages
  the per-step values of the steps since the last log).

``latent_gt1`` and ``flip_ratio`` exist only for layers whose weights are
binarised (``binary_weights``): in stage 1 of the ImageNet IR2Net models the
weights are real and only ``act_in_clip`` is reported.

``ir2net_jax.train.diagnostics.step_metrics`` turns the sown values into
flat metrics
``diag/<name>/<layer path>`` (the path of module names, ``/``-joined) plus
``diag/<name>/mean``, the unweighted mean over layers, and
``kept_pixels_per_image``: the erase mask's kept fraction of every image of
the global batch, (B,) (the host writes it as a histogram, not a mean).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ir2net_jax.nn import binarize

__all__ = ["COLLECTION", "KEPT_PIXELS", "WEIGHT_STATS", "sow_binary_conv",
           "fraction", "act_sample_size"]

COLLECTION = "diagnostics"
KEPT_PIXELS = "kept_pixels_per_image"
WEIGHT_STATS = "latent_gt1"   # sown only by layers with binary weights


def fraction(condition: jax.Array) -> jax.Array:
  """Fraction of True entries, float32; counted in int32, exact far past
  float32's 2**24 integers."""
  return (jnp.sum(condition, dtype=jnp.int32) / condition.size).astype(
      jnp.float32)


# act_in_clip reads one example in ACT_SAMPLE of each device's batch: a
# full extra read of every binary activation's input cost 3-5% of an
# IR2Net-A step on the CPU, for a statistic that 1/8 of the batch estimates.
ACT_SAMPLE = 8


def act_sample_size(local_batch: int) -> int:
  """How many leading examples of a device's batch ``act_in_clip`` reads:
  ``max(1, local_batch // ACT_SAMPLE)``."""
  return max(1, local_batch // ACT_SAMPLE)


def sow_binary_conv(module: nn.Module, x: jax.Array, kernel: jax.Array,
                    activation_estimator: str, binary_weights: bool) -> None:
  """Sows a binary convolution's diagnostics when the collection is
  mutable; nothing is computed otherwise, nor at ``init`` (which makes
  every collection mutable: the variables stay params and batch_stats).

  Args:
    module: the ``BinaryConv`` (its scope is where the values go).
    x: (B, H, W, Cin) the binary activation's input.
    kernel: (k, k, Cin, Cout) the latent (real) kernel.
    activation_estimator: a name in ``binarize``.
    binary_weights: whether the kernel is binarised.
  """
  if module.is_initializing() or not module.is_mutable_collection(
      COLLECTION):
    return
  c = binarize.clipping_range(activation_estimator)
  if c is not None:
    sample = x[:act_sample_size(x.shape[0])]
    module.sow(COLLECTION, "act_in_clip", fraction(jnp.abs(sample) <= c))
  if binary_weights:
    module.sow(COLLECTION, WEIGHT_STATS, fraction(jnp.abs(kernel) > 1))
