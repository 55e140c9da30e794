import atexit
import gc
import os
import shutil
import sys
import tempfile

# Eight fake CPU devices for the multi-device tests; set before JAX starts.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")
# No GCE metadata server to look for (google.auth reads this at import; the
# GCS server's clients would otherwise wait 3 s for one in each process).
os.environ.setdefault("NO_GCE_CHECK", "true")
# One persistent compilation cache for the session and the processes it
# starts (launch.py runs, workers): the same train step, compiled for the
# same devices and flags, is compiled once. The key covers the program, the
# devices, the compile options and XLA_FLAGS, so a test still gets the
# program it asked for. A fresh directory per session: nothing carries over.
# Every program is kept, however quick to compile: a run's few dozen small
# ones (initialisation, metrics, the input's device work) cost about a
# second per launch.py process when compiled again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="ir2net_jax_test_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """A data_dir holding the prepared digits data set (the smoke config's)."""
  import train_utils  # Imports TensorFlow: only for the tests that need it.
  from ir2net_jax import data
  path = str(tmp_path_factory.mktemp("tfds_digits"))
  data.dataset_info(train_utils.tiny_digits_config(path))
  return path


@pytest.fixture
def workdir(tmp_path):
  """A workdir that already holds a file, which no refused run may touch."""
  path = tmp_path / "work"
  path.mkdir()
  (path / "notes.txt").write_text("keep me")
  return path


@pytest.fixture
def no_compile(monkeypatch):
  """Makes any compilation fail, so errors must come before it."""
  import jax  # pylint: disable=g-import-not-at-top

  def boom(*a, **k):
    raise AssertionError("compiled before reporting the error")
  monkeypatch.setattr(jax, "jit", boom)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's in-memory caches after each test module.

  Without this the session keeps every program it ever compiled (tens of
  GB by the end of the suite); a later module that needs one again gets it
  from the persistent cache above.
  """
  yield
  jax = sys.modules.get("jax")
  if jax is not None:
    jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="module")
def gcs_server():
  """A GCS server on this machine (fake-gcs-server, ``gcs_server.py``) for
  a test module, with the buckets ``runs`` and ``files``."""
  from gcs_server import GcsServer  # pylint: disable=g-import-not-at-top
  with GcsServer(buckets=["runs", "files"]) as server:
    yield server


@pytest.fixture
def gcs(gcs_server, monkeypatch):
  """The module's GCS server, with this process's clients (gcsfs through
  etils.epath, tensorstore through orbax) pointed at it."""
  from gcs_server import reset_clients  # pylint: disable=g-import-not-at-top
  for key, value in gcs_server.env().items():
    monkeypatch.setenv(key, value)
  reset_clients()
  yield gcs_server
  reset_clients()


# The longest modules start first, longest first, so that `-n 2 --dist
# loadfile` does not end with one worker running a long module while the
# other idles. (xdist would otherwise hand out the modules with the most
# tests first.) Their worker seconds in a full run on a 2-core AMD EPYC,
# roughly: 400, 290, 240, 165, 130, 125, 100, 80, 75, 65, 60, 50, 45, 40;
# every other module takes under 30.
LONGEST_FIRST = ("test_parity.py", "test_buckets.py", "test_multihost.py",
                 "test_train.py", "test_deploy.py", "test_benchmark.py",
                 "test_claims.py", "test_tf_free.py", "test_evaluate.py",
                 "test_bad_data.py", "test_visualize.py", "test_robustness.py",
                 "test_accelerator_export.py", "test_diagnostics.py")
# Modules whose tests share a fixture's float64 run, which only the last
# fixture's is kept of (parity_layers.float64_run): a fixture's tests run
# one after the other.
BY_FIXTURE = ("test_parity.py",)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist is installed
    config.option.loadscopereorder = False


def _fixture_of(item) -> str:
  spec = getattr(item, "callspec", None)
  if item.path.name not in BY_FIXTURE or spec is None:
    return ""
  return str(spec.params.get("path", ""))


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: (rank.get(item.path.name, len(rank)),
                               _fixture_of(item)))
