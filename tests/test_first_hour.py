"""What a newcomer meets first: typos get one line with the nearest names
(no traceback unless ``--debug``), and the Python API applies the XLA
flags the commands apply."""

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from ir2net_jax.backend import policy, xla_cpu
from ir2net_jax.configs import get_config
from ir2net_jax.tools import command_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv, want", [
    (["--config=digit:smoke"], "no recipe or file 'digit'; did you mean "
     "'digits'? The recipes: digits, cifar10_resnet20"),
    (["--config=configs/digts.py"], "did you mean 'digits'?"),
    (["--config=digits:smoke", "--config.batchsize=8"],
     "--config.batchsize: digits:smoke has no such field; did you mean "
     "--config.batch_size"),
    (["--config=digits:smoke", "--config.model_kwargs.num_blok=2"],
     "did you mean --config.model_kwargs.num_blocks"),
    (["--config=digits:smoke", "--config.batch_size=8",
      "--config.model_kwargs.num_blocks=(1,1,1)"], None),
    (["--workdir=x"], None),
])
def test_config_typos_are_named_with_the_nearest_names(argv, want):
  got = command_line.config_typo(["prog"] + argv)
  if want is None:
    assert got is None
  else:
    assert want in got, got


def _launch(*args, timeout=120):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), *args,
       "--workdir=/nonexistent/never_made"], capture_output=True, text=True,
      timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)


@pytest.mark.slow
def test_typos_on_the_command_line_give_one_line_not_a_traceback():
  for args, want in (
      (["--config=digit:smoke"], "did you mean 'digits'?"),
      (["--config=digits:smoke", "--config.batchsize=8"],
       "did you mean --config.batch_size"),
      (["--config=digits:smoke", "--config.batch_size=abc"],
       "--config.batch_size=abc: invalid literal for int()")):
    done = _launch(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines()
              if line.startswith("error: ")]
    assert len(errors) == 1 and want in errors[0], done.stderr[-2000:]
  debug = _launch("--config=digits:smoke", "--config.batchsize=8", "--debug")
  assert "Traceback" in debug.stderr and debug.returncode != 0


@pytest.mark.slow
def test_a_missing_checkpoint_or_bucket_is_one_line_in_every_command(
    tmp_path):
  missing = str(tmp_path / "no_run")
  for module, args, want in (
      ("eval", [f"--checkpoint={missing}"], f"--checkpoint={missing}: no "
       "such directory"),
      ("export", [f"--checkpoint={missing}", f"--output={tmp_path}/m"],
       f"--checkpoint={missing}: no such directory"),
      ("export", [f"--checkpoint={missing}", "--output=s3://b/m"],
       "needs s3fs" if importlib.util.find_spec("s3fs") is None else
       "s3://b"),
      ("visualize", [f"--checkpoint={missing}", f"--output={tmp_path}/p",
                     f"--images={ROOT}/README.md"],
       "no such directory")):
    done = subprocess.run(
        [sys.executable, "-m", f"ir2net_jax.tools.{module}", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 1, (module, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines()
              if line.startswith("error: ")]
    assert len(errors) == 1 and want in errors[0], done.stderr[-2000:]


def test_the_api_applies_the_commands_xla_flags(monkeypatch):
  config = get_config("cifar10_resnet20")
  assert policy.xla_cpu_flags(config, cpu_count=2) == xla_cpu.EIGEN_CONV_FLAGS
  # Here JAX has run already: the flags cannot apply, and it says so once.
  jax.devices()
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  warned = []
  monkeypatch.setattr(policy.logging, "warning",
                      lambda msg, *args: warned.append(msg % args))
  monkeypatch.setattr(policy, "_WARNED_FLAGS", set())
  assert policy.apply_xla_cpu_flags(config) is None
  assert policy.apply_xla_cpu_flags(config) is None
  assert len(warned) == 1 and xla_cpu.EIGEN_CONV_FLAGS in warned[0]
  # In a fresh process, train_and_evaluate applies them before JAX starts.
  code = ("import os, ir2net_jax\n"
          "from ir2net_jax.backend import policy\n"
          "c = ir2net_jax.get_config('cifar10_resnet20')\n"
          "print(policy.apply_xla_cpu_flags(c), os.environ['XLA_FLAGS'])\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, cwd=ROOT, check=True, timeout=120,
                        env={k: v for k, v in os.environ.items()
                             if k != "XLA_FLAGS"})
  assert done.stdout.split() == [xla_cpu.EIGEN_CONV_FLAGS] * 2


def test_the_progress_line_shows_the_loss_and_top1(monkeypatch):
  from ir2net_jax.train import metric_writer  # pylint: disable=g-import-not-at-top

  class Writer:
    def write_scalars(self, step, scalars):
      del step, scalars

  lines = []
  monkeypatch.setattr(metric_writer.logging, "info",
                      lambda msg, *args: lines.append(msg % args))
  clock = iter([0.0, 1.0, 2.0])
  monkeypatch.setattr(metric_writer.time, "monotonic", lambda: next(clock))
  report = metric_writer.ReportProgress(num_train_steps=10, writer=Writer(),
                                        every_steps=2)
  report(1)   # the first step compiles: no line
  report.latest({"loss": 2.3456, "top1": 0.125, "grad_norm": 3.0})
  report(2)
  assert lines == ["step 2/10: loss 2.346, top-1 0.125, 1 steps/s, 20.0%, "
                   "ETA 0h00m08s, 0% waiting for input"]
