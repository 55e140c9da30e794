"""The public API of ``ir2net_jax``: what it lists, and that importing the
package stays light (no JAX, no TensorFlow) until a name is used."""

import os
import subprocess
import sys

import ir2net_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

API = ["__version__", "create_model", "BinaryConv", "CIRec", "sign",
       "approx_sign", "clipped_ste", "ste_sign", "swish_sign",
       "information_restriction", "two_pass_objective", "train_and_evaluate",
       "evaluate", "get_config", "export_packed", "load_packed"]


def test_all_is_the_api():
  assert ir2net_jax.__all__ == API
  assert set(API) <= set(dir(ir2net_jax))


def test_every_name_resolves_and_has_a_docstring():
  for name in API[1:]:
    value = getattr(ir2net_jax, name)
    assert callable(value), name
    assert (value.__doc__ or "").strip(), f"{name} has no docstring"
  assert isinstance(ir2net_jax.__version__, str)


def test_unknown_names_raise_attribute_error():
  try:
    ir2net_jax.no_such_name  # pylint: disable=pointless-statement
  except AttributeError as e:
    assert "no_such_name" in str(e)
  else:
    raise AssertionError("no AttributeError")


def _loaded_after(statement: str, roots) -> str:
  """The modules of ``roots`` that a fresh process holds after
  ``import ir2net_jax`` and ``statement``, as a printed sorted list."""
  code = (f"import sys, ir2net_jax\n{statement}\n"
          f"print(sorted(m for m in sys.modules if m.split('.')[0] in "
          f"{tuple(roots)!r}))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT,
                                JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300, check=True)
  return out.stdout.strip().splitlines()[-1]


def test_import_loads_neither_jax_nor_tensorflow():
  assert _loaded_after("", ("jax", "flax", "tensorflow",
                            "tensorflow_datasets")) == "[]"


def test_training_names_import_no_tensorflow():
  assert _loaded_after("ir2net_jax.train_and_evaluate, ir2net_jax.evaluate",
                       ("tensorflow", "tensorflow_datasets")) == "[]"
