import os
import sys

# Eight fake CPU devices for the multi-device tests; set before JAX starts.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")
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
