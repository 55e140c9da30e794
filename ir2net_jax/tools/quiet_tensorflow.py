"""TensorFlow imported without its start-up banners, for the commands.

TensorFlow's C++ start-up writes INFO lines straight to file descriptor 2
(the oneDNN notice, the CPU-instructions notice, absl's "before
InitializeLog" line) that no environment variable of TF 2.21 turns off.
``install()`` makes the first ``import tensorflow`` of the process, from
wherever it comes (the tf.data engine, tensorflow_datasets), run with file
descriptor 2 pointed at /dev/null; an import that fails still raises.

It also sets ``TF_CPP_MIN_LOG_LEVEL=3`` unless it is set: TensorFlow's C++
log repeats, for each bad image a tf.data ``folder:`` run meets, what
``data.tf_data.folder_reads`` says once with the file's path; its errors
reach Python as exceptions all the same. ``TF_CPP_MIN_LOG_LEVEL=0`` shows
that log again.
"""

import contextlib
import importlib.abc
import os
import sys

__all__ = ["install"]


@contextlib.contextmanager
def _no_stderr():
  sys.stderr.flush()
  saved = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(null, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


class _QuietLoader(importlib.abc.Loader):
  """The finder's loader, its ``exec_module`` quiet; everything else (the
  resource readers) its own."""

  def __init__(self, loader):
    self._loader = loader

  def __getattr__(self, name):
    return getattr(self._loader, name)

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    with _no_stderr():
      self._loader.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
  """Finds ``tensorflow`` as the finders after it do (whatever they find or
  refuse), with a quiet loader."""

  def find_spec(self, name, path=None, target=None):
    if name != "tensorflow":   # asked again only until it is imported
      return None
    others = sys.meta_path[sys.meta_path.index(self) + 1:]
    for finder in others:
      spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
      if spec is not None:
        if spec.loader is not None:
          spec.loader = _QuietLoader(spec.loader)
        return spec
    return None


def install() -> None:
  """Quiets the process's first ``import tensorflow`` (once; a no-op where
  TensorFlow is imported already)."""
  if "tensorflow" not in sys.modules and not any(
      isinstance(f, _Finder) for f in sys.meta_path):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.meta_path.insert(0, _Finder())
