"""The one path layer: every file a run reads or writes, local or in a bucket.

A path is a string: a local path, or a URL whose scheme is in
``CLOUD_SCHEMES`` (``gs://bucket/run``, ``s3://bucket/run``). Local paths
are made absolute; URLs are kept as they are, so that no local folder named
``gs:`` is ever made (``resolve`` refuses anything that would make one).
Bucket files go through etils.epath with its fsspec backend (gcsfs, s3fs),
the layer orbax's checkpoints use, and tensorstore for the arrays in them.

Files that must be replaced whole (``summary.json``, an evaluation's
result, a picture) are written under a temporary name and then moved into
place (``write_atomic``); ``config.json`` is created only where there is
none (``write_new``). A reader never sees half a file, on a disk or in a
bucket, and a listing is never cached, so a process sees at once what the
run's other processes wrote.
"""

import logging
import os
import posixpath
import shutil
import uuid
from typing import List, Optional, Union

# Before etils first resolves a gs:// path (it caches the choice): bucket
# paths go through fsspec (gcsfs), which honours STORAGE_EMULATOR_HOST and
# needs no TensorFlow, not through TensorFlow's gfile where TF is installed.
os.environ.setdefault("EPATH_USE_TF", "false")
# Before gcsfs is imported: its zonal-bucket probe asks the Storage Control
# API about every bucket, logging an error where that API is out of reach.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from etils import epath  # noqa: E402  pylint: disable=g-import-not-at-top

from ir2net_jax.configs import ConfigError  # noqa: E402

__all__ = ["CLOUD_SCHEMES", "StorageError", "scheme", "is_cloud", "resolve",
           "as_path", "join", "parent", "name", "exists", "isdir", "listdir",
           "makedirs", "read_text", "read_bytes", "write_atomic", "write_new",
           "copytree", "move", "rmtree", "filesystem", "first_line"]

# Scheme -> (the fsspec module that serves it, how to install it).
CLOUD_SCHEMES = {"gs": ("gcsfs", "pip install gcsfs"),
                 "s3": ("s3fs", "pip install s3fs")}

PathLike = Union[str, os.PathLike]

# gcsfs logs each file's read-ahead cache at INFO, and absl shows INFO.
logging.getLogger("gcsfs").setLevel(logging.WARNING)


def _no_listings_cache() -> None:
  """gcsfs and s3fs cache a folder's listing for ever by default: a
  process would not see what the run's other processes (or orbax's
  tensorstore writes) put there since. A run lists little; it lists
  afresh."""
  try:
    import fsspec.config  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  for protocol in CLOUD_SCHEMES:
    fsspec.config.conf.setdefault(protocol, {}).setdefault(
        "use_listings_cache", False)


_no_listings_cache()


class StorageError(ConfigError):
  """A path or bucket a run cannot use, with what to do instead."""


def first_line(error: Exception) -> str:
  """The first line of an error's message ("" if it has none)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else ""


def scheme(path: PathLike) -> Optional[str]:
  """``'gs'`` or ``'s3'`` for a bucket URL, None for a local path."""
  text = os.fspath(path)
  head, sep, _ = text.partition("://")
  return head if sep and head in CLOUD_SCHEMES else None


def is_cloud(path: PathLike) -> bool:
  return scheme(path) is not None


def resolve(path: PathLike) -> str:
  """A bucket URL as it is (without a trailing ``/``), a local path made
  absolute (``~`` expanded).

  Raises:
    StorageError: a URL of another scheme (``az://``, ``http://``), a
      bucket URL without a bucket, or a local path with a part that begins
      with ``gs:`` or ``s3:`` (``gs:/bucket``: a URL with a slash missing),
      which would make a local folder of that name.
  """
  text = os.fspath(path)
  if not text:
    raise StorageError("an empty path; give a local directory or a "
                       "gs://BUCKET/... URL")
  head, sep, rest = text.partition("://")
  if sep and head in CLOUD_SCHEMES:
    if not rest.strip("/"):
      raise StorageError(f"{text} names no bucket; write "
                         f"{head}://BUCKET/path")
    return f"{head}://{rest.rstrip('/')}"
  if sep and head.isalnum():
    raise StorageError(
        f"{text}: {head}:// paths are not supported; use a local path or "
        f"one of {', '.join(s + '://' for s in CLOUD_SCHEMES)} (or mount the "
        f"storage, e.g. with gcsfuse, and give the mount's local path)")
  for part in text.split(os.sep):
    if part.partition(":")[0] in CLOUD_SCHEMES and ":" in part:
      raise StorageError(
          f"{text} would make a local folder named {part!r}; for a bucket "
          f"write {part.partition(':')[0]}://BUCKET/path (two slashes)")
  return os.path.abspath(os.path.expanduser(text))


def as_path(path: PathLike) -> epath.Path:
  """``path`` (resolved) as an ``etils.epath.Path``, as orbax takes it."""
  return epath.Path(resolve(path))


def join(base: PathLike, *parts: str) -> str:
  base = os.fspath(base)
  return (posixpath.join(base, *parts) if is_cloud(base)
          else os.path.join(base, *parts))


def parent(path: PathLike) -> str:
  """The directory that holds ``path`` (resolved)."""
  path = resolve(path)
  if is_cloud(path):
    head, _, rest = path.partition("://")
    up = posixpath.dirname(rest)
    return f"{head}://{up}" if up else path
  return os.path.dirname(path)


def name(path: PathLike) -> str:
  return posixpath.basename(resolve(path).rstrip("/"))


def filesystem(path: PathLike):
  """The fsspec file system of a bucket URL, as etils.epath uses it."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  return backend.fsspec_backend.fs(resolve(path))


def _info(path: str) -> Optional[dict]:
  """A bucket object's or folder's details, None if there is none. An
  error of the server or the network is raised, not taken for "none"
  (fsspec's ``exists`` and ``isdir`` would: a resume must not start
  afresh because a listing failed)."""
  try:
    return filesystem(path).info(path)
  except FileNotFoundError:
    return None


def exists(path: PathLike) -> bool:
  path = resolve(path)
  if is_cloud(path):
    return _info(path) is not None
  return os.path.exists(path)


def isdir(path: PathLike) -> bool:
  """Whether ``path`` is a directory; in a bucket, whether any object's
  name begins with ``path/``."""
  path = resolve(path)
  if is_cloud(path):
    info = _info(path)
    return info is not None and info["type"] == "directory"
  return os.path.isdir(path)


def listdir(path: PathLike) -> List[str]:
  """The names in a directory (files and folders), sorted; [] if it is
  missing."""
  if not isdir(path):
    return []
  return sorted(p.name for p in as_path(path).iterdir())


def makedirs(path: PathLike) -> None:
  """Makes a local directory and its parents; nothing in a bucket, where
  an object's name makes its folders."""
  if not is_cloud(path):
    os.makedirs(resolve(path), exist_ok=True)


def read_bytes(path: PathLike) -> bytes:
  """The whole file; from a bucket in one request, so that the bytes are
  of one version of the object even while it is being replaced (a file
  object's ranged reads could mix two)."""
  path = resolve(path)
  if is_cloud(path):
    return filesystem(path).cat_file(path)
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return read_bytes(path).decode()


def _temporary(path: str) -> str:
  return join(parent(path), f".{name(path)}.tmp-{uuid.uuid4().hex[:12]}")


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
  """Writes ``data`` to a temporary file beside ``path``, then moves it
  into place, so that a reader finds the old file or the new one, never
  part of one. Local: ``os.replace``; in a bucket: a copy and a delete of
  the temporary object (a GCS or S3 object appears whole anyway)."""
  path = resolve(path)
  data = data.encode() if isinstance(data, str) else data
  makedirs(parent(path))
  temporary = _temporary(path)
  if is_cloud(path):
    fs = filesystem(path)
    fs.pipe_file(temporary, data)
    try:
      fs.copy(temporary, path)
    finally:
      fs.rm(temporary)
    return
  try:
    with open(temporary, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def write_new(path: PathLike, data: Union[bytes, str]) -> None:
  """``write_atomic`` for a file that must not exist yet.

  Raises:
    FileExistsError: ``path`` exists (checked atomically on a disk and in
      GCS, where the object is created only if there is none; in S3 the
      check comes first).
  """
  path = resolve(path)
  data = data.encode() if isinstance(data, str) else data
  if scheme(path) == "gs":
    filesystem(path).pipe_file(path, data, mode="create")
    return
  if is_cloud(path):
    if exists(path):
      raise FileExistsError(path)
    write_atomic(path, data)
    return
  makedirs(parent(path))
  temporary = _temporary(path)
  try:
    with open(temporary, "wb") as f:
      f.write(data)
    os.link(temporary, path)   # fails if path exists, whole or not at all
  finally:
    os.remove(temporary)


def copytree(source: PathLike, target: PathLike) -> None:
  """Copies a directory (in a bucket: every object under it)."""
  source, target = resolve(source), resolve(target)
  if is_cloud(source) or is_cloud(target):
    if scheme(source) != scheme(target):
      raise StorageError(f"cannot copy {source} to {target}: one file "
                         "system at a time")
    filesystem(source).copy(source + "/", target + "/", recursive=True)
    return
  shutil.copytree(source, target)


def move(source: PathLike, target: PathLike) -> None:
  """Moves a directory or file to ``target`` (its parent is made). Local:
  one rename; in a bucket: a copy, then the source deleted."""
  source, target = resolve(source), resolve(target)
  if is_cloud(source):
    fs = filesystem(source)
    if fs.isdir(source):
      copytree(source, target)
    else:
      fs.copy(source, target)
    fs.rm(source, recursive=True)
    return
  makedirs(parent(target))
  os.replace(source, target)


def rmtree(path: PathLike) -> None:
  path = resolve(path)
  if is_cloud(path):
    filesystem(path).rm(path, recursive=True)
  else:
    shutil.rmtree(path)
