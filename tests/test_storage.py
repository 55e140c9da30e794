"""The path layer (``ir2net_jax.storage``): local paths and bucket URLs alike,
atomic writes, no local ``gs:`` folder, and bucket problems refused before
anything is compiled, with the URL and the fix. Bucket paths go to a real
GCS server on this machine (``gcs_server.GcsServer``)."""

import ast
import errno
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from gcs_server import free_port, reset_clients
from ir2net_jax.storage import paths, preflight
from ir2net_jax.storage.paths import StorageError

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "ir2net_jax")
BUCKET = "files"


def _url():
  return f"gs://{BUCKET}/{uuid.uuid4().hex[:8]}"


# Paths --------------------------------------------------------------------

def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path,
                                                        monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("gs://b/run/") == "gs://b/run"
  assert paths.resolve("s3://b/run") == "s3://b/run"
  assert paths.resolve("run") == str(tmp_path / "run")
  assert paths.join("gs://b/run", "checkpoints", "4") == "gs://b/run/checkpoints/4"
  assert paths.parent("gs://b/run/stage2") == "gs://b/run"
  assert paths.parent("gs://b") == "gs://b"
  assert paths.name("gs://b/run/") == "run"
  assert paths.is_cloud("gs://b") and not paths.is_cloud(str(tmp_path))


@pytest.mark.parametrize("bad, words", [
    ("gs:/bucket/run", "two slashes"),        # a slash missing
    ("gs:bucket/run", "two slashes"),
    ("runs/s3:x", "local folder named 's3:x'"),
    ("gs://", "names no bucket"),
    ("az://container/run", "az:// paths are not supported"),
    ("http://host/run", "http:// paths are not supported"),
])
def test_paths_that_would_make_a_local_gs_folder_are_refused(
    bad, words, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(StorageError, match=words):
    paths.resolve(bad)
  assert not os.listdir(tmp_path)


def test_local_writes_are_atomic_and_write_new_never_overwrites(tmp_path):
  target = tmp_path / "sub" / "summary.json"
  paths.write_atomic(str(target), "a")
  paths.write_atomic(str(target), b"bb")
  assert target.read_bytes() == b"bb"
  paths.write_new(str(tmp_path / "config.json"), "{}")
  with pytest.raises(FileExistsError):
    paths.write_new(str(tmp_path / "config.json"), "{1}")
  assert (tmp_path / "config.json").read_text() == "{}"
  assert sorted(os.listdir(tmp_path)) == ["config.json", "sub"]
  assert os.listdir(tmp_path / "sub") == ["summary.json"]   # no temporary


def _never_half_read(path):
  """Rewrites ``path`` with alternating whole versions while another thread
  reads it: every read is one of them, never a mix or a part."""
  versions = [b"x" * 300_000, b"y" * 200_000]
  paths.write_atomic(path, versions[0])
  seen, stop = [], threading.Event()

  def read():
    while not stop.is_set():
      seen.append(paths.read_bytes(path))
  reader = threading.Thread(target=read)
  reader.start()
  for i in range(12):
    paths.write_atomic(path, versions[i % 2])
  stop.set()
  reader.join()
  assert seen and all(data in versions for data in seen), {
      (len(d), d[:1]) for d in seen}


def test_a_reader_never_sees_half_a_local_file(tmp_path):
  _never_half_read(str(tmp_path / "summary.json"))


def test_bucket_files_written_read_moved_and_listed(gcs):
  url = _url()
  _never_half_read(f"{url}/summary.json")
  paths.write_new(f"{url}/config.json", "{}")
  with pytest.raises(FileExistsError):
    paths.write_new(f"{url}/config.json", "{2}")
  assert paths.read_text(f"{url}/config.json") == "{}"
  paths.write_atomic(f"{url}/checkpoints/6/state/a", b"1")
  paths.write_atomic(f"{url}/checkpoints/6/meta/b", b"2")
  paths.copytree(f"{url}/checkpoints/6", f"{url}/best/6")
  paths.move(f"{url}/checkpoints/6", f"{url}/corrupt_checkpoints/6-now")
  assert paths.listdir(url) == ["best", "config.json", "corrupt_checkpoints",
                                "summary.json"]
  assert paths.read_bytes(f"{url}/best/6/meta/b") == b"2"
  assert paths.read_bytes(f"{url}/corrupt_checkpoints/6-now/state/a") == b"1"
  assert not paths.exists(f"{url}/checkpoints/6/state/a")
  assert paths.isdir(f"{url}/best") and not paths.isdir(f"{url}/nothing")
  assert paths.listdir(f"{url}/nothing") == []
  prefix = url.split("://")[1]
  assert not [n for n in gcs.objects(prefix) if ".tmp-" in n]


def test_another_process_writes_are_seen_at_once(gcs):
  """No listing is cached: what another client wrote is listed next."""
  url = _url()
  paths.write_atomic(f"{url}/a", b"1")
  assert paths.listdir(url) == ["a"]
  (gcs.root / url.split("://")[1]).mkdir(parents=True, exist_ok=True)
  import google.cloud.storage  # pylint: disable=g-import-not-at-top
  client = google.cloud.storage.Client(project="test")
  client.bucket(BUCKET).blob(url.split("/", 3)[3] + "/b").upload_from_string(
      b"2")
  assert paths.listdir(url) == ["a", "b"]
  assert paths.exists(f"{url}/b")


# The one path layer ---------------------------------------------------------

# Modules that read or write a run's files: they go through storage.paths.
RUN_FILE_MODULES = ("train", os.path.join("io", "checkpoints.py"),
                    os.path.join("io", "weights.py"),
                    os.path.join("configs", "record.py"),
                    os.path.join("tools", "eval.py"),
                    os.path.join("tools", "convert.py"),
                    os.path.join("tools", "train.py"),
                    os.path.join("tools", "checkpoint_cli.py"))
LOCAL_ONLY = {"open", "os.makedirs", "os.mkdir", "os.rename", "os.replace",
              "os.remove", "os.unlink", "os.listdir", "os.path.exists",
              "os.path.isdir", "os.path.isfile", "glob.glob", "shutil.copytree",
              "shutil.rmtree", "shutil.move", "shutil.copy"}


def _calls(path):
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      yield node.lineno, ast.unparse(node.func), node


def test_run_files_go_through_the_path_layer():
  files = []
  for entry in RUN_FILE_MODULES:
    full = os.path.join(PACKAGE, entry)
    files += ([os.path.join(full, f) for f in sorted(os.listdir(full))
               if f.endswith(".py")] if os.path.isdir(full) else [full])
  found = []
  for path in files:
    for line, name, node in _calls(path):
      abspath_of_code = (name == "os.path.abspath" and "__file__" in
                         ast.unparse(node))
      if name in LOCAL_ONLY or (name == "os.path.abspath"
                                and not abspath_of_code):
        found.append(f"{os.path.relpath(path, PACKAGE)}:{line}: {name}")
  assert not found, ("run files opened without storage.paths (a bucket "
                     f"workdir would make a local folder): {found}")


# Refused before anything is compiled ------------------------------------------

class _Config(dict):
  get = dict.get


def _refused(url, words, **config):
  start = time.monotonic()
  with pytest.raises(StorageError, match=words) as e:
    preflight.check_run(_Config(config), url)
  assert time.monotonic() - start < 30
  return str(e.value)


def test_an_unreachable_server_is_refused_at_once(gcs, monkeypatch,
                                                  no_compile):
  nobody = f"http://127.0.0.1:{free_port()}"
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", nobody)
  reset_clients()
  message = _refused("gs://files/run", "cannot connect to the storage "
                     "server")
  assert "gs://files/run" in message and nobody in message


def test_a_missing_bucket_is_refused_with_its_name(gcs, no_compile):
  message = _refused("gs://no-such-bucket/run", "does not exist")
  assert "gcloud storage buckets create gs://no-such-bucket" in message


def test_missing_credentials_are_refused_with_the_fix(gcs, monkeypatch,
                                                      tmp_path, no_compile):
  monkeypatch.delenv("GOOGLE_AUTH_TOKEN_FOR_TESTING")
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                     str(tmp_path / "missing.json"))
  monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
  message = _refused("gs://files/run", "no credentials for gs://")
  assert "gcloud auth application-default login" in message


def test_a_missing_client_is_refused_with_the_install_command(
    monkeypatch, no_compile):
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
  _refused("gs://files/run", r"needs gcsfs, which is not installed: pip "
           r"install gcsfs")
  monkeypatch.setitem(sys.modules, "s3fs", None)
  with pytest.raises(StorageError, match="needs s3fs"):
    preflight.check("s3://b/model.ir2net", "--output", written=True)


def test_s3_is_refused_where_orbax_or_the_engines_cannot_use_it(
    tmp_path, monkeypatch, no_compile):
  """orbax-checkpoint takes s3://b/x for a relative path; TensorFlow and
  array_record have no S3 file system. Refused at once, with a mount or a
  gs:// bucket as the fix, and no local 's3:' folder made."""
  monkeypatch.chdir(tmp_path)
  for url, config, what in [
      ("s3://b/run", {}, "--workdir=s3://b/run: orbax-checkpoint"),
      ("/tmp/run", {"init_from": "s3://b/w"}, "config.init_from=s3://b/w: orb"),
      ("/tmp/run", {"data_dir": "s3://b/tfds"}, "config.data_dir=s3://b/tfd"
       "s: the input engines read tfds data from gs://")]:
    message = _refused(url, what, **config)
    assert "mountpoint-s3" in message and "gs:// bucket" in message
  with pytest.raises(StorageError, match="--checkpoint=s3://b/run/best: orb"):
    preflight.check("s3://b/run/best", "--checkpoint", holds="checkpoint")
  assert os.listdir(tmp_path) == []


def test_a_silent_server_is_refused_within_the_timeout(gcs, monkeypatch,
                                                       no_compile):
  """A server that accepts connections and never answers."""
  import socket  # pylint: disable=g-import-not-at-top
  silent = socket.socket()
  silent.bind(("127.0.0.1", 0))
  silent.listen(16)
  try:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST",
                       f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(preflight, "TIMEOUT_S", 2.0)
    reset_clients()
    _refused("gs://files/run", "no answer from the storage server within 2 s")
  finally:
    silent.close()


def test_folder_data_in_a_bucket_names_a_mount_or_a_copy(no_compile):
  message = _refused("/tmp/run", "folder: data is read from a local disk",
                     dataset="folder:gs://files/imagenet")
  assert "gcsfuse" in message


def test_every_bucket_url_of_a_run_is_checked(gcs, no_compile):
  _refused("gs://files/run", r"config.init_from=gs://nowhere/w: the bucket "
           r"gs://nowhere does not exist", init_from="gs://nowhere/w")
  # A local workdir and local weights: nothing to check.
  preflight.check_run(_Config(init_from="/tmp/w"), "/tmp/run")


# A local workdir the run could not use -------------------------------------

def _listing(root):
  """Every path under ``root``, relative, sorted."""
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, dirs, files in os.walk(root) for n in dirs + files)


def _local_refused(workdir, words, **config):
  """``check_run`` refuses ``workdir`` at once, with ``words``, and changes
  nothing on the disk around it. Returns the message."""
  around = os.path.dirname(os.path.dirname(workdir))
  before = _listing(around)
  message = _refused(str(workdir), words, **config)
  assert _listing(around) == before
  return message


def test_a_workdir_that_is_a_file_or_lies_under_one_is_refused(
    tmp_path, no_compile):
  afile = tmp_path / "runs" / "notes.txt"
  afile.parent.mkdir()
  afile.write_text("not a folder")
  message = _local_refused(afile, "is a file, not a folder")
  assert f"--workdir={afile}" in message and "does not exist yet" in message
  _local_refused(afile / "run", f"lies under {afile}, which is a file")
  (tmp_path / "runs" / "gone").symlink_to(tmp_path / "missing")
  _local_refused(tmp_path / "runs" / "gone" / "run",
                 "is a symbolic link to .*which does not resolve")


def test_a_writable_workdir_passes_and_the_check_makes_nothing(
    tmp_path, no_compile):
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "notes.txt").write_text("keep me")
  for workdir in (tmp_path / "old", tmp_path / "new" / "run"):
    preflight.check_run(_Config(dataset="folder:" + str(tmp_path / "data")),
                        str(workdir))
  assert _listing(tmp_path) == ["old", os.path.join("old", "notes.txt")]


def _modes_bind(folder) -> bool:
  """Whether a folder's mode stops this process (not root, or root without
  CAP_DAC_OVERRIDE, as under ``capsh --drop=cap_dac_override``)."""
  try:
    tempfile.TemporaryFile(dir=folder).close()
  except PermissionError:
    return True
  return False


def test_a_workdir_that_cannot_be_written_is_refused(tmp_path, no_compile):
  locked = tmp_path / "locked"
  (locked / "old").mkdir(parents=True)
  for folder in (locked / "old", locked):
    folder.chmod(0o555)
  try:
    if not _modes_bind(locked):
      pytest.skip("root writes in any folder whatever its mode: run as "
                  "another user (or under capsh --drop=cap_dac_override) to "
                  "test this")
    _local_refused(locked / "old", r"cannot write in .*/old \(Permission "
                   r"denied\); .*chmod u\+w")
    message = _local_refused(locked / "new" / "run",
                             "the nearest existing folder above it")
    assert f"chmod u+w {locked}" in message
  finally:
    for folder in (locked, locked / "old"):
      folder.chmod(0o755)


def test_a_failed_write_probe_is_refused_with_the_fix(
    tmp_path, monkeypatch, no_compile):
  """The probe's error and its fix reach the message (as root too, where
  no folder's mode stops a write)."""
  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")
  monkeypatch.setattr(tempfile, "mkstemp", read_only)
  _local_refused(tmp_path / "run", r"cannot write in .* \(Read-only file "
                 r"system\); it is on a read-only file system")


def test_a_workdir_in_the_folder_data_is_refused_through_links(
    tmp_path, no_compile):
  data = tmp_path / "photos"
  (data / "train" / "cat").mkdir(parents=True)
  (tmp_path / "photos2").mkdir()
  (tmp_path / "link_to_train").symlink_to(data / "train")
  (tmp_path / "link_to_data").symlink_to(data)
  for workdir, dataset in (
      (data, data), (data / "runs" / "a", data),
      (tmp_path / "link_to_train" / "run", data),   # a link to inside
      (data / "run", tmp_path / "link_to_data")):   # the data through one
    message = _local_refused(workdir, "lies in the data set's folder",
                             dataset=f"folder:{dataset}")
    assert f"outside {data}" in message
  preflight.check_run(_Config(dataset=f"folder:{data}"),
                      str(tmp_path / "photos2" / "run"))   # beside: fine


@pytest.mark.slow
def test_the_launcher_refuses_a_file_workdir_before_the_data(tmp_path):
  afile = tmp_path / "workdir"
  afile.write_text("not a folder")
  start = time.monotonic()
  done = subprocess.run(
      [sys.executable, os.path.join(os.path.dirname(PACKAGE), "launch.py"),
       "--config=digits:smoke", f"--workdir={afile}"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  out, status = done.stdout.decode(), done.returncode
  seconds = time.monotonic() - start
  assert status != 0, out[-3000:]
  assert f"--workdir={afile} is a file, not a folder" in out, out[-3000:]
  assert "input engine" not in out   # refused before the data were read
  assert "FileExistsError" not in out
  assert "Traceback" not in out, out[-3000:]
  assert seconds < 120
  assert afile.read_text() == "not a folder"
