"""The training system: devices, hosts, resume, two stages, clear errors."""

import os
import re
import subprocess
import sys

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
import tensorflow_datasets as tfds

import train_utils
from ir2net_jax.configs import imagenet as imagenet_config
from ir2net_jax import data, models
from ir2net_jax.train import loop, step as step_lib
from ir2net_jax.io import checkpoints, weights

TINY_IR2NET = (1, 1, 1, 1)


def _run_steps(devices, steps=3, global_batch=16):
  """A few float64 train steps of the tiny digits model on ``devices``
  (float64: with other devices the sums round in another order)."""
  return train_utils.float64_steps(
      train_utils.tiny_digits_config(None), devices,
      [train_utils.random_batch(i, global_batch) for i in range(steps)])


def _assert_trees_close(a, b, tol):
  fa = flax.traverse_util.flatten_dict(a, sep="/")
  fb = flax.traverse_util.flatten_dict(b, sep="/")
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.slow
def test_eight_devices_train_like_one():
  assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
  one, m1 = _run_steps(jax.devices()[:1])
  eight, m8 = _run_steps(jax.devices()[:8])
  _assert_trees_close(eight, one, 1e-10)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-10)
  # And the parameters did move (the comparison is not vacuous).
  init = models.init_variables(
      step_lib.build_model(train_utils.tiny_digits_config(None), 10), 32, 0)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                       one["params"], jax.device_get(init["params"]))
  assert max(jax.tree.leaves(moved)) > 1e-3


_launch = train_utils.launch


def _tiny_ir2net_config(base, **overrides):
  base.model_kwargs = ml_collections.ConfigDict({"num_blocks": TINY_IR2NET})
  base.update(overrides)
  return base


def _params(workdir, sub="checkpoints"):
  return _final_state_params(os.path.join(workdir, sub))


def _final_state_params(directory):
  with ocp.CheckpointManager(directory) as m:
    state = m.restore(m.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  return flax.traverse_util.flatten_dict(state["params"], sep="/")


def _check_stage2_starts_from_stage1(run_dir, config):
  """Stage 2 with a vanishing learning rate ends where stage 1 ended."""
  s1, s2 = _params(run_dir / "stage1"), _params(run_dir / "stage2")
  assert s1.keys() == s2.keys()
  for k in s1:
    np.testing.assert_allclose(s2[k], s1[k], atol=1e-9, err_msg=k)
  fresh = flax.traverse_util.flatten_dict(jax.device_get(models.init_variables(
      step_lib.build_model(config, 10 if config.dataset == "cifar10" else 1000),
      config.image_size, config.seed)["params"]), sep="/")
  assert max(float(np.max(np.abs(s1[k] - fresh[k]))) for k in s1) > 1e-4


@pytest.mark.slow
def test_stage1_then_stage2_cifar10_mock(tmp_path):
  mock = train_utils.mock_data_dir(str(tmp_path / "tfds"))
  base = dict(dataset="cifar10", data_dir=mock, batch_size=8,
              eval_batch_size=8, num_train_steps=2, num_epochs=1,
              log_every_steps=1, image_size=32, optimizer="adam",
              learning_rate=1e-3, weight_decay_rule="conv_or_4d")
  with tfds.testing.mock_data(num_examples=12, data_dir=mock):
    c1 = _tiny_ir2net_config(train_utils.tiny_digits_config(mock), **base,
                             model="ir2net_c", stage=1)
    s1 = loop.train_and_evaluate(c1, str(tmp_path / "run" / "stage1"))
    c2 = _tiny_ir2net_config(train_utils.tiny_digits_config(mock), **base,
                             model="ir2net_c", stage=2)
    c2.learning_rate = 1e-30
    c2.weight_decay = 0.0
    s2 = loop.train_and_evaluate(c2, str(tmp_path / "run" / "stage2"))
  assert s1["stage"] == 1 and s2["stage"] == 2 and s2["steps"] == 2
  _check_stage2_starts_from_stage1(tmp_path / "run", c1)


@pytest.mark.slow
def test_stage1_then_stage2_imagenet_mock_with_teacher(tmp_path):
  mock = train_utils.mock_data_dir(str(tmp_path / "tfds"))
  teacher = models.create_model("teacher_resnet34", num_blocks=TINY_IR2NET)
  teacher_dir = str(tmp_path / "teacher")
  weights.save_variables(teacher_dir, jax.device_get(
      models.init_variables(teacher, 32, 1)))
  runs = tmp_path / "ir2net_b"
  with tfds.testing.mock_data(num_examples=10, data_dir=mock):
    summaries = []
    for stage in (1, 2):
      c = imagenet_config.get_config(f"b,stage={stage},smoke")
      c = _tiny_ir2net_config(c, data_dir=mock, image_size=32, batch_size=8,
                              eval_batch_size=8, teacher_checkpoint=teacher_dir)
      c.teacher_kwargs = ml_collections.ConfigDict({"num_blocks": TINY_IR2NET})
      if stage == 2:
        c.learning_rate = 1e-30
      summaries.append(loop.train_and_evaluate(c, str(runs / f"stage{stage}")))
  assert [s["stage"] for s in summaries] == [1, 2]
  assert os.path.exists(runs / "stage2" / "summary.json")
  _check_stage2_starts_from_stage1(runs, c)
  # The teacher is never part of the student's checkpoint.
  assert not any("teacher" in k for k in _params(runs / "stage2"))


def _workdir_listing(path):
  return sorted(os.path.relpath(os.path.join(d, f), path)
                for d, _, fs in os.walk(path) for f in fs)


def test_missing_data_fails_early(tmp_path, workdir, no_compile):
  c = train_utils.tiny_digits_config(str(tmp_path / "empty"), dataset="cifar10")
  with pytest.raises(data.DataError, match="tfds build cifar10"):
    loop.train_and_evaluate(c, str(workdir))
  assert _workdir_listing(workdir) == ["notes.txt"]


def test_missing_stage1_checkpoint_names_the_path(tmp_path, workdir,
                                                  digits_dir, no_compile):
  c = _tiny_ir2net_config(train_utils.tiny_digits_config(digits_dir),
                          model="ir2net_a", stage=2)
  with pytest.raises(checkpoints.CheckpointError,
                     match=str(tmp_path / "stage1")):
    loop.train_and_evaluate(c, str(workdir))
  assert _workdir_listing(workdir) == ["notes.txt"]


@pytest.mark.slow
def test_stage1_of_another_model_is_refused(tmp_path, digits_dir):
  c1 = _tiny_ir2net_config(train_utils.tiny_digits_config(digits_dir),
                           model="ir2net_a", stage=1, num_train_steps=1)
  loop.train_and_evaluate(c1, str(tmp_path / "stage1"))
  c2 = _tiny_ir2net_config(train_utils.tiny_digits_config(digits_dir),
                           model="ir2net_d", stage=2)
  with pytest.raises(checkpoints.CheckpointError, match="ir2net_a"):
    loop.train_and_evaluate(c2, str(tmp_path / "stage2"))
  assert not (tmp_path / "stage2").exists()


def test_launcher_rejects_unknown_field_before_touching_workdir(workdir):
  p = _launch(workdir, "--config.no_such_field=3")
  out, _ = p.communicate(timeout=120)
  assert p.returncode != 0
  assert "no_such_field" in out.decode()
  assert _workdir_listing(workdir) == ["notes.txt"]


@pytest.mark.slow
def test_launcher_smoke_run_writes_summary_and_tensorboard(tmp_path, digits_dir):
  """... and ``ir2net_jax.train_and_evaluate`` from Python, in a process of
  its own at the same time, computes the same run (it applies the XLA
  flags the command applies)."""
  p = _launch(tmp_path / "w", f"--config.data_dir={digits_dir}")
  api = subprocess.Popen(
      [sys.executable, "-c", "import sys, ir2net_jax\n"
       "c = ir2net_jax.get_config('digits:smoke')\n"
       "c.data_dir = sys.argv[2]\n"
       "ir2net_jax.train_and_evaluate(c, sys.argv[1])\n",
       str(tmp_path / "api"), str(digits_dir)], cwd=train_utils.ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=train_utils.ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  out, _ = p.communicate(timeout=300)
  api_out, _ = api.communicate(timeout=300)
  assert p.returncode == 0, out.decode()[-3000:]
  assert api.returncode == 0, api_out.decode()[-3000:]
  step, state = train_utils.final_state(tmp_path / "w")
  api_step, api_state = train_utils.final_state(tmp_path / "api")
  assert step == api_step == 6 and state.keys() == api_state.keys()
  for k in state:
    np.testing.assert_array_equal(state[k], api_state[k], err_msg=k)
  summary = __import__("json").loads((tmp_path / "w" / "summary.json").read_text())
  assert summary["steps"] == 6 and summary["name"] == "digits_resnet20"
  assert 0 <= summary["final_eval_top1"] <= 1
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "w"))
  # A console a person reads: a header, progress lines with the loss and
  # top-1, short lines, no TensorFlow (nor its banners), no config dump.
  lines = out.decode().replace(str(tmp_path), "TMP").replace(
      str(digits_dir), "DATA").replace(train_utils.ROOT, "ROOT").splitlines()
  assert [l[11:] for l in lines[:3]] == [
      "ROOT/configs/digits.py:smoke: cifar_resnet20 on digits, "
      "batch 16", "data_dir: DATA", "workdir: TMP/w"], lines[:3]
  assert any(re.search(r"step \d+/6: loss [\d.]+, top-1 [\d.]+, .* steps/s, "
                       r".*ETA", line) for line in lines), lines
  assert max(map(len, lines)) <= 160, max(lines, key=len)  # paths aside
  assert not [l for l in lines if re.search(r"tensorflow|onednn", l, re.I)]
  assert not [l for l in lines if l.startswith("momentum:")]
  assert "done: 6 steps, eval top-1" in lines[-1], lines[-1]
  # The curves, drawn at the end of the run.
  png = Image.open(tmp_path / "w" / "curves.png")
  assert png.size[0] > 800 and len(np.unique(np.asarray(png.convert("L")))) > 10
