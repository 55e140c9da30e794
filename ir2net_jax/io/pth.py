"""Reads ``torch.save`` files (torch's zip format) without torch, safely.

``.pth`` files come from the internet, so everything in them is checked
before it is used:

* the zip: every record must be stored uncompressed (as ``torch.save``
  writes it) and lie inside the file; records may not overlap; every record
  that is read is checked against its CRC-32;
* ``data.pkl``: only dicts, lists, tuples, plain values and tensors; any other
  class is refused, so no code from the file runs. Its opcodes are checked
  first (lengths, memo indices), so a claimed size cannot make the reader
  allocate more than the file holds;
* each storage: its claimed size must fit its record before anything is read;
* each tensor: offset, shape and strides (no negative strides, no more
  elements than its storage, no overflow: Python integers) must stay inside
  its storage before any view of it is made.

Memory stays within about twice the file's size, whatever the file claims:
tensors are views of their storages, as in torch (tied weights stay tied).
Anything that fails is refused with ``ConversionError`` naming the record or
tensor and the reason.
"""

import collections
import io
import os
import pickle
import pickletools
import zipfile
from typing import Any, Dict

import numpy as np

__all__ = ["ConversionError", "read_torch_zip"]


class ConversionError(ValueError):
  """A checkpoint file or state_dict that cannot be used (says why)."""


def _bfloat16():
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return ml_dtypes.bfloat16


# torch's storage classes (torch.save names a tensor's storage by its class,
# e.g. torch.FloatStorage) -> numpy dtypes.
_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32,
    "HalfStorage": np.float16, "BFloat16Storage": _bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_MAX_NDIM = 32
_MAX_DEPTH = 64
_INT64_MAX = (1 << 63) - 1
# Opcodes whose argument is a memo index: the C unpickler grows its memo to
# the index, so an index past the pickle's length could allocate gigabytes.
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


class _Frozen:
  """Attributes set once: a pickle's BUILD opcode cannot change them."""

  __slots__ = ()

  def __init__(self, **attributes):
    for name, value in attributes.items():
      object.__setattr__(self, name, value)

  def __setattr__(self, name, value):
    raise AttributeError(f"{type(self).__name__} is read-only")


class _StorageType(_Frozen):
  """``torch.<Type>Storage`` as found in ``data.pkl``."""

  __slots__ = ("dtype",)

  def __init__(self, name: str):
    dtype = _STORAGES[name]
    super().__init__(dtype=np.dtype(dtype() if dtype is _bfloat16 else dtype))


class _Storage(_Frozen):
  """One ``data/<key>`` record, read as a 1-D array."""

  __slots__ = ("key", "array")

  def __init__(self, key: str, array: np.ndarray):
    super().__init__(key=key, array=array)


class _TensorSpec(_Frozen):
  """The arguments of ``torch._utils._rebuild_tensor_v2``, checked later,
  when the tensor's name is known."""

  __slots__ = ("args",)

  def __init__(self, *args):
    super().__init__(args=args)


def _rebuild_parameter(data, *unused):
  """``torch._utils._rebuild_parameter``: a Parameter is its data."""
  del unused
  return data


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _tensor(spec: _TensorSpec, name: str) -> np.ndarray:
  """The tensor ``spec`` describes: a view of its storage, once its extent is
  proven to lie inside the storage."""
  def refuse(reason):
    raise ConversionError(f"{name}: {reason}; the file is damaged or was "
                          "crafted, refusing to read it")
  if len(spec.args) < 4:
    refuse(f"_rebuild_tensor_v2 has {len(spec.args)} arguments, not >= 4")
  storage, offset, shape, stride = spec.args[:4]
  if not isinstance(storage, _Storage):
    refuse(f"its storage is a {type(storage).__name__}, not a storage record")
  n = storage.array.size
  where = f"storage data/{storage.key} of {n} {storage.array.dtype} elements"
  if not (isinstance(shape, tuple) and isinstance(stride, tuple)
          and all(_is_int(v) for v in shape + stride) and _is_int(offset)):
    refuse(f"offset {offset!r}, shape {shape!r} and stride {stride!r} must "
           "be an integer and tuples of integers")
  if len(shape) != len(stride) or len(shape) > _MAX_NDIM:
    refuse(f"shape {shape} and stride {stride} must have the same length, "
           f"at most {_MAX_NDIM}")
  if offset < 0 or any(v < 0 for v in shape + stride):
    refuse(f"offset {offset}, shape {shape} or stride {stride} is negative")
  if max((offset,) + shape + stride) > _INT64_MAX:
    refuse(f"offset {offset}, shape {shape} or stride {stride} is past "
           "torch's int64 range")
  numel = 1
  for size in shape:
    numel *= size
  if numel == 0:
    if offset > n:
      refuse(f"offset {offset} lies past the end of {where}")
    try:
      return np.zeros(shape, storage.array.dtype)
    except ValueError as e:
      refuse(f"shape {shape}: {e}")
  last = offset + sum((size - 1) * step for size, step in zip(shape, stride))
  if last >= n:
    refuse(f"shape {shape} with stride {stride} from offset {offset} reaches "
           f"element {last} of {where}")
  if numel > n:
    refuse(f"shape {shape} views {numel} elements of {where} (overlapping "
           "strides)")
  item = storage.array.dtype.itemsize
  # A size-1 axis's stride moves nothing (and may be too large for numpy).
  return np.lib.stride_tricks.as_strided(
      storage.array[offset:], shape=shape,
      strides=tuple(step * item if size > 1 else 0
                    for size, step in zip(shape, stride)))


class _Unpickler(pickle.Unpickler):
  """Unpickles ``data.pkl``: only tensors, dicts and plain values."""

  _CLASSES = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _TensorSpec,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }

  def __init__(self, data: bytes, read_storage):
    super().__init__(io.BytesIO(data))
    self._read_storage = read_storage

  def find_class(self, module, name):
    if (module, name) in self._CLASSES:
      return self._CLASSES[(module, name)]
    if module == "torch" and name in _STORAGES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"{module}.{name} is not allowed in a state_dict read without torch; "
        "install torch to read this file, or save its state_dict as .npz")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and _is_int(pid[4]) and pid[4] >= 0):
      raise pickle.UnpicklingError(
          f"persistent id {pid!r:.200} is not ('storage', torch.<Type>Storage,"
          " key, location, numel)")
    return self._read_storage(pid[2], pid[1].dtype, pid[4])


class _Archive:
  """The records of a torch zip, each read at most once, within the file."""

  def __init__(self, path: str, z: zipfile.ZipFile):
    self.path, self._z = path, z
    self._size = os.path.getsize(path)
    self._left = self._size  # bytes that the records not yet read may use
    infos = z.infolist()
    self._infos = {i.filename: i for i in infos}
    if len(self._infos) != len(infos):
      raise ConversionError(f"{path}: two records have the same name")
    pkl = [n for n in self._infos if n.endswith("data.pkl")
           and n.count("/") == 1]
    if len(pkl) != 1:
      raise ConversionError(f"{path} holds {len(pkl)} <name>/data.pkl "
                            "records, not one: not a torch checkpoint")
    self.root = pkl[0][:-len("data.pkl")]
    self._storages: Dict[str, _Storage] = {}

  def has(self, name: str) -> bool:
    return self.root + name in self._infos

  def read(self, name: str, min_size: int = 0) -> bytes:
    """Record ``<root>/name``, whole, after checking its claimed size."""
    info = self._infos.get(self.root + name)
    if info is None:
      raise ConversionError(f"{self.path}: record {name} is missing")
    if info.compress_type != zipfile.ZIP_STORED:
      raise ConversionError(
          f"{self.path}: record {name} is compressed, which torch.save never "
          "does (the file was re-zipped); load and save it with torch again")
    if info.file_size < min_size:
      raise ConversionError(
          f"{self.path}: record {name} holds {info.file_size} bytes, fewer "
          f"than the {min_size} its storage claims")
    if (info.compress_size != info.file_size
        or info.header_offset + info.file_size > self._size
        or info.file_size > self._left):
      raise ConversionError(
          f"{self.path}: record {name} claims {info.file_size} bytes, more "
          "than the file has left for it (overlapping or oversized records)")
    self._left -= info.file_size
    try:
      return self._z.read(info)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"{self.path}: record {name} is damaged "
                            f"({type(e).__name__}: {str(e):.300})") from None

  def storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
    if key not in self._storages:
      data = self.read(f"data/{key}", min_size=numel * dtype.itemsize)
      # Writable, as torch's tensors are; a memoryview slice copies nothing.
      array = np.frombuffer(bytearray(
          memoryview(data)[:numel * dtype.itemsize]), dtype)
      del data
      self._storages[key] = _Storage(key, array)
    storage = self._storages[key]
    if storage.array.dtype != dtype or storage.array.size != numel:
      raise ConversionError(
          f"{self.path}: storage data/{key} is claimed as {numel} {dtype} "
          f"and as {storage.array.size} {storage.array.dtype}")
    return storage


def _check_opcodes(data: bytes, limit: int) -> None:
  """Walks the pickle's opcodes: truncated arguments and out-of-range memo
  indices are refused before the unpickler could allocate for them."""
  for op, arg, _ in pickletools.genops(io.BytesIO(data)):
    if op.name in _MEMO_PUTS and not 0 <= arg < limit:
      raise ValueError(f"memo index {arg} out of range")


def _materialize(obj: Any, path: str) -> Any:
  """``obj`` with tensors made (and checked) and storages as arrays; each
  tensor named by where it sits (``['state_dict']['conv1.weight']``)."""
  done: Dict[int, Any] = {}
  busy = set()

  def walk(x, where, depth):
    if isinstance(x, _TensorSpec):
      return _tensor(x, f"{path}: tensor {where}")
    if isinstance(x, _Storage):
      return x.array
    if isinstance(x, _StorageType):
      raise ConversionError(f"{path}: {where or 'the object'} is a storage "
                            "type, not data")
    if not isinstance(x, (dict, list, tuple)):
      return x
    if id(x) in done:
      return done[id(x)]
    if id(x) in busy or depth > _MAX_DEPTH:
      raise ConversionError(f"{path}: {where or 'the object'} is nested in "
                            "itself or deeper "
                            f"than {_MAX_DEPTH} levels")
    busy.add(id(x))
    if isinstance(x, dict):
      bad = [k for k in x if not isinstance(k, (str, int, float, bool,
                                                  type(None)))]
      if bad:
        raise ConversionError(f"{path}: {where or 'the object'} has a key "
                              "of type "
                              f"{type(bad[0]).__name__}")
      out = {k: walk(v, f"{where}[{k!r}]", depth + 1) for k, v in x.items()}
    else:
      out = type(x)(walk(v, f"{where}[{i}]", depth + 1)
                    for i, v in enumerate(x))
    busy.discard(id(x))
    done[id(x)] = out
    return out

  return walk(obj, "", 0)


def read_torch_zip(path: str) -> Any:
  """Reads what ``torch.save`` wrote (its zip format), without torch.

  Tensors become numpy arrays (views of their storages, as torch's tensors
  are); dicts (``OrderedDict`` too), lists, tuples and plain values stay.

  Args:
    path: a ``.pth`` / ``.pth.tar`` file.

  Returns:
    The saved object, e.g. ``{name: array}`` for a state_dict.

  Raises:
    ConversionError: the file is not a torch zip (e.g. the legacy format of
      torch < 1.6), is damaged, holds objects other than tensors and plain
      values, or describes a tensor outside its storage (says which).
  """
  if not zipfile.is_zipfile(path):
    raise ConversionError(
        f"{path} is not in torch's zip format (torch >= 1.6); install torch "
        "to read it, or re-save it with a current torch")
  try:
    z = zipfile.ZipFile(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"{path} is a damaged zip file "
                          f"({type(e).__name__}: {str(e):.300})") from None
  with z:
    archive = _Archive(path, z)
    if archive.has("byteorder") and archive.read("byteorder") != b"little":
      raise ConversionError(f"{path} was saved on a big-endian machine")
    data = archive.read("data.pkl")
    try:
      _check_opcodes(data, limit=len(data))
      return _materialize(_Unpickler(data, archive.storage).load(), path)
    except ConversionError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(
          f"cannot read {path} without torch: {type(e).__name__}: "
          f"{str(e):.300}") from None
