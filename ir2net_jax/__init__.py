"""ir2net_jax: IR2Net binary neural networks in JAX / Flax.

The public API, imported on first use (``import ir2net_jax`` loads neither
JAX nor TensorFlow)::

  import ir2net_jax
  config = ir2net_jax.get_config("digits:smoke")
  summary = ir2net_jax.train_and_evaluate(config, "/tmp/digits")
  result = ir2net_jax.evaluate(None, "/tmp/digits")   # its recorded config
  model = ir2net_jax.create_model("ir2net_c", stage=2)
  ir2net_jax.export_packed("/tmp/digits/best", "/tmp/digits.packed")
  logits = ir2net_jax.load_packed("/tmp/digits.packed")(images)   # on bits

The layers, bottom to top (arrows only go down; ``tests/test_layout.py``):
``backend``, ``configs`` and ``storage`` < ``nn`` < ``models`` < ``data``
and ``io`` < ``train`` < ``deploy`` < ``tools`` (the command lines).
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API = {
    "create_model": "ir2net_jax.models",
    "BinaryConv": "ir2net_jax.nn.layers",
    "CIRec": "ir2net_jax.nn.layers",
    "sign": "ir2net_jax.nn.binarize",
    "approx_sign": "ir2net_jax.nn.binarize",
    "clipped_ste": "ir2net_jax.nn.binarize",
    "ste_sign": "ir2net_jax.nn.binarize",
    "swish_sign": "ir2net_jax.nn.binarize",
    "information_restriction": "ir2net_jax.nn.restriction",
    "two_pass_objective": "ir2net_jax.nn.objective",
    "train_and_evaluate": "ir2net_jax.train.loop",
    "evaluate": "ir2net_jax.train.evaluate",
    "get_config": "ir2net_jax.configs",
    "export_packed": "ir2net_jax.deploy.export",
    "load_packed": "ir2net_jax.deploy.load",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
  """Imports the module that defines ``name`` on first use."""
  if name not in _API:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(_API[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
