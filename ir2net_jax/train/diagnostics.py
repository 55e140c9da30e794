"""The BNN diagnostics of one train step (``config.diagnostics``), from what
the binary convolutions sowed (``ir2net_jax.nn.diagnostics`` says what each
value means).
"""

from typing import Any, Dict, Optional

import flax
import jax
import jax.numpy as jnp
from jax import lax

from ir2net_jax.nn import binarize, diagnostics

__all__ = ["step_metrics"]


def step_metrics(sown: Any, params_before: Any, params_after: Any,
                 mask: Optional[jax.Array], axis_name: str,
                 zero_to_one: bool = False) -> Dict[str, jax.Array]:
  """The diagnostics of one step, replicated over ``axis_name``.

  Call inside the per-device step (``shard_map``).

  Args:
    sown: the ``'diagnostics'`` collection of the clean pass.
    params_before, params_after: the parameters the step started from and
      the ones it returns (replicated).
    mask: (B_local, H, W) the device's erase mask, or None (no restriction).
    axis_name: the data-parallel axis.
    zero_to_one: the models' ``sign(0)`` convention.

  Returns:
    ``{'diag/<name>/<layer>': (), 'diag/<name>/mean': (),
    'kept_pixels_per_image': (B_global,)}`` (the last only with a mask).
  """
  flat_before = flax.traverse_util.flatten_dict(params_before, sep="/")
  flat_after = flax.traverse_util.flatten_dict(params_after, sep="/")
  per_name: Dict[str, Dict[str, jax.Array]] = {}
  for key, values in flax.traverse_util.flatten_dict(sown, sep="/").items():
    layer, name = key.rsplit("/", 1)
    value = jnp.mean(jnp.stack(values))  # one entry per call (one here)
    if name == "act_in_clip":  # of this device's batch shard
      value = lax.pmean(value, axis_name)
    per_name.setdefault(name, {})[layer] = value
    if name == diagnostics.WEIGHT_STATS:
      w0, w1 = flat_before[f"{layer}/kernel"], flat_after[f"{layer}/kernel"]
      per_name.setdefault("flip_ratio", {})[layer] = diagnostics.fraction(
          binarize.sign(w0, zero_to_one) != binarize.sign(w1, zero_to_one))
  metrics = {}
  for name, layers in sorted(per_name.items()):
    for layer, value in sorted(layers.items()):
      metrics[f"diag/{name}/{layer}"] = value
    metrics[f"diag/{name}/mean"] = jnp.mean(jnp.stack(list(layers.values())))
  if mask is not None:
    metrics[diagnostics.KEPT_PIXELS] = _gather(
        jnp.mean(mask.astype(jnp.float32), axis=(1, 2)), axis_name)
  return metrics


def _gather(x: jax.Array, axis_name: str) -> jax.Array:
  """(n,) per device -> (n * devices,) in device order, the same on every
  device. ``lax.all_gather``'s result counts as device-varying, which a
  replicated output may not be; a sum of zeros but one slice is exact."""
  devices = lax.psum(1, axis_name)
  out = jnp.zeros((devices * x.shape[0],), x.dtype)
  out = lax.dynamic_update_slice(out, x, (lax.axis_index(axis_name)
                                          * x.shape[0],))
  return lax.psum(out, axis_name)
