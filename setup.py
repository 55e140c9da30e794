"""Builds the package, and compiles its native XOR-popcount kernel into it
where the machine has a C++ compiler (the metadata is in pyproject.toml).

The kernel is compiled against the XLA FFI headers the package vendors, so
the build needs no jaxlib. Without a compiler the install still succeeds:
the kernel is then compiled on first use if a compiler appears, and until
then packed models run on the pure-JAX path, with a line in the log
(``ir2net_jax/deploy/native.py``). ``IR2NET_JAX_BUILD_KERNEL=0`` skips the
compile.
"""

import glob
import importlib.util
import os

import setuptools
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build import build

ROOT = os.path.dirname(os.path.abspath(__file__))
DEPLOY = os.path.join(ROOT, "ir2net_jax", "deploy")


def _native_build():
  """``ir2net_jax/deploy/native_build.py``, loaded by its path: importing
  the package would import JAX, which the build environment may lack."""
  spec = importlib.util.spec_from_file_location(
      "_ir2net_native_build", os.path.join(DEPLOY, "native_build.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class BuildKernel(setuptools.Command):
  """Compiles ``deploy/native/binary_conv.cc`` into the package (into the
  checkout itself for an editable install)."""

  description = "compile the native XOR-popcount kernel into the package"
  user_options = []

  def initialize_options(self):
    self.build_lib = None
    self.editable_mode = False
    self._outputs = []

  def finalize_options(self):
    self.set_undefined_options("build_py", ("build_lib", "build_lib"))

  def run(self):
    if os.environ.get("IR2NET_JAX_BUILD_KERNEL", "1") == "0":
      self.announce("IR2NET_JAX_BUILD_KERNEL=0: the kernel is not compiled",
                    level=2)
      return
    native_build = _native_build()
    package = DEPLOY if self.editable_mode else os.path.join(
        self.build_lib, "ir2net_jax", "deploy")
    output = native_build.packaged_library(package)
    if self.editable_mode:   # libraries of earlier sources in the checkout
      for old in glob.glob(os.path.join(DEPLOY, "native", "binary_conv-*.so")):
        if old != output:
          os.remove(old)
    try:
      native_build.compile_library(native_build.VENDORED_INCLUDE, output)
    except native_build.NativeUnavailable as e:
      self.warn(f"the native XOR-popcount kernel is not built ({e}); packed "
                "models will compile it on first use, or run on the "
                "pure-JAX path")
      return
    if not self.editable_mode:
      self._outputs.append(output)

  def get_outputs(self):
    return self._outputs

  def get_output_mapping(self):
    return {}


class Build(build):
  sub_commands = build.sub_commands + [("build_kernel", None)]


class PlatformDistribution(setuptools.Distribution):
  """Built for this platform: the wheel may hold the compiled kernel."""

  def has_ext_modules(self):
    return True


class BdistWheel(bdist_wheel):
  """Tagged for this platform and any Python 3: the kernel is loaded with
  ctypes, not imported, so it does not depend on Python's ABI."""

  def get_tag(self):
    return ("py3", "none", super().get_tag()[2])


setuptools.setup(distclass=PlatformDistribution,
                 cmdclass={"build": Build, "build_kernel": BuildKernel,
                           "bdist_wheel": BdistWheel})
