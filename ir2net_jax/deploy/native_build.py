"""Compiling the native XOR-popcount kernel: the standard library only.

``setup.py`` loads this file by its path while ``pip install`` builds the
package (where JAX may not be importable) and compiles the kernel into the
package, against the XLA FFI headers vendored in ``native/include`` (from
jaxlib 0.10.2, Apache 2.0). ``native.py`` uses the same functions to load
that library, or to compile one on first use against the installed
jaxlib's own headers where the package holds none.
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "native", "binary_conv.cc")
VENDORED_INCLUDE = os.path.join(HERE, "native", "include")
# -ffp-contract=off: the folded BatchNorm's multiply and add round as
# XLA's do (no fused multiply-add). No -march: the kernel picks its
# instruction set when it runs, so one build serves every x86-64 CPU.
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-w", "-ffp-contract=off")
TIMEOUT_S = 300


class NativeUnavailable(RuntimeError):
  """The native kernel cannot be built or loaded here."""


def compiler() -> Optional[str]:
  """The C++ compiler to use: ``$CXX``, else ``c++``, ``g++``, ``clang++``
  on ``PATH``; None where there is none."""
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def key(include_dir: str) -> str:
  """16 hex digits naming a build: the kernel's source, the FFI header and
  the flags (a library of another source or header is never loaded)."""
  digest = hashlib.sha256()
  for path in (SOURCE, os.path.join(include_dir, "xla", "ffi", "api",
                                    "ffi.h")):
    with open(path, "rb") as f:
      digest.update(f.read())
  digest.update(" ".join(FLAGS).encode())
  return digest.hexdigest()[:16]


def library_name(include_dir: str) -> str:
  return f"binary_conv-{key(include_dir)}.so"


def packaged_library(package_dir: str = HERE) -> str:
  """Where ``pip install`` puts the kernel it compiles: beside this file,
  named for the vendored headers' build (it may not exist)."""
  return os.path.join(package_dir, "native", library_name(VENDORED_INCLUDE))


def compile_library(include_dir: str, output: str) -> str:
  """Compiles the kernel against ``include_dir`` into ``output``, written
  atomically (a concurrent build of the same file is harmless).

  Returns:
    ``output``.

  Raises:
    NativeUnavailable: no C++ compiler, or it failed (its message kept).
  """
  cxx = compiler()
  if cxx is None:
    raise NativeUnavailable("no C++ compiler (set $CXX, or install g++ or "
                            "clang++)")
  os.makedirs(os.path.dirname(output), exist_ok=True)
  fd, partial = tempfile.mkstemp(suffix=".so.partial",
                                 dir=os.path.dirname(output))
  os.close(fd)
  try:
    done = subprocess.run([cxx, *FLAGS, f"-I{include_dir}", SOURCE, "-o",
                           partial], capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    if done.returncode:
      raise NativeUnavailable(f"{os.path.basename(cxx)} failed: "
                              + done.stderr.strip()[-2000:])
    os.replace(partial, output)
  except subprocess.TimeoutExpired as e:
    raise NativeUnavailable(f"{cxx} ran past {TIMEOUT_S} s") from e
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return output
