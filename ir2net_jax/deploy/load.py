"""A packed model file (``export.export_packed``) back as a function:
images in, logits out.

  model = ir2net_jax.load_packed("runs/digits/model.packed")
  logits = model(images)          # (B, S, S, 3) float -> (B, classes)

The binary convolutions run on their packed weights, on the native kernel
where it is built and the program runs on a CPU, else on the pure-JAX path
(``packed.CONVOLUTIONS``); the layers kept in float run as in training.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from ir2net_jax.configs.record import config_from_record
from ir2net_jax.deploy import bits, export, packed
from ir2net_jax.deploy import fold as folding
from ir2net_jax.storage import paths
from ir2net_jax.train import step

__all__ = ["PackedModel", "decode", "load_packed", "read_config_record"]

Path = Tuple[str, ...]


@dataclasses.dataclass
class PackedModel:
  """A model whose binary convolutions run on bits.

  Attributes:
    config: the run's config (model, stage, image size, data set); None
      for a model of your own.
    model: the Flax model ``config`` builds (or the one given to
      ``load_packed``).
    variables: ``{'params', 'batch_stats'}`` without the binary
      convolutions' kernels, in float32.
    kernels: ``{module path: bits.PackedKernel}``.
    folds: ``{module path: fold.FoldedBatchNorm}``, the BatchNorms folded
      into those convolutions.
    class_names: each label's name.
    how: how the packed convolutions are computed (``packed.CONVOLUTIONS``).
    step: the training step it was exported from (None: converted weights).
    source: the checkpoint it was exported from.
    float_dtype: what the file stored the float layers in.
  """
  config: Any
  model: Any
  variables: Dict[str, Any]
  kernels: Dict[Path, bits.PackedKernel]
  folds: Dict[Path, folding.FoldedBatchNorm]
  class_names: List[str]
  image_size: int
  how: str = "auto"
  step: Optional[int] = None
  source: str = ""
  float_dtype: str = "float32"

  def __post_init__(self):
    self._jitted = jax.jit(self.apply)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def state(self) -> Tuple[Any, ...]:
    """``(variables, kernels, folds)``: what ``apply`` takes."""
    return self.variables, self.kernels, self.folds

  def apply(self, state, images: jax.Array) -> jax.Array:
    """``images`` (B, S, S, 3) -> float32 logits (B, classes), given
    ``state``; pure and jittable."""
    variables, kernels, folds = state
    logits = packed.apply_packed(self.model, variables, kernels, images,
                                 self.how, folds)[0]
    return logits.astype(jnp.float32)

  def __call__(self, images) -> jax.Array:
    """``images`` (B, S, S, 3), prepared as the eval recipe prepares them
    -> float32 logits (B, classes)."""
    return self._jitted(self.state, jnp.asarray(images))


def _nonzero_of_dense(channels: int, kernel_size: int,
                      out_channels: int) -> jax.Array:
  """The nonzero plane of a kernel without zeros: every channel's bit."""
  word = bits.pack(jnp.ones((channels,))).nonzero           # (words,)
  column = jnp.tile(word, kernel_size * kernel_size)        # (k * k * words,)
  return jnp.broadcast_to(column[:, None], (column.shape[0], out_channels))


def _kernel(record: Dict[str, Any]) -> bits.PackedKernel:
  negative = jnp.asarray(record["negative"], jnp.uint32)
  channels, size = int(record["channels"]), int(record["kernel_size"])
  dense = "nonzero" not in record
  nonzero = (_nonzero_of_dense(channels, size, negative.shape[-1]) if dense
             else jnp.asarray(record["nonzero"], jnp.uint32))
  return bits.PackedKernel(negative, nonzero, channels, size, dense)


def _document(data: bytes, source: str) -> Dict[str, Any]:
  """A packed file's content, its format and version checked."""
  try:
    document = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types on garbage
    raise packed.PackError(f"{source} is not a packed model "
                           f"({type(e).__name__}); write one with "
                           "ir2net-export") from None
  if not isinstance(document, dict) or document.get(
      "format") != export.FORMAT:
    raise packed.PackError(f"{source} is not a packed model; write one "
                           "with ir2net-export")
  if document.get("version") != export.VERSION:
    raise packed.PackError(
        f"{source} is a packed model of version {document.get('version')}; "
        f"this package reads version {export.VERSION}: export it again")
  return document


def read_config_record(path: str) -> Dict[str, Any]:
  """The config a packed model file records, as ``config.json`` holds it.

  Raises:
    FileNotFoundError, packed.PackError: no packed model at ``path``.
  """
  return _document(paths.read_bytes(path), path)["config"]


def _fold(record: Dict[str, Any]) -> folding.FoldedBatchNorm:
  vector = lambda name: jnp.asarray(record[name], jnp.float32)
  return folding.FoldedBatchNorm(vector("mean"), vector("scale"),
                                 vector("bias"),
                                 tuple(record["batch_norm"].split("/")))


def decode(data: bytes, how: str = "auto", source: str = "the file",
           model=None) -> PackedModel:
  """A ``PackedModel`` from a packed file's bytes (``load_packed``).

  Raises:
    packed.PackError: ``data`` is not a packed model of a version this
      package reads, or one of your own model without ``model``.
  """
  document = _document(data, source)
  packed.convolution(how)   # an unknown `how` before anything is built
  config = (None if document["config"] is None
            else config_from_record(document["config"], source))
  num_classes = int(document["num_classes"])
  if model is None:
    if config is None:
      raise packed.PackError(
          f"{source} holds a model of your own (no recorded config): pass "
          "model=, the Flax module it was exported from")
    model = step.build_model(config, num_classes)
  variables = jax.tree.map(jnp.asarray, export.cast_floats(
      document["variables"], np.float32))
  kernels = {tuple(name.split("/")): _kernel(record)
             for name, record in document["kernels"].items()}
  folds = {tuple(name.split("/")): _fold(record["fold"])
           for name, record in document["kernels"].items()
           if "fold" in record}
  step_ = int(document["step"])
  return PackedModel(config, model, variables, kernels, folds,
                     list(document["class_names"]),
                     int(document["image_size"]), how,
                     None if step_ < 0 else step_, document["source"],
                     document["float_dtype"])


def load_packed(path: str, how: str = "auto", model=None) -> PackedModel:
  """Reads a packed model file (local or in a bucket).

  Args:
    path: what ``ir2net-export`` (or ``export.encode``) wrote.
    how: how binary convolutions are computed: ``'auto'`` (the native
      kernel on CPUs where it is built, else pure JAX), ``'native'`` or
      ``'jax'``.
    model: the Flax module, for a model of your own (a file written by
      ``export.encode`` without a config); None builds the run's model.

  Returns:
    A ``PackedModel``: call it on images for logits.

  Raises:
    FileNotFoundError: no file there.
    packed.PackError: not a packed model this package reads.
  """
  return decode(paths.read_bytes(path), how, path, model)
