"""Refuses paths a run cannot use, before the data are read or anything is
built.

``check_run(config, workdir)`` checks every bucket URL a run will read or
write (the workdir, ``init_from``, the stage-1 run, the teacher, the data),
each within ``TIMEOUT_S`` seconds, and raises ``StorageError`` naming the
URL and the fix: no client installed for the scheme (gcsfs, s3fs), no
credentials, a server that does not answer, a bucket that does not exist,
or a workdir that cannot be written.

A local workdir (``check_local_workdir``) is refused where it is a file or
lies under one, cannot be written (a test file is made and removed in it,
or in its nearest existing folder: the check makes no folder), or lies in
the ``folder:`` data set (its checkpoints would be listed as images);
real paths are compared, so a link cannot hide either.
"""

import errno
import importlib.util
import os
import socket
import tempfile
import threading
import urllib.parse
import uuid
from typing import Callable, List, Tuple

from ir2net_jax.storage import paths
from ir2net_jax.storage.paths import StorageError

__all__ = ["TIMEOUT_S", "check_run", "check", "check_local_workdir",
           "run_urls"]

# The longest a check of one URL may take before the run is refused.
TIMEOUT_S = float(os.environ.get("IR2NET_STORAGE_TIMEOUT_S", "20"))

_GCS_ENDPOINT = "https://storage.googleapis.com"
_CREDENTIALS_FIX = {
    "gs": ("on a Cloud TPU or GCE VM, give the VM's service account access "
           "to the bucket; elsewhere run `gcloud auth application-default "
           "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service "
           "account's key file"),
    "s3": ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
           "with ~/.aws/credentials"),
}


# What a URL holds, as ``check``'s ``holds`` names it: 'files' go through
# fsspec (gcsfs, s3fs); 'checkpoint's through orbax and tensorstore, which
# take gs:// and local paths only (orbax-checkpoint 0.12 makes s3://b/x a
# relative path, 's3:/b/x', and refuses it); 'data' (tfds data_dir) through
# TensorFlow's file systems or array_record's reader, neither with S3.
_S3_REFUSED = {
    "checkpoint": "orbax-checkpoint saves and restores checkpoints in gs:// "
                  "buckets and on local or mounted disks only",
    "data": "the input engines read tfds data from gs:// buckets and local "
            "or mounted disks only (TensorFlow has no S3 file system, nor "
            "has array_record)",
}


_CREATE = {"gs": "gcloud storage buckets create", "s3": "aws s3 mb"}
_WHERE = {"gs": " --location=<the TPUs' region>",
          "s3": " --region=<the hosts' region>"}


def run_urls(config, workdir: str) -> List[Tuple[str, str, bool]]:
  """``(what, url, written)`` for every bucket URL the run uses."""
  found = [("--workdir", workdir, True)]
  for field in ("init_from", "stage1_checkpoint", "teacher_checkpoint",
                "data_dir"):
    value = config.get(field)
    if value:
      found.append((f"config.{field}", value, False))
  dataset = config.get("dataset") or ""
  if dataset.startswith("folder:"):
    found.append(("config.dataset", dataset[len("folder:"):], False))
  return [(what, url, written) for what, url, written in found
          if paths.is_cloud(url)]


def check_run(config, workdir: str) -> None:
  """``check_local_workdir`` of a local workdir, then ``check`` of each of
  ``run_urls``; ``folder:`` data in a bucket is refused (decoded files are
  read from a local disk or a mount).

  Raises:
    StorageError: naming the path or URL, what is wrong and the fix.
  """
  if not paths.is_cloud(workdir):
    check_local_workdir(workdir, config.get("dataset") or "")
  for what, url, written in run_urls(config, workdir):
    if what == "config.dataset":
      raise StorageError(
          f"config.dataset=folder:{url}: folder: data is read from a local "
          f"disk; mount the bucket (gcsfuse --implicit-dirs BUCKET /mnt/data, "
          f"then folder:/mnt/data/...) or copy it to each host (gcloud "
          f"storage cp -r {url} /local/path)")
    holds = "data" if what == "config.data_dir" else "checkpoint"
    check(url, what, written=written, holds=holds)


def check_local_workdir(workdir: str, dataset: str = "") -> None:
  """Refuses a local ``workdir`` a run could not write, or one in the data.

  Makes no folder: where ``workdir`` does not exist yet, a test file is made
  and removed in its nearest existing folder, where the run would make it.

  Args:
    workdir: the run's ``--workdir``, a local path.
    dataset: ``config.dataset``; ``folder:PATH`` data must not hold the
      workdir.

  Raises:
    StorageError: the workdir, or a path above it, is a file or a dangling
      link; it lies in the ``folder:`` data; or it cannot be written.
  """
  workdir = paths.resolve(workdir)
  existing = _nearest_existing(workdir)
  if dataset.startswith("folder:"):
    _check_outside_data(workdir, dataset[len("folder:"):])
  _check_writable(workdir, existing)


def _nearest_existing(workdir: str) -> str:
  """``workdir``, or the nearest folder above it that exists.

  Raises:
    StorageError: that path is not a folder, or a link on the way is
      dangling (``os.makedirs`` would fail on either only after the data
      are read and the model is built).
  """
  path = workdir
  while not os.path.exists(path):
    if os.path.islink(path):
      raise StorageError(
          f"--workdir={workdir}: {path} is a symbolic link to "
          f"{os.readlink(path)!r}, which does not resolve (missing, or a "
          f"loop); remove the link or make the folder it names")
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    what = "a file" if os.path.isfile(path) else "not a folder"
    where = "" if path == workdir else f"lies under {path}, which "
    raise StorageError(
        f"--workdir={workdir} {where}is {what}, not a folder; pass a "
        f"--workdir that is a folder (an earlier run's) or does not exist yet")
  return path


def _check_outside_data(workdir: str, data: str) -> None:
  """Refuses a workdir in the ``folder:`` tree ``data`` (real paths)."""
  if paths.is_cloud(data):
    return   # refused by check_run
  data_real = os.path.realpath(os.path.expanduser(data))
  work_real = os.path.realpath(workdir)
  if os.path.commonpath([data_real, work_real]) == data_real:
    raise StorageError(
        f"--workdir={workdir} lies in the data set's folder {data_real} "
        f"(config.dataset=folder:{data}): the run's checkpoints and metrics "
        f"would be listed with its images; pass a --workdir outside "
        f"{data_real}")


_WRITE_FIX = {
    errno.EROFS: "it is on a read-only file system: choose a folder on a "
                 "writable disk",
    errno.ENOSPC: "the disk is full: free space or choose another disk",
    errno.EDQUOT: "the disk quota is used up: free space or choose another "
                  "disk",
}


def _check_writable(workdir: str, existing: str) -> None:
  """Makes and removes a test file in ``existing`` (``workdir`` or the
  nearest existing folder above it).

  Raises:
    StorageError: the test file cannot be made.
  """
  try:
    fd, probe = tempfile.mkstemp(prefix=".ir2net-write-probe-", dir=existing)
  except OSError as e:
    where = (workdir if existing == workdir else
             f"{existing}, the nearest existing folder above it, where the "
             "run would make it")
    fix = _WRITE_FIX.get(e.errno, (
        f"choose a folder you can write, or make it writable (chmod u+w "
        f"{existing}, or run as its owner)"))
    raise StorageError(f"--workdir={workdir}: cannot write in {where} "
                       f"({e.strerror or e}); {fix}") from None
  os.close(fd)
  os.remove(probe)


def check(url: str, what: str = "the path", written: bool = False,
          timeout_s: float = None, holds: str = "files") -> None:
  """Checks that ``url`` can be used: the scheme for what it ``holds``,
  client, credentials, the server, the bucket and, if ``written``, a test
  object written and deleted under it.

  Args:
    url: a bucket URL (a local path passes).
    what: the flag or field, for messages.
    written: whether the run writes there.
    timeout_s: for each step that talks to the server.
    holds: 'files' (read and written through fsspec), 'checkpoint' (orbax
      checkpoints: a workdir, a checkpoint directory) or 'data' (a tfds
      data_dir).

  Raises:
    StorageError: naming ``what``, ``url`` and the fix.
  """
  url = paths.resolve(url)
  kind = paths.scheme(url)
  if kind is None:
    return
  if kind == "s3" and holds in _S3_REFUSED:
    raise StorageError(
        f"{what}={url}: {_S3_REFUSED[holds]}; use a gs:// bucket or a "
        "shared file system, or mount the S3 bucket on every host "
        "(mountpoint-s3 or s3fs-fuse) and pass its local path")
  timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
  module, install = paths.CLOUD_SCHEMES[kind]
  if importlib.util.find_spec(module) is None:
    raise StorageError(f"{what}={url} needs {module}, which is not "
                       f"installed: {install}")
  _within(timeout_s, f"{what}={url}",
          lambda: _check_credentials(kind, url, what))
  if kind == "gs":
    _check_connects(_gcs_endpoint(), url, what, timeout_s)
  _within(timeout_s, f"{what}={url}",
          lambda: _check_bucket(url, what, written))


def _within(timeout_s: float, name: str, fn: Callable[[], None]) -> None:
  """``fn()`` in a thread; StorageError if it takes over ``timeout_s``."""
  outcome = []

  def target():
    try:
      fn()
      outcome.append(None)
    except BaseException as e:  # raised below, in the caller's thread
      outcome.append(e)
  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout_s)
  if not outcome:
    raise StorageError(
        f"{name}: no answer from the storage server within {timeout_s:.0f} s; "
        f"check the network and the bucket's name (a server for tests: "
        f"STORAGE_EMULATOR_HOST={os.environ.get('STORAGE_EMULATOR_HOST')})")
  if outcome[0] is not None:
    raise outcome[0]


def _gcs_endpoint() -> str:
  """Where gcsfs and tensorstore send requests: the emulator's address
  where ``STORAGE_EMULATOR_HOST`` is set, else Google's."""
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if emulator in ("", "default"):
    return _GCS_ENDPOINT
  return emulator if "://" in emulator else f"http://{emulator}"


def _check_connects(endpoint: str, url: str, what: str,
                    timeout_s: float) -> None:
  parsed = urllib.parse.urlparse(endpoint)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  try:
    socket.create_connection((parsed.hostname, port),
                             timeout=min(timeout_s, 10)).close()
  except OSError as e:
    raise StorageError(
        f"{what}={url}: cannot connect to the storage server {endpoint} "
        f"({e}); check the network (and STORAGE_EMULATOR_HOST, where a test "
        f"server is meant)") from None


def _check_credentials(kind: str, url: str, what: str) -> None:
  """Credentials as tensorstore (checkpoint arrays) and gcsfs look for them:
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING``, else Application Default Credentials;
  for S3, botocore's chain."""
  if kind == "gs":
    if os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING"):
      return
    import google.auth  # pylint: disable=g-import-not-at-top
    try:
      google.auth.default()
      return
    except google.auth.exceptions.DefaultCredentialsError as e:
      reason = (paths.first_line(e) or type(e).__name__)
  else:
    import botocore.session  # pylint: disable=g-import-not-at-top
    if botocore.session.get_session().get_credentials() is not None:
      return
    reason = "botocore found none"
  raise StorageError(f"{what}={url}: no credentials for {kind}:// ({reason}); "
                     f"{_CREDENTIALS_FIX[kind]}")


def _check_bucket(url: str, what: str, written: bool) -> None:
  fs = paths.filesystem(url)
  bucket = url.split("://", 1)[1].split("/", 1)[0]
  kind = paths.scheme(url)
  try:
    fs.invalidate_cache()
    if not fs.exists(f"{kind}://{bucket}"):
      raise FileNotFoundError(bucket)
  except FileNotFoundError:
    raise StorageError(
        f"{what}={url}: the bucket {kind}://{bucket} does not exist (or these "
        f"credentials cannot see it); create it ({_CREATE[kind]} "
        f"{kind}://{bucket}{_WHERE[kind]}) or fix the name") from None
  except PermissionError as e:
    raise StorageError(
        f"{what}={url}: access to {kind}://{bucket} denied ({e}); "
        f"{_CREDENTIALS_FIX[kind]}") from None
  if not written:
    return
  probe = paths.join(url, f".write_probe.{socket.gethostname()}."
                     f"{os.getpid()}.{uuid.uuid4().hex[:8]}")
  try:
    fs.pipe_file(probe, b"ok")
    fs.rm(probe)
  except Exception as e:  # gcsfs and s3fs raise many types
    raise StorageError(
        f"{what}={url}: cannot write there ({type(e).__name__}: "
        f"{(paths.first_line(e) or type(e).__name__)}); the account needs permission to create "
        f"and delete objects (roles/storage.objectAdmin on GCS): "
        f"{_CREDENTIALS_FIX[kind]}") from None
