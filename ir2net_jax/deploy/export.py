"""A trained model as a packed file: its binary convolutions' weights as
bits, everything else as it was (``ir2net-export``; ``load.load_packed``
reads it back).

The file is one msgpack document (``flax.serialization``), readable from a
local path or a bucket:

* ``format``, ``version``: ``'ir2net_jax.packed'``, ``VERSION``;
* ``config``: the run's config as ``config.json`` records it (the model,
  its stage, the eval recipe's image size and data set); null for a model
  of your own, which ``load_packed`` is then given;
* ``image_size``: the input size the model was packed for;
* ``num_classes``, ``class_names``, ``step``, ``source``;
* ``float_dtype``: what the float layers are stored in (``FLOAT_DTYPES``);
* ``variables``: ``params`` and ``batch_stats`` without the binary
  convolutions' kernels, in ``float_dtype`` (``bfloat16_head``: the
  modules after the last binary convolution, ``packed.head_modules``, in
  bfloat16, the others in float32);
* ``kernels``: per binary convolution (its module path joined by ``/``),
  ``negative`` (uint32 (k * k * words, Cout), bit set where the weight's
  sign is -1), ``nonzero`` only where some weight is exactly 0 (else every
  channel's bit is set and nothing is stored), ``channels``,
  ``kernel_size``, and ``fold`` where the BatchNorm after it is folded in
  (``mean``, ``scale``, ``bias`` float32, the BatchNorm's module path;
  its own variables are then left out of ``variables``).

The weights of a binary convolution are stored as their signs: 1 bit each
(2 where some weight is exactly 0), which is all the forward pass reads.
"""

import dataclasses
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import serialization, traverse_util

from ir2net_jax.data.shared import sources
from ir2net_jax.data.shared.specs import DataError
from ir2net_jax.deploy import bits, packed
from ir2net_jax.deploy import fold as folding
from ir2net_jax.storage import paths
from ir2net_jax.train import evaluate, resume

__all__ = ["FLOAT_DTYPES", "FORMAT", "VERSION", "Exported", "document",
           "cast_floats", "encode", "encode_checkpoint", "export_packed",
           "float32_bytes"]

FORMAT = "ir2net_jax.packed"
VERSION = 1
# float32: exact. bfloat16: every float layer rounded, which moves some
# binary activations' signs. bfloat16_head: only the layers no binary
# convolution depends on (the head: CIRec's fusion, the classifier), so every
# binary convolution's sums stay exact and only the logits are rounded.
FLOAT_DTYPES = ("float32", "bfloat16", "bfloat16_head")


@dataclasses.dataclass(frozen=True)
class Exported:
  """What ``export_packed`` wrote.

  Attributes:
    output: the file.
    bytes: its size.
    float32_bytes: the model's variables as float32 (``float32_bytes``).
    binary_convolutions: how many convolutions were packed.
    step: the checkpoint's step (None for converted weights).
    float_dtype: what the float layers were stored in (``FLOAT_DTYPES``).
  """
  output: str
  bytes: int
  float32_bytes: int
  binary_convolutions: int
  step: Optional[int]
  float_dtype: str = "float32"

  @property
  def ratio(self) -> float:
    return self.float32_bytes / self.bytes

  def line(self) -> str:
    """One line for the console."""
    return (f"{self.output}: {self.bytes / 2**20:.2f} MiB, "
            f"{self.binary_convolutions} binary convolutions as bits, float "
            f"layers in {self.float_dtype}; the float32 model "
            f"{self.float32_bytes / 2**20:.2f} MiB ({self.ratio:.1f}x "
            "smaller)")


def cast_floats(tree, dtype):
  """``tree`` as numpy arrays, its floating ones in ``dtype``."""
  return jax.tree.map(
      lambda v: np.asarray(v).astype(dtype)
      if jnp.issubdtype(np.asarray(v).dtype, jnp.floating) else np.asarray(v),
      tree)


def _cast_kept(kept, float_dtype: str, head) -> Dict[str, Any]:
  """``kept`` (variables) in ``float_dtype``; for ``bfloat16_head``, the
  variables of the modules in ``head`` in bfloat16, the others float32."""
  if float_dtype != "bfloat16_head":
    return cast_floats(kept, jnp.dtype(float_dtype))
  flat = traverse_util.flatten_dict(kept)
  return traverse_util.unflatten_dict({
      key: cast_floats(value, jnp.bfloat16 if key[1:-1] in head
                       else jnp.float32)
      for key, value in flat.items()})


def float32_bytes(variables) -> int:
  """The size of ``variables`` with every array in float32."""
  return sum(4 * int(np.prod(np.shape(v)))
             for v in jax.tree.leaves(variables))


def _without_packed(variables, kernels, folds) -> Dict[str, Any]:
  """``variables`` less each packed convolution's ``kernel`` and each
  folded BatchNorm's variables, as numpy."""
  flat = traverse_util.flatten_dict(jax.device_get(variables))
  for path in kernels:
    flat.pop(("params", *path, "kernel"))
  for f in folds.values():
    for collection, names in (("params", ("scale", "bias")),
                              ("batch_stats", ("mean", "var"))):
      for name in names:
        flat.pop((collection, *f.batch_norm, name))
  return traverse_util.unflatten_dict(flat)


def _kernel_record(kernel: bits.PackedKernel,
                   folded: Optional[folding.FoldedBatchNorm]
                   ) -> Dict[str, Any]:
  record = {"negative": np.asarray(kernel.negative),
            "channels": kernel.channels, "kernel_size": kernel.kernel_size}
  if not kernel.dense:
    record["nonzero"] = np.asarray(kernel.nonzero)
  if folded is not None:
    record["fold"] = {"mean": np.asarray(folded.mean),
                      "scale": np.asarray(folded.scale),
                      "bias": np.asarray(folded.bias),
                      "batch_norm": "/".join(folded.batch_norm)}
  return record


def encode(config, model, variables, *, num_classes: int,
           image_size: Optional[int] = None, float_dtype: str = "float32",
           class_names=None, step: Optional[int] = None,
           source: str = "", fold: bool = True) -> bytes:
  """The packed file's bytes for ``model`` with ``variables``
  (``document``'s, serialised)."""
  return serialization.msgpack_serialize(document(
      config, model, variables, num_classes=num_classes,
      image_size=image_size, float_dtype=float_dtype,
      class_names=class_names, step=step, source=source, fold=fold))


def document(config, model, variables, *, num_classes: int,
             image_size: Optional[int] = None, float_dtype: str = "float32",
             class_names=None, step: Optional[int] = None,
             source: str = "", fold: bool = True) -> Dict[str, Any]:
  """The packed file's content for ``model`` with ``variables``.

  Args:
    config: the run's config (recorded in the file), or None for a model
      of your own (``load.load_packed`` then needs the model).
    model: the model ``config`` builds (``train.step.build_model``), or any
      Flax model whose binary convolutions are ``layers.BinaryConv``.
    variables: ``{'params', 'batch_stats'}`` of stage-2 (binary-weight)
      training.
    num_classes: its classifier outputs.
    image_size: the input size it takes (default: ``config.image_size``).
    float_dtype: one of ``FLOAT_DTYPES``, for the layers kept in float.
    class_names: label names (default: numbers).
    step, source: where the variables came from (recorded).
    fold: fold the BatchNorm after each binary convolution into it
      (``fold.fold_batch_norms``; kept in float32).

  Raises:
    packed.PackError: the model has no binary convolution with binary
      weights (ImageNet stage 1), ``float_dtype`` is unknown, or neither a
      config nor an image size is given.
  """
  if float_dtype not in FLOAT_DTYPES:
    raise packed.PackError(f"float_dtype={float_dtype!r}: one of "
                           f"{FLOAT_DTYPES}")
  if image_size is None:
    if config is None:
      raise packed.PackError("pass image_size= for a model without a config")
    image_size = config.image_size
  kernels = packed.pack_kernels(model, variables, image_size)
  folds = (folding.fold_batch_norms(model, variables, image_size) if fold
           else {})
  head = (packed.head_modules(model, variables, image_size)
          if float_dtype == "bfloat16_head" else set())
  kept = _cast_kept(_without_packed(variables, kernels, folds), float_dtype,
                    head)
  return {
      "format": FORMAT, "version": VERSION,
      "config": None if config is None else resume.as_recorded(config),
      "image_size": int(image_size),
      "num_classes": num_classes, "float_dtype": float_dtype,
      "class_names": list(class_names or map(str, range(num_classes))),
      "step": -1 if step is None else int(step), "source": source,
      "variables": kept,
      "kernels": {"/".join(p): _kernel_record(k, folds.get(p))
                  for p, k in kernels.items()},
  }


def _class_names(config, num_classes: int):
  try:
    return sources.class_names(config, num_classes)
  except DataError as e:
    logging.warning("class names left as numbers: %s", e)
    return None


def _read(checkpoint: str, config, float_dtype: str):
  """``(document, loaded variables)`` of ``checkpoint``'s model."""
  config = evaluate.config_for(config, checkpoint)
  if config.model.startswith("ir2net") and config.stage != 2:
    raise packed.PackError(
        f"{config.model} stage {config.stage} has real-valued weights in "
        "its binary convolutions: export the stage-2 run")
  model, loaded = evaluate.load_run(config, checkpoint)
  num_classes = model.num_classes
  content = document(config, model, loaded.variables,
                     num_classes=num_classes, float_dtype=float_dtype,
                     class_names=_class_names(config, num_classes),
                     step=loaded.step, source=loaded.path)
  return content, loaded


def encode_checkpoint(checkpoint: str, config=None,
                      float_dtype: str = "float32") -> bytes:
  """The packed file's bytes for ``checkpoint`` (``export_packed`` without
  the writing)."""
  return serialization.msgpack_serialize(
      _read(checkpoint, config, float_dtype)[0])


def export_packed(checkpoint: str, output: str, config=None,
                  float_dtype: str = "float32") -> Exported:
  """Writes ``checkpoint``'s model as a packed file (``load_packed`` reads
  it).

  Args:
    checkpoint: a workdir, ``workdir/best`` or converted weights.
    output: the file to write (local or a bucket); replaced whole.
    config: the run's config; None reads the one the workdir recorded.
    float_dtype: one of ``FLOAT_DTYPES``: the layers that stay in float.

  Returns:
    What was written, with the sizes.

  Raises:
    ConfigError: no config given and none recorded (evaluate.config_for).
    CheckpointError: no checkpoint there, or one that does not fit.
    packed.PackError: a model with nothing to pack (ImageNet stage 1).
  """
  content, loaded = _read(checkpoint, config, float_dtype)
  data = serialization.msgpack_serialize(content)
  paths.write_atomic(output, data)
  return Exported(paths.resolve(output), len(data),
                  float32_bytes(loaded.variables), len(content["kernels"]),
                  loaded.step, float_dtype)
