"""The binary convolution as a native CPU kernel (C++ through ``jax.ffi``).

``native/binary_conv.cc`` computes what ``bits.conv2d`` computes, exactly,
with XOR and popcount over packed words, and picks its inner loop for this
CPU at run time: AVX-512 VPOPCNTDQ, AVX2, or portable C++.

``pip install`` compiles it into the package where the machine has a C++
compiler (``setup.py``, ``native_build``). Where the package holds no
library for its source (installed without a compiler, or a checkout used
as it is), it is compiled the first time it is needed, with the C++
compiler this machine has (``$CXX``, else ``c++``, ``g++``, ``clang++``),
against the XLA FFI headers of the installed jaxlib, into a cache
(``$IR2NET_JAX_CACHE``, else ``$XDG_CACHE_HOME/ir2net_jax``, else
``~/.cache/ir2net_jax``; about 4 s, once per jaxlib and source version).

Where neither works, ``available()`` is False, one log line says why, and
the packed models run on the pure-JAX path.
"""

import ctypes
import functools
import os
from typing import List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from absl import logging

from ir2net_jax.deploy import bits, native_build
from ir2net_jax.deploy.native_build import NativeUnavailable

__all__ = ["ISAS", "NativeUnavailable", "available", "build", "best_isa",
           "conv2d", "isas_here", "library", "pack_signs",
           "unavailable_reason"]

TARGET = "ir2net_binary_conv"
FOLDED_TARGET = "ir2net_binary_conv_folded"
PACK_TARGET = "ir2net_pack_signs"
# The instruction sets the kernel has an inner loop for; "auto" is the
# widest this CPU has.
ISAS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3}
_REGISTERED = []


def _cache_dir() -> str:
  if os.environ.get("IR2NET_JAX_CACHE"):
    return os.environ["IR2NET_JAX_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ir2net_jax")


def _cached_library() -> str:
  """Where ``build`` puts the kernel for the installed jaxlib."""
  return os.path.join(_cache_dir(),
                      native_build.library_name(jax.ffi.include_dir()))


def build() -> str:
  """Compiles the kernel against the installed jaxlib's FFI headers (once;
  later calls find it in the cache).

  Returns:
    The path of the shared library.

  Raises:
    NativeUnavailable: no C++ compiler, or the compiler failed (its message
      is kept).
  """
  include = jax.ffi.include_dir()
  library_path = _cached_library()
  if os.path.exists(library_path):
    return library_path
  if native_build.compiler() is not None:
    logging.info("building the native XOR-popcount kernel (once for this "
                 "jaxlib, a few seconds) into %s", library_path)
  return native_build.compile_library(include, library_path)


def _register(path: str) -> ctypes.CDLL:
  """Loads the library at ``path`` and registers its handlers with XLA
  (once per process: the first library registered serves every later
  call)."""
  loaded = ctypes.CDLL(path)
  if not _REGISTERED:
    for target, handler in ((TARGET, loaded.BinaryConv),
                            (FOLDED_TARGET, loaded.BinaryConvFolded),
                            (PACK_TARGET, loaded.PackSigns)):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler),
                                  platform="cpu")
    _REGISTERED.append(path)
  loaded.ir2net_best_isa.restype = ctypes.c_int32
  return loaded


@functools.cache
def _load() -> Tuple[Optional[ctypes.CDLL], Optional[str], Optional[str]]:
  """``(library, its path, None)`` once loaded and registered, else
  ``(None, None, why)``: the library ``pip install`` built, else one
  built (or found) in the cache."""
  packaged = native_build.packaged_library()
  if os.path.exists(packaged):
    try:
      return _register(packaged), packaged, None
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("the native kernel built at install (%s) does not "
                      "load here (%s); building one for this jaxlib",
                      packaged, e)
  try:
    path = build()
    return _register(path), path, None
  except (NativeUnavailable, OSError) as e:
    logging.warning("packed convolutions run on the pure-JAX path: the "
                    "native kernel is unavailable (%s)", e)
    return None, None, str(e)


def available() -> bool:
  """True where the kernel is built and registered (building it if
  needed)."""
  return _load()[0] is not None


def library() -> Optional[str]:
  """The path of the kernel's library in use: the package's (built by
  ``pip install``) or the cache's; None where ``available()`` is False."""
  return _load()[1]


def unavailable_reason() -> Optional[str]:
  """Why ``available()`` is False (None where it is True)."""
  return _load()[2]


def best_isa() -> str:
  """The instruction set ``isa='auto'`` picks on this CPU."""
  loaded = _load()[0]
  if loaded is None:
    raise NativeUnavailable(unavailable_reason())
  code = loaded.ir2net_best_isa()
  return next(name for name, c in ISAS.items() if c == code)


def _varying_like(out: jax.Array, operand: jax.Array) -> jax.Array:
  """``out`` typed as varying over the mesh axes ``operand`` varies over
  (inside shard_map; ffi_call's results are typed as varying over none)."""
  varying = tuple(jax.typeof(operand).manual_axis_type.varying)
  return lax.pcast(out, varying, to="varying") if varying else out


def pack_signs(values: jax.Array, zero_to_one: bool = False,
               isa: str = "auto") -> bits.Packed:
  """``bits.pack(binarize.sign(values, zero_to_one))`` on the native
  kernel (CPU only; float32 compares with vector masks). Jittable.

  Args:
    values: float (..., C); other float dtypes are compared as float32,
      which keeps every sign.
    zero_to_one: a 0 is +1 (``binarize.sign``'s flag), else 0.
    isa: an instruction set of ``ISAS``.

  Raises:
    NativeUnavailable: the kernel cannot be built here.
  """
  if not available():
    raise NativeUnavailable(unavailable_reason())
  values = values.astype(jnp.float32)
  words = -(-values.shape[-1] // bits.WORD_BITS)
  plane = jax.ShapeDtypeStruct(values.shape[:-1] + (words,), jnp.uint32)
  negative, nonzero = jax.ffi.ffi_call(PACK_TARGET, (plane, plane))(
      values, zero_to_one=bool(zero_to_one), isa=np.int32(ISAS[isa]))
  return bits.Packed(_varying_like(negative, values),
                     _varying_like(nonzero, values), values.shape[-1])


def isas_here() -> List[str]:
  """The instruction sets of ``ISAS`` this CPU runs the kernel with,
  narrowest first (none where the kernel cannot be built)."""
  if not available():
    return []
  order = list(ISAS)[1:]                # portable, avx2, avx512
  return order[:order.index(best_isa()) + 1]


def conv2d(x: bits.Packed, kernel: bits.PackedKernel, stride: int,
           pad: int, isa: str = "auto", fold=None) -> jax.Array:
  """``bits.conv2d`` on the native kernel (CPU only). Jittable.

  Args:
    x: ``bits.pack`` of (B, H, W, Cin) activations.
    kernel: ``bits.pack_kernel`` of a (k, k, Cin, Cout) kernel.
    stride: spatial stride.
    pad: zero padding on every side.
    isa: an instruction set of ``ISAS``; one this CPU lacks is an error
      when the call runs.
    fold: None, or the BatchNorm after the convolution as
      ``(mean, scale, bias)``, float32 (Cout,) each: the kernel then
      returns ``(sums - mean) * scale + bias`` in float32
      (``packed.FoldedBatchNorm``).

  Returns:
    int32 (B, H', W', Cout), equal to ``bits.conv2d``'s; float32 with a
    ``fold``.

  Raises:
    NativeUnavailable: the kernel cannot be built here.
  """
  if not available():
    raise NativeUnavailable(unavailable_reason())
  bits.check_operands(x, kernel)
  b, h, w, _ = x.negative.shape
  k = kernel.kernel_size
  out_h = (h + 2 * pad - k) // stride + 1
  out_w = (w + 2 * pad - k) // stride + 1
  shape = (b, out_h, out_w, kernel.out_channels)
  operands = [x.negative, x.nonzero, kernel.negative, kernel.nonzero]
  if fold is None:
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, jnp.int32))
  else:
    call = jax.ffi.ffi_call(FOLDED_TARGET,
                            jax.ShapeDtypeStruct(shape, jnp.float32))
    operands += [jnp.asarray(v, jnp.float32) for v in fold]
  out = call(*operands, kernel=np.int64(k), stride=np.int64(stride),
             pad=np.int64(pad), dense=bool(kernel.dense),
             isa=np.int32(ISAS[isa]))
  return _varying_like(out, x.negative)
