"""``pip install`` of the package, offline, three ways: from the source tree,
editable (``-e``), and from a git URL; each into a fresh virtual environment
that sees this interpreter's packages (jax, flax, pip, setuptools, ...), so
nothing is downloaded. From outside the checkout, the installed package must
import, build the recipes, and run its console scripts. The source and
editable installs compile the native kernel into the package with this
machine's C++ compiler; the git install is made with no compiler on PATH."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import venv

import pytest

from ir2net_jax import configs
from ir2net_jax.deploy import native_build
from ir2net_jax.models import costs, create_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ("ir2net-train", "ir2net-eval", "ir2net-convert", "ir2net-costs",
           "ir2net-benchmark", "ir2net-preresize", "ir2net-check-data",
           "ir2net-curves", "ir2net-predict", "ir2net-export")
MODES = ("source", "editable", "git")

_CHECK = r"""
import importlib.metadata
import json

import ir2net_jax
from ir2net_jax import configs

dist = importlib.metadata.distribution("ir2net_jax")
print(json.dumps({
    "file": ir2net_jax.__file__,
    "version": dist.version,
    "direct_url": json.loads(dist.read_text("direct_url.json")),
    "config": configs.get_config("imagenet:c,stage=2").to_json(),
}))
"""


def _env():
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "VIRTUAL_ENV")
         and not k.startswith("PIP_")}
  return dict(env, JAX_PLATFORMS="cpu", PIP_DISABLE_PIP_VERSION_CHECK="1",
              PIP_NO_INPUT="1")


def _run(args, cwd, env=None, **kwargs):
  return subprocess.run([str(a) for a in args], cwd=cwd,
                        env=dict(_env(), **(env or {})), capture_output=True,
                        text=True, timeout=120, **kwargs)


def _without_compiler(path: pathlib.Path, *tools: str):
  """Variables that leave no C++ compiler to find: ``PATH`` is ``path``,
  holding links to ``tools`` alone."""
  path.mkdir(exist_ok=True)
  for tool in tools:
    (path / tool).symlink_to(shutil.which(tool))
  return {"PATH": str(path), "CXX": ""}


def _snapshot(path: pathlib.Path) -> str:
  """A one-commit git repository of the checkout's files as they are now
  (a clean checkout in CI, uncommitted edits in a working tree), so that
  neither the in-tree builds nor pip's clone touch the checkout; its commit.
  """
  listed = subprocess.run(
      ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
      cwd=ROOT, capture_output=True, text=True)
  if listed.returncode == 0:
    for name in listed.stdout.split("\0"):
      if name and (ROOT / name).is_file():   # not deleted in the tree
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, path / name)
  else:   # not a git checkout (an unpacked archive)
    shutil.copytree(ROOT, path, dirs_exist_ok=True, ignore=(
        shutil.ignore_patterns(".git", "*venv", "__pycache__", "build",
                               "*.egg-info", ".pytest_cache", "workdir*",
                               "runs")))
  git = ["git", "-c", "user.name=test", "-c", "user.email=test@local",
         "-c", "commit.gpgsign=false"]
  for args in (["init", "-q"], ["add", "-A"],
               ["commit", "-q", "-m", "snapshot"]):
    subprocess.run(git + args, cwd=path, check=True, capture_output=True)
  return subprocess.run(git + ["rev-parse", "HEAD"], cwd=path, check=True,
                        capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  path = tmp_path_factory.mktemp("source")
  return path, _snapshot(path)


def _install(mode, src, env_dir):
  """Installs ``src`` into a new venv at ``env_dir``: its site-packages."""
  venv.EnvBuilder(with_pip=False).create(env_dir)
  python = env_dir / "bin" / "python"
  site = pathlib.Path(_run([python, "-c", "import sysconfig; print("
                            "sysconfig.get_paths()['purelib'])"],
                           env_dir, check=True).stdout.strip())
  # After the venv's own site-packages: an installed ir2net_jax wins.
  ours = [p for p in sys.path
          if os.path.basename(p) in ("site-packages", "dist-packages")
          and os.path.isdir(p)]
  (site / "_running_interpreter.pth").write_text("import site; " + "; ".join(
      f"site.addsitedir({p!r})" for p in ours) + "\n")
  # The git install is made where there is no C++ compiler.
  env = (_without_compiler(env_dir / "git_only", "git") if mode == "git"
         else None)
  target = {"source": [src], "editable": ["-e", src],
            # pip's URL check wants a host: file://localhost/..., which git
            # reads as file:///...
            "git": [f"ir2net_jax @ git+file://localhost{src}"]}[mode]
  pip = _run([python, "-m", "pip", "install", "--no-deps",
              "--no-build-isolation", "--no-index", *target], env_dir, env)
  assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
  return site


@pytest.fixture(scope="module")
def install(source, tmp_path_factory):
  """``install(mode) -> (venv directory, its site-packages)``, once a mode."""
  done = {}

  def get(mode):
    if mode not in done:
      env_dir = tmp_path_factory.mktemp(f"venv_{mode}")
      done[mode] = env_dir, _install(mode, source[0], env_dir)
    return done[mode]
  return get


@pytest.mark.parametrize("mode", MODES)
def test_imports_from_anywhere_with_recipes_and_scripts(install, source, mode,
                                                        tmp_path):
  env_dir, site = install(mode)
  src, commit = source
  proc = _run([env_dir / "bin" / "python", "-c", _CHECK], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout)
  home = src if mode == "editable" else site
  assert pathlib.Path(got["file"]) == home / "ir2net_jax" / "__init__.py"
  assert got["version"] == "0.1.0"
  assert got["config"] == configs.get_config("imagenet:c,stage=2").to_json()
  if mode == "git":
    assert got["direct_url"]["vcs_info"] == {
        "vcs": "git", "commit_id": commit}
  else:
    assert got["direct_url"]["url"] == src.as_uri()
    assert got["direct_url"]["dir_info"] == (
        {"editable": True} if mode == "editable" else {})
  for script in SCRIPTS:
    assert os.access(env_dir / "bin" / script, os.X_OK), script

  out = _run([env_dir / "bin" / "ir2net-costs", "--model=cifar_resnet20"],
             tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = costs.summarize(create_model("cifar_resnet20"), (1, 32, 32, 3),
                            name="cifar_resnet20")
  assert out.stdout == costs.format_summary(summary) + "\n"


def test_wheel_holds_every_module_and_nothing_else(install, source):
  _, site = install("source")
  src = source[0]
  modules = lambda root: sorted(
      str(p.relative_to(root)) for p in (root / "ir2net_jax").rglob("*.py"))
  assert modules(site) == modules(src)
  assert {"ir2net_jax/configs/digits.py", "ir2net_jax/models/cifar.py",
          "ir2net_jax/tools/benchmark/cli.py",
          "ir2net_jax/tools/train.py"} <= set(modules(site))
  # The native kernel: its source, the FFI headers it is compiled against,
  # and the library pip compiled.
  native = site / "ir2net_jax" / "deploy" / "native"
  assert (native / "binary_conv.cc").is_file()
  assert (native / "include" / "xla" / "ffi" / "api" / "ffi.h").is_file()
  if native_build.compiler():
    assert [p.name for p in native.glob("*.so")] == [
        os.path.basename(native_build.packaged_library())]
  record = (site / "ir2net_jax-0.1.0.dist-info" / "RECORD").read_text()
  tops = {line.split("/")[0] for line in record.splitlines()}
  assert tops == {"ir2net_jax", "ir2net_jax-0.1.0.dist-info", ".."}, tops
  assert not (site / "tests").exists() and not (site / "configs").exists()


_KERNEL = r"""
import json
from ir2net_jax.deploy import native, packed
print(json.dumps({
    "library": native.library(),
    "why": native.unavailable_reason(),
    "pure_jax": packed.convolution("auto") is packed.convolution("jax"),
}))
"""


@pytest.mark.parametrize("mode", MODES)
def test_the_kernel_is_compiled_at_install_where_there_is_a_compiler(
    install, source, mode, tmp_path):
  """Run where no compiler is found and the kernel cache is empty: the
  package's own library, or (installed without a compiler) the pure-JAX
  path and one log line that says so."""
  env_dir, site = install(mode)
  cache = tmp_path / "cache"
  proc = _run([env_dir / "bin" / "python", "-c", _KERNEL], tmp_path,
              dict(_without_compiler(tmp_path / "bin"),
                   IR2NET_JAX_CACHE=str(cache)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.splitlines()[-1])
  if mode == "git" or not native_build.compiler():
    assert got["library"] is None and got["pure_jax"], got
    assert "no C++ compiler" in got["why"]
    assert "packed convolutions run on the pure-JAX path" in proc.stderr
  else:
    home = source[0] if mode == "editable" else site
    assert got["library"] == native_build.packaged_library(
        str(home / "ir2net_jax" / "deploy")), got
    assert not got["pure_jax"]
  assert not cache.exists()


@pytest.mark.slow
def test_console_scripts_take_recipe_names(install, tmp_path):
  env_dir, _ = install("source")
  bin_dir = env_dir / "bin"
  workdir = tmp_path / "run"
  bad = _run([bin_dir / "ir2net-train", "--config=digits:smoke",
              "--config.no_such_field=3", f"--workdir={workdir}"], tmp_path)
  assert bad.returncode != 0 and "no_such_field" in bad.stderr, bad.stderr
  assert not workdir.exists()
  helped = _run([bin_dir / "ir2net-train", "--help"], tmp_path)
  assert helped.returncode == 1   # absl's --help exits with status 1
  assert "--config: Recipe name" in helped.stdout
  assert "--workdir" in helped.stdout and "ir2net-train" in helped.stdout

  bench = _run([bin_dir / "ir2net-benchmark", "--recipes=no_such_recipe",
                "--skip_pipeline"], tmp_path)
  assert bench.returncode == 1
  assert "error: unknown recipes ['no_such_recipe']" in bench.stderr

  missing = tmp_path / "no_such_tree"
  shrink = _run([bin_dir / "ir2net-preresize", f"--input={missing}",
                 f"--output={tmp_path / 'small'}"], tmp_path)
  assert shrink.returncode == 2
  assert f"--input {missing} is not a directory" in shrink.stderr
