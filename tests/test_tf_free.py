"""The compute path works where TensorFlow is not installed (GPU images,
Colab TPU runtimes): only the input pipeline imports it."""

import json
import os
import subprocess
import sys

import pytest

import train_utils

_STEP_WITHOUT_TF = r"""
import importlib.abc
import sys


class NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
      raise ImportError(f"No module named {name!r} (hidden by the test)")


sys.meta_path.insert(0, NoTensorFlow())

import jax
import numpy as np

import ir2net_jax
from ir2net_jax import models
from ir2net_jax.nn import objective
from ir2net_jax.train import optim, parallel, step as step_lib
from ir2net_jax.configs import imagenet

config = imagenet.get_config("a,stage=2")
config.model_kwargs.num_blocks = (1, 0, 0, 0)   # light: train_utils.LIGHT
config.information_recovery = False
config.teacher_kwargs.num_blocks = (1, 0, 0, 0)
config.image_size, config.batch_size = 32, 2
mesh = parallel.data_mesh(jax.devices()[:1])
model = step_lib.build_model(config, 10, parallel.AXIS)
teacher = step_lib.build_teacher(config, 10)
variables = models.init_variables(model, 32, 0)
tx = optim.create_optimizer(config, variables["params"], model, 10)
state = parallel.replicate(step_lib.create_train_state(variables, tx), mesh)
teacher_vars = parallel.replicate(models.init_variables(teacher, 32, 1), mesh)
rng = np.random.default_rng(0)
batch = jax.device_put(
    {"image": rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
     "label": rng.integers(0, 10, 2).astype(np.int32)},
    parallel.batch_sharding(mesh))
step = step_lib.sharded_train_step(model, tx, config, mesh, teacher)
state, metrics = step(state, batch, teacher_vars)
assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))

# The run's TensorBoard files, written without TensorFlow.
import os, tempfile
from ir2net_jax.train import metric_writer, run_metrics
logdir = tempfile.mkdtemp()
writer = metric_writer.MetricWriter(logdir)
writer.write_hparams({"model": config.model, "batch_size": 2})
writer.write_scalars(1, {"train_loss": float(metrics["loss"])})
writer.write_images(1, {"restriction": np.zeros((1, 4, 4, 3), np.uint8)})
writer.write_histograms(1, {"kept": np.ones(8)})
writer.close()
assert run_metrics.read_scalars(logdir)["train_loss"][0][0] == 1
hidden = sorted(m for m in sys.modules
                if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
assert not hidden, hidden
print("OK", float(metrics["loss"]))
"""


@pytest.mark.slow
def test_train_step_without_tensorflow(tmp_path):
  script = tmp_path / "step_without_tf.py"
  script.write_text(_STEP_WITHOUT_TF)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS="")
  p = subprocess.run([sys.executable, str(script)], env=env, cwd=root,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.startswith("OK")


def _without_tensorflow(tmp_path):
  """The repository root, and an environment whose processes (2 CPU devices
  each) find no TensorFlow."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  site = train_utils.site_without_tensorflow(tmp_path / "site")
  return root, dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{root}",
                    JAX_PLATFORMS="cpu",
                    XLA_FLAGS="--xla_force_host_platform_device_count=2")


@pytest.mark.slow
def test_launch_trains_evaluates_and_resumes_digits_without_tensorflow(
    tmp_path):
  """The README's run (its network light, ``train_utils.LIGHT``),
  TensorFlow absent: train, evaluate, checkpoint, pictures, TensorBoard and
  summary.json, then a resume and ir2net-eval."""
  from ir2net_jax.train import run_metrics  # pylint: disable=g-import-not-at-top
  root, env = _without_tensorflow(tmp_path)
  workdir = tmp_path / "run"

  def run(*args):
    p = subprocess.run([sys.executable, *args], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout + p.stderr

  assert "absent" in run("-c", "import importlib.util\n"
                         "assert importlib.util.find_spec('tensorflow') is None"
                         "\ntry:\n  import tensorflow\nexcept ImportError:\n"
                         "  print('absent')")
  log = run("launch.py", "--config=configs/digits.py:smoke",
            f"--workdir={workdir}", "--config.num_train_steps=4",
            "--config.checkpoint_every_steps=2", *train_utils.LIGHT)
  assert "input engine: device" in log and "No module named" not in log
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  log = run("launch.py", "--config=configs/digits.py:smoke",
            f"--workdir={workdir}", "--config.num_train_steps=6",
            "--config.checkpoint_every_steps=2", *train_utils.LIGHT)
  assert "resumed from step 4" in log
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 6 and summary["devices"] == 2
  assert 0 <= summary["final_eval_top1"] <= 1
  scalars = run_metrics.read_scalars(str(workdir))
  assert [s for s, _ in scalars["train_loss"]] == [2, 4, 6]
  assert [s for s, _ in scalars["eval_top1"]] == [4, 6]
  assert scalars["eval_count"][-1][1] == 360
  assert sorted(os.listdir(workdir / "restriction")) == [
      "step_000004.png", "step_000006.png"]
  # The event files hold the pictures and the histograms too.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(workdir))
  acc.Reload()
  plugins = {acc.SummaryMetadata(t).plugin_data.plugin_name
             for t in acc.Tags()["tensors"]}
  assert {"scalars", "images", "histograms"} <= plugins, plugins
  # ir2net-eval of the best checkpoint, still without TensorFlow.
  out = tmp_path / "eval.json"
  run("-m", "ir2net_jax.tools.eval", f"--checkpoint={workdir / 'best'}",
      f"--output={out}")
  result = json.loads(out.read_text())
  assert result["count"] == 360
  assert abs(result["top1"] - max(v for _, v in scalars["eval_top1"])) < 1e-6


@pytest.mark.slow
def test_launch_trains_and_resumes_on_a_folder_with_grain_without_tensorflow(
    tmp_path):
  """A folder of JPEGs through launch.py with TensorFlow absent: the grain
  engine with 2 worker processes, the windows resized on the devices (what
  'auto' does on a GPU); a run stopped at step 4 and resumed ends
  bit-identical to one that never stopped."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import photos  # pylint: disable=g-import-not-at-top
  import train_utils  # pylint: disable=g-import-not-at-top
  root, env = _without_tensorflow(tmp_path)
  tree = photos.write_tree(str(tmp_path / "tree"), {"train": 8, "test": 4},
                           [(60, 80), (80, 60), (70, 70)])
  args = ["launch.py", "--config=configs/digits.py:smoke",
          f"--config.dataset=folder:{tree}", "--config.image_size=32",
          "--config.batch_size=8", "--config.input_workers=2",
          "--config.checkpoint_every_steps=2", "--config.flip=True",
          "--config.input_resize=device", *train_utils.LIGHT]

  def run(workdir, steps):
    p = subprocess.run([sys.executable, *args, f"--workdir={workdir}",
                        f"--config.num_train_steps={steps}"], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    return log

  log = run(tmp_path / "whole", 6)
  assert "input engine: grain" in log and "2 worker processes" in log
  assert "imagenet recipe" in log   # the images are of several sizes
  assert "train windows resized on the device" in log
  run(tmp_path / "resumed", 4)
  assert "resumed from step 4" in run(tmp_path / "resumed", 6)
  step_w, whole = train_utils.final_state(tmp_path / "whole")
  step_r, resumed = train_utils.final_state(tmp_path / "resumed")
  assert step_w == step_r == 6 and whole.keys() == resumed.keys()
  for k in whole:
    np.testing.assert_array_equal(resumed[k], whole[k], err_msg=k)
  summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
  assert summary["dataset"] == f"folder:{tree}"
  assert 0 <= summary["final_eval_top1"] <= 1
