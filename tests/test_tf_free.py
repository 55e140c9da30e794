"""The compute path works where TensorFlow is not installed (GPU images,
Colab TPU runtimes): only the input pipeline imports it."""

import os
import subprocess
import sys

import pytest

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
config.model_kwargs.num_blocks = (1, 1, 1, 1)
config.teacher_kwargs.num_blocks = (1, 1, 1, 1)
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
