"""The BatchNorm after each binary convolution, folded into its sums.

In evaluation mode ``layers.BatchNorm`` computes, per channel,
``(x - mean) * (rsqrt(var + epsilon) * gamma) + beta``. Where it takes a
binary convolution's output as it is (every IR2Net and CIFAR block:
``bn(binary_conv(x))``), the packed convolution computes that from its
integer sums itself, with ``scale = rsqrt(var + epsilon) * gamma`` computed
once (``fold_batch_norms``), and the BatchNorm passes its input on
(``packed.on_bits``). The native kernel writes the normalised float32
values directly (no int32 pass through memory). The arithmetic is the
BatchNorm's, operation for operation; only ``scale`` is rounded once
instead of at every call, so logits stay within float32 rounding of the
unfolded model's.
"""

from typing import Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from ir2net_jax.deploy import tracing
from ir2net_jax.nn import layers

__all__ = ["FoldedBatchNorm", "fold_batch_norms", "normalise"]

Path = Tuple[str, ...]


@struct.dataclass
class FoldedBatchNorm:
  """A BatchNorm folded into the binary convolution before it.

  Attributes:
    mean, scale, bias: float32 (Cout,): ``(sums - mean) * scale + bias``.
    batch_norm: the BatchNorm's module path (static), which passes its
      input on.
  """
  mean: jax.Array
  scale: jax.Array
  bias: jax.Array
  batch_norm: Path = struct.field(pytree_node=False)


def normalise(sums: jax.Array, fold: FoldedBatchNorm) -> jax.Array:
  """int32 sums (..., Cout) -> float32, as the BatchNorm computes them."""
  return (sums.astype(jnp.float32) - fold.mean) * fold.scale + fold.bias


def _pairs(model: nn.Module, variables, image_size: int
           ) -> Dict[Path, Tuple[Path, float]]:
  """``{binary conv path: (BatchNorm path, epsilon)}`` where the BatchNorm
  takes the convolution's output as it is (traced for shapes only)."""
  outputs, kept, pairs = {}, [], {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    call = context.method_name == "__call__"
    if (call and isinstance(module, layers.BatchNorm) and args
        and id(args[0]) in outputs):
      pairs[outputs[id(args[0])]] = (module.path, module.epsilon)
    out = next_fun(*args, **kwargs)
    if call and isinstance(module, layers.BinaryConv):
      outputs[id(out)] = module.path
      kept.append(out)   # ids stay unique while the trace lives
    return out

  tracing.trace_eval(model, variables, image_size, record)
  return pairs


def fold_batch_norms(model: nn.Module, variables, image_size: int
                     ) -> Dict[Path, FoldedBatchNorm]:
  """The BatchNorm of every binary convolution that one follows directly.

  Args:
    model: a model built of ``layers.BinaryConv`` and ``layers.BatchNorm``.
    variables: ``{'params', 'batch_stats'}``.
    image_size: an input size the model takes (shapes only).

  Returns:
    ``{binary convolution's module path: FoldedBatchNorm}``.
  """
  folds = {}
  for conv, (bn, epsilon) in _pairs(model, variables, image_size).items():
    params, stats = variables["params"], variables["batch_stats"]
    for name in bn:
      params, stats = params[name], stats[name]
    scale = lax.rsqrt(jnp.asarray(stats["var"], jnp.float32) + epsilon) * (
        jnp.asarray(params["scale"], jnp.float32))
    folds[conv] = FoldedBatchNorm(jnp.asarray(stats["mean"], jnp.float32),
                                  scale,
                                  jnp.asarray(params["bias"], jnp.float32),
                                  bn)
  return folds
