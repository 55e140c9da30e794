"""When a float32 comparison with the reference can hinge on a sign near-tie.

Every binary activation computes ``sign(x)``. Two float32 implementations of
the same network (the reference's PyTorch kernels and the port's XLA:CPU
kernels, which differ from one CPU to the next) round ``x`` differently, so
where ``|x|`` is within that rounding of zero the two can disagree on its
sign, and everything downstream of the flip differs completely. The fixtures
record ``sign_margin``: the smallest ``|x|`` fed to any binary activation by
the reference's float32 run, for [eval, train pass 1, train pass 2].

A float32 result downstream of binary activations is compared with the
reference only when that recorded margin clears the float32 rounding of every
layer that feeds a binary activation:

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

The pass's threshold is the largest over its layers, and the recorded margin
(a minimum over all layers) must exceed it. ``K`` and ``max|x|`` come from the
port's float64 run, which matches the reference's float64 to about 1e-12 on
any machine, so whether a check runs depends on the fixture alone, never on
the CPU. A float32 check that is gated out is covered twice: by the same check
in float64 against the ``f64/`` arrays, never skipped (there the rounding,
about 1e-16 relative, is eight orders of magnitude below the smallest margin,
about 1e-7), and by ``test_parity_layers.py``, which checks the float32 port
layer by layer against its own float64 run, where no sign flip can cascade.
The feature maps have no ``f64/`` arrays: the port's float64 maps are
compared with the reference's float32 ones where the reference's own float32
pass did not diverge (all but the ImageNet stage-1 training pass).
"""

import dataclasses
from typing import List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ir2net_jax.nn import layers

UNIT_ROUNDOFF_F32 = 2.0 ** -24
SAFETY = 4.0
PASSES = ("eval", "train pass 1", "train pass 2")


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


def gate(recorded_margin: float, layers_of_pass: List[Layer]
         ) -> Tuple[bool, str]:
  """Whether ``recorded_margin`` clears every layer's float32 rounding.

  Returns:
    ``(checkable, explanation)``; the explanation gives both numbers.
  """
  worst = max(layers_of_pass, key=lambda l: l.threshold)
  ok = recorded_margin > worst.threshold
  return ok, (f"recorded sign margin {recorded_margin:.3g} "
              f"{'>' if ok else '<='} float32 rounding threshold "
              f"{worst.threshold:.3g} (K={worst.fan_in}, "
              f"max|x|={worst.max_abs:.3g})")
