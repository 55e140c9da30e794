"""A packed model as a ``jax.export`` artifact, which runs with jax alone.

  data = stablehlo.serialize(ir2net_jax.load_packed("model.packed"))

and, in a program that has jax but not this package::

  import jax, numpy as np
  exported = jax.export.deserialize(bytearray(open(PATH, "rb").read()))
  logits = exported.call(images)     # (B, S, S, 3) float32, any B

The artifact is the packed inference on the pure-JAX path (XOR and
popcount in StableHLO; the native kernel is this package's, so it is left
out), with the weights inside it as constants, lowered for each of
``platforms``. jax reads artifacts that an older jax wrote for about six
months after it (jax.export's backward-compatibility window; see
docs/deploy.md).
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from ir2net_jax.deploy.load import PackedModel

__all__ = ["PLATFORMS", "serialize"]

PLATFORMS = ("cpu", "cuda", "tpu")


def serialize(model: PackedModel,
              platforms: Sequence[str] = PLATFORMS) -> bytes:
  """``model``'s inference as serialised ``jax.export.Exported`` bytes.

  Args:
    model: a ``load.load_packed`` result.
    platforms: where it may run (``jax.export`` platform names).

  Returns:
    Bytes for ``jax.export.deserialize``: a function of float32 images
    (B, S, S, 3), for any B, to float32 logits (B, classes).
  """
  model = dataclasses.replace(model, how="jax")
  state = model.state
  batch, = jax.export.symbolic_shape("b")
  size = model.image_size
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  exported = jax.export.export(
      jax.jit(lambda x: model.apply(state, x)),
      platforms=tuple(platforms))(images)
  return bytes(exported.serialize())
