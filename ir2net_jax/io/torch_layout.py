"""PyTorch ``state_dict`` <-> Flax variables.

The Flax models name their submodules after the reference's ``state_dict``
keys, so a key is found from a Flax path by a few renames:

==========================  ================================================
Flax                        PyTorch
==========================  ================================================
``layer2_0``                ``layer2.0``
``primary_conv/conv|bn|act``  ``primary_conv.0|1|2`` (same for
                            ``cheap_operation``; CIRec's Sequentials)
``downsample_conv|bn``      IR2Net: ``downsample.1|2`` (0 is the AvgPool);
                            teacher: ``downsample.0|1``
``shortcut_conv|bn``        CIFAR ResNet-18: ``shortcut.0|1``
``kernel``                  ``weight`` (``weights`` in ImageNet HardBinaryConv)
``scale`` / ``bias``        BatchNorm ``weight`` / ``bias``
``mean`` / ``var``          ``running_mean`` / ``running_var``
``negative_slope``          PReLU ``weight``
==========================  ================================================

Layouts: conv OIHW -> HWIO; HardBinaryConv's flat ``(O*I*3*3, 1)`` is a
C-order reshape to OIHW first; Linear ``(out, in)`` -> ``(in, out)``.

``load_state_dict`` reads a ``.pth``/``.pth.tar`` or a ``.npz`` of arrays
keyed by the PyTorch names. A ``.pth`` is read with torch when it is
installed, and otherwise by ``pth.read_torch_zip`` (torch's zip format, no
torch needed, every size, offset and stride checked: see
``ir2net_jax.io.pth``). It may hold a state_dict or a training checkpoint as
the reference saves one (the
released ``model_best.pth.tar``: ``{'state_dict': {'module.<name>': ...},
'epoch', 'best_top1_acc', 'optimizer'}``); the state_dict is taken, and
DataParallel's ``module.`` prefix dropped. ``ir2net-convert``
(``ir2net_jax.tools.convert``) writes the result as an orbax checkpoint.
"""

import os
import re
from typing import Any, Dict, Mapping, Tuple

import flax
import flax.linen as nn
import numpy as np

from ir2net_jax import models as models_lib
from ir2net_jax.io.pth import ConversionError, read_torch_zip

__all__ = ["torch_key", "torch_to_flax", "flax_to_torch", "load_state_dict",
           "ConversionError"]

Variables = Dict[str, Any]

_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("params", "negative_slope"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_SEQUENTIAL = {"conv": "0", "bn": "1", "act": "2"}
_FAMILY_RENAMES = {
    models_lib.IR2Net: {"downsample_conv": "downsample.1",
                        "downsample_bn": "downsample.2"},
    models_lib.TorchvisionResNet: {"downsample_conv": "downsample.0",
                          "downsample_bn": "downsample.1"},
    models_lib.ResNet18: {"shortcut_conv": "shortcut.0",
                          "shortcut_bn": "shortcut.1"},
}
_IGNORED_TORCH_LEAVES = ("num_batches_tracked",)


def _flat_binary(model: nn.Module, path: Tuple[str, ...]) -> bool:
  """ImageNet HardBinaryConv keeps its weights flat, (O*I*kH*kW, 1)."""
  return isinstance(model, models_lib.IR2Net) and "binary_conv" in path


def torch_key(model: nn.Module, collection: str, path: Tuple[str, ...]) -> str:
  """The ``state_dict`` key of the Flax leaf ``variables[collection][path]``."""
  renames = _FAMILY_RENAMES.get(type(model), {})
  parts = []
  for i, name in enumerate(path[:-1]):
    if i > 0 and path[i - 1] in ("primary_conv", "cheap_operation"):
      parts.append(_SEQUENTIAL[name])
    elif name in renames:
      parts.append(renames[name])
    else:
      parts.append(re.sub(r"^(layer\d+)_(\d+)$", r"\1.\2", name))
  leaf = _LEAF[(collection, path[-1])]
  if leaf == "weight" and _flat_binary(model, path):
    leaf = "weights"
  return ".".join(parts + [leaf])


def _to_flax_layout(value: np.ndarray, target_shape: Tuple[int, ...],
                    flat_binary: bool) -> np.ndarray:
  if len(target_shape) == 4:
    kh, kw, i, o = target_shape
    if flat_binary:
      value = value.reshape(o, i, kh, kw)
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)
  elif len(target_shape) == 2 and value.ndim == 2:
    return value.T
  return value


def _to_torch_layout(value: np.ndarray, flat_binary: bool) -> np.ndarray:
  if value.ndim == 4:
    value = value.transpose(3, 2, 0, 1)
    return value.reshape(-1, 1) if flat_binary else value
  if value.ndim == 2:
    return value.T
  return value


def _strip_prefix(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Drops the ``module.`` prefix that ``nn.DataParallel`` saves."""
  keys = list(state_dict)
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def torch_to_flax(state_dict: Mapping[str, Any], model: nn.Module,
                  image_size: int = 224, dtype=None) -> Variables:
  """Converts a PyTorch ``state_dict`` into ``{'params', 'batch_stats'}``.

  Args:
    state_dict: key -> array (numpy or anything ``np.asarray`` takes), with
      or without the ``module.`` prefix.
    model: the Flax model it belongs to (e.g. ``create_model('ir2net_c',
      stage=2)``); only its structure is used.
    image_size: any input size the model accepts (shapes only).
    dtype: cast floating arrays to this dtype (default: keep the input's).

  Returns:
    Variables for ``model.apply``.

  Raises:
    ConversionError: a key is missing, unexpected, or has the wrong shape.
  """
  state = _strip_prefix(state_dict)
  abstract = models_lib.abstract_variables(model, image_size)
  used, out = set(), {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(abstract.get(collection, {}))
    converted = {}
    for path, leaf in flat.items():
      key = torch_key(model, collection, path)
      if key not in state:
        raise ConversionError(
            f"missing key {key!r} in the state_dict (needed for Flax "
            f"{collection}/{'/'.join(path)} of {type(model).__name__})")
      value = np.asarray(state[key])
      if dtype is not None:
        value = value.astype(dtype)
      new = _to_flax_layout(value, leaf.shape, _flat_binary(model, path))
      if new.shape != leaf.shape:
        raise ConversionError(
            f"key {key!r} has shape {tuple(value.shape)}, which does not fit "
            f"Flax {collection}/{'/'.join(path)} of shape {leaf.shape}; is "
            f"this checkpoint for another architecture or variant?")
      converted[path] = new
      used.add(key)
    out[collection] = flax.traverse_util.unflatten_dict(converted)
  unexpected = [k for k in state if k not in used
                and k.rpartition(".")[2] not in _IGNORED_TORCH_LEAVES]
  if unexpected:
    raise ConversionError(
        f"unexpected keys in the state_dict for {type(model).__name__}: "
        f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
  return out


def blocks_per_stage(state_dict: Mapping[str, Any]) -> Tuple[int, ...]:
  """How many residual blocks each stage of a ResNet-style ``state_dict``
  holds, from its ``layer<i>.<j>.`` keys: e.g. ``(1, 1, 1)`` for a
  ``num_blocks=(1, 1, 1)`` ResNet-20; ``()`` where it has none."""
  found: Dict[int, set] = {}
  for key in _strip_prefix(state_dict):
    match = re.match(r"layer(\d+)\.(\d+)\.", key)
    if match:
      found.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
  return tuple(len(found[i]) for i in sorted(found))


def flax_to_torch(variables: Variables, model: nn.Module) -> Dict[str, np.ndarray]:
  """The inverse of ``torch_to_flax``: Flax variables -> a numpy state_dict."""
  out = {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(variables.get(collection, {}))
    for path, value in flat.items():
      out[torch_key(model, collection, path)] = _to_torch_layout(
          np.asarray(value), _flat_binary(model, path))
  return out


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a state_dict from a ``.npz`` or a torch ``.pth``/``.pth.tar``.

  A torch file may hold the state_dict itself or a training checkpoint as
  the reference's trainers save it (the released ``model_best.pth.tar``):
  ``{'state_dict': ..., 'epoch', 'best_top1_acc', 'optimizer', ...}``, whose
  ``state_dict`` is taken and the rest ignored. Keys keep their ``module.``
  prefix (``nn.DataParallel``'s), which ``torch_to_flax`` strips. Without
  torch installed, a ``.pth`` is read by ``pth.read_torch_zip``.

  Raises:
    FileNotFoundError: no file at ``path``.
    ConversionError: the file holds neither a state_dict nor a checkpoint
      dict with one (names what it holds instead).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such checkpoint file: {path}")
  if path.endswith(".npz"):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    obj = read_torch_zip(path)
  else:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  return _state_dict_of(obj, path)


def _is_array(value) -> bool:
  return hasattr(value, "detach") or isinstance(value, np.ndarray)


def _state_dict_of(obj: Any, path: str) -> Dict[str, np.ndarray]:
  """The ``{key: array}`` of a loaded torch file (see ``load_state_dict``)."""
  expected = ("expected a state_dict ({name: tensor}) or a training "
              "checkpoint {'state_dict': {name: tensor}, ...} as torch.save "
              "writes them")
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path} holds a {type(obj).__name__}; {expected}")
  if "state_dict" in obj:
    obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
      raise ConversionError(f"{path}: its 'state_dict' is a "
                            f"{type(obj).__name__}; {expected}")
  elif not obj or not all(_is_array(v) for v in obj.values()):
    kinds = {k: type(v).__name__ for k, v in list(obj.items())[:8]}
    raise ConversionError(f"{path} holds {kinds or 'an empty dict'}, which "
                          f"has no 'state_dict' and is not one; {expected}")
  others = [k for k, v in obj.items() if not _is_array(v)]
  if others:
    raise ConversionError(f"{path}: the state_dict's {others[:5]} are not "
                          f"tensors; {expected}")
  return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v)
          for k, v in obj.items()}
