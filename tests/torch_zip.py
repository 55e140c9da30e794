"""Writes files in ``torch.save``'s zip format without torch (for the tests).

``save(obj, path)`` writes what ``torch.save(obj, path)`` would for ``obj``
made of dicts, lists, tuples, plain values and ``Tensor`` objects (numpy arrays
standing in for torch tensors): a zip of ``<name>/data.pkl`` (pickle
protocol 2, tensors as ``torch._utils._rebuild_tensor_v2`` of a persistent
``('storage', torch.<Type>Storage, key, location, numel)``), one
``<name>/data/<key>`` record per storage, and the ``byteorder``, ``version``,
``.format_version``, ``.storage_alignment`` and ``.data/serialization_id``
records, as in ``tests/fixtures/tiny_resnet20.pth`` (written by torch).
"""

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

_STORAGES = {
    np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class Tensor:
  """A tensor to save: ``value`` (numpy), on device ``location``; a
  ``transposed`` 2-D tensor is saved as a strided view (non-contiguous).

  ``view`` writes ``value`` as a raw storage and the tensor as the given
  ``(offset, shape, stride)`` of it, unchecked, and ``numel`` the storage's
  claimed size (default: its real one): how hostile files are made.
  """

  def __init__(self, value, location: str = "cpu", transposed: bool = False,
               view=None, numel=None):
    self.value = np.asarray(value)
    self.location = location
    self.transposed = transposed
    self.view, self.numel = view, numel


class _Global:
  """A reference to ``module.name``, pickled as a GLOBAL opcode."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's save_reduce wants a callable
    raise NotImplementedError(f"{self.module}.{self.name}")


class _Storage:
  def __init__(self, key: str, data: np.ndarray, location: str, numel: int):
    self.key, self.data, self.location, self.numel = key, data, location, numel


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pickles ``Tensor`` objects the way torch does, with persistent storages."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages = []
    self._rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
    self._kinds = {}  # dtype -> the torch.<Type>Storage reference

  def _save_global_ref(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  def _save_tensor(self, t):
    value = t.value
    if t.view is not None:
      data = value.reshape(-1)
      offset, shape, stride = t.view
    elif t.transposed:
      # Storage holds value.T contiguous; the tensor views it transposed.
      data = np.ascontiguousarray(value.T).reshape(-1)
      offset, shape, stride = 0, tuple(value.shape), (1, value.shape[0])
    else:
      data = np.ascontiguousarray(value).reshape(-1)
      offset, shape = 0, tuple(value.shape)
      stride = tuple(int(np.prod(value.shape[i + 1:]))
                     for i in range(value.ndim))
    storage = _Storage(str(len(self.storages)), data, t.location,
                       data.size if t.numel is None else t.numel)
    self.storages.append(storage)
    self.save_reduce(self._rebuild, (storage, offset, shape, stride,
                                     False, collections.OrderedDict()),
                     obj=t)

  dispatch[_Global] = _save_global_ref
  dispatch[Tensor] = _save_tensor

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      kind = self._kinds.setdefault(
          obj.data.dtype, _Global("torch", _STORAGES[obj.data.dtype]))
      return ("storage", kind, obj.key, obj.location, obj.numel)
    return None


def save(obj: Any, path: str) -> None:
  """Writes ``obj`` to ``path`` as ``torch.save`` would (zip format)."""
  buf = io.BytesIO()
  pickler = _Pickler(buf)
  pickler.dump(obj)
  root = os.path.splitext(os.path.basename(path))[0].replace(".", "_")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{root}/data.pkl", buf.getvalue())
    z.writestr(f"{root}/.format_version", b"1")
    z.writestr(f"{root}/.storage_alignment", b"64")
    z.writestr(f"{root}/byteorder", b"little")
    for s in pickler.storages:
      z.writestr(f"{root}/data/{s.key}", s.data.astype(
          s.data.dtype.newbyteorder("<")).tobytes())
    z.writestr(f"{root}/version", b"3\n")
    z.writestr(f"{root}/.data/serialization_id", b"0" * 40)
