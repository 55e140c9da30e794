"""Whether float32 rounding can decide the sign of a binary activation.

Every binary activation computes ``sign(x)``. Two float32 implementations of
the same network (the reference's PyTorch kernels and the port's XLA:CPU
kernels, which differ from one CPU to the next) round ``x`` differently, so
where ``|x|`` is within that rounding of zero the two can disagree on its
sign, and everything downstream of the flip differs completely. That is why
the students' float32 program is compared with the reference layer by layer
(``parity_layers.py``) and whole networks only in float64
(both in ``test_parity.py``). Tests that compare two float32 runs of the port on
inputs they make themselves use ``clears_rounding`` to assert that no input
to a binary activation lies within this bound of zero:

    threshold(layer) = C * u * sqrt(K) * max|x|

* ``u = 2**-24``, float32's unit roundoff;
* ``K`` is the layer's fan-in: the binary convolution's ``3 * 3 * C_in`` sums
  (the sums that made ``x`` in the layer before have at most this many
  terms, and inherit the rounding of their inputs at the same relative size);
* ``max|x|`` is the largest value in the layer: the residual stream's
  magnitude sets the absolute rounding of all its values, small ones
  included;
* ``C = 4``. The port's float32 errors against its own float64 run, measured
  on every layer of the CIFAR ResNet-20 and IR2Net-A stage-2 fixtures (up to
  the first sign flip), are at most ``11 u max|x|``; two float32
  implementations differ by at most twice that, and ``4 sqrt(K) >= 48``
  for the smallest fan-in here (K = 144).

``K`` and ``max|x|`` come from a float64 run, so the answer does not depend
on the CPU.
"""

import dataclasses
from typing import List

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ir2net_jax.nn import layers

UNIT_ROUNDOFF_F32 = 2.0 ** -24
SAFETY = 4.0


@dataclasses.dataclass(frozen=True)
class Layer:
  """One binary activation's input ``x``: its fan-in, largest and smallest
  magnitudes."""
  fan_in: int
  max_abs: float
  min_abs: float

  @property
  def threshold(self) -> float:
    return SAFETY * UNIT_ROUNDOFF_F32 * np.sqrt(self.fan_in) * self.max_abs


def activation_inputs(model: nn.Module, variables, images, train: bool
                      ) -> List[Layer]:
  """Fan-in, ``max|x|`` and ``min|x|`` of every binary activation's input.

  Args:
    model: an IR2Net model.
    variables: its ``{'params', 'batch_stats'}``.
    images: (B, H, W, 3) batch.
    train: train mode (batch statistics) or eval mode.

  Returns:
    One ``Layer`` per ``BinaryConv`` call, in call order.
  """

  fan_ins = []  # static: filled while tracing

  def run(variables, images):
    maxima = []

    def intercept(next_fun, args, kwargs, context):
      if (isinstance(context.module, layers.BinaryConv)
          and context.method_name == "__call__"):
        x = args[0]
        fan_ins.append(x.shape[-1] * context.module.kernel_size ** 2)
        maxima.append((jnp.max(jnp.abs(x)), jnp.min(jnp.abs(x))))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
      if train:
        model.apply(variables, images, train=True, mutable=["batch_stats"])
      else:
        model.apply(variables, images, train=False)
    return maxima

  maxima = jax.jit(run)(variables, images)
  return [Layer(k, float(hi), float(lo))
          for k, (hi, lo) in zip(fan_ins, maxima)]


def clears_rounding(layers_of_pass: List[Layer]) -> bool:
  """Whether every layer's own smallest ``|x|`` clears its float32 rounding
  (for inputs a test makes itself, measured in float64)."""
  return all(l.min_abs > l.threshold for l in layers_of_pass)
