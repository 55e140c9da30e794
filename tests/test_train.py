"""The training system: devices, hosts, resume, two stages, clear errors."""

import os
import signal
import socket
import subprocess
import sys
import time

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

import train_utils
from configs import imagenet as imagenet_config
from ir2net_jax import checkpoints, convert, data, models, optim, parallel, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_IR2NET = (1, 1, 1, 1)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds_digits"))
  data.dataset_info(train_utils.tiny_digits_config(path))
  return path


def _run_steps(devices, steps=3, global_batch=16):
  config = train_utils.tiny_digits_config(None)
  model = train.build_model(config, 10, parallel.AXIS)
  variables = train.init_variables(model, 32, 0)
  tx = optim.create_optimizer(config, variables["params"], model, 10)
  mesh = parallel.data_mesh(devices)
  state = parallel.replicate(train.create_train_state(variables, tx), mesh)
  step = train.sharded_train_step(model, tx, config, mesh)
  for i in range(steps):
    batch = jax.device_put(train_utils.random_batch(i, global_batch),
                           parallel.batch_sharding(mesh))
    state, metrics = step(state, batch, {})
  return jax.device_get({"params": state.params,
                         "batch_stats": state.batch_stats}), metrics


def _assert_trees_close(a, b, tol):
  fa = flax.traverse_util.flatten_dict(a, sep="/")
  fb = flax.traverse_util.flatten_dict(b, sep="/")
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=tol, atol=tol, err_msg=k)


def test_eight_devices_train_like_one():
  assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
  one, m1 = _run_steps(jax.devices()[:1])
  eight, m8 = _run_steps(jax.devices()[:8])
  _assert_trees_close(eight, one, 1e-5)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  # And the parameters did move (the comparison is not vacuous).
  init = train.init_variables(
      train.build_model(train_utils.tiny_digits_config(None), 10), 32, 0)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                       one["params"], jax.device_get(init["params"]))
  assert max(jax.tree.leaves(moved)) > 1e-3


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  worker = os.path.join(ROOT, "tests", "multihost_worker.py")

  def env(devices):
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e

  port = _free_port()
  procs = [subprocess.Popen([sys.executable, worker, str(tmp_path / "multi.npz"),
                             str(i), "2", str(port)], env=env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  single = subprocess.run([sys.executable, worker, str(tmp_path / "single.npz"),
                           "0", "1", "0"], env=env(4), capture_output=True,
                          text=True, timeout=300)
  assert single.returncode == 0, single.stdout + single.stderr
  for p in procs:
    out = p.communicate(timeout=300)[0].decode()
    # jaxlib's coordinator can abort while tearing its gRPC server down
    # (DistributedRuntimeService::Shutdown, a known teardown race); that is
    # after every process passed the final barrier, so the run itself is done.
    teardown_abort = (p.returncode == -6 and "WORKER DONE" in out
                      and "DistributedRuntimeService::Shutdown" in out)
    assert p.returncode == 0 or teardown_abort, out[-3000:]
  multi, one = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
  assert multi.files == one.files
  for k in one.files:
    np.testing.assert_allclose(multi[k], one[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)


def _launch(workdir, *overrides, config="configs/digits.py:smoke", **kw):
  return subprocess.Popen(
      [sys.executable, "launch.py", f"--config={config}", f"--workdir={workdir}",
       *overrides], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1"), **kw)


def _final_state(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    step = m.latest_step()
    state = m.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  leaves = jax.tree_util.tree_flatten_with_path(
      {"params": state["params"], "batch_stats": state["batch_stats"],
       "opt_state": state["opt_state"]})[0]
  return step, {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def test_sigkill_and_resume_is_bit_identical(tmp_path, digits_dir):
  steps = 16
  args = (f"--config.data_dir={digits_dir}", f"--config.num_train_steps={steps}",
          "--config.checkpoint_every_steps=2", "--config.log_every_steps=2")
  ref = _launch(tmp_path / "ref", *args)
  out, _ = ref.communicate(timeout=600)
  assert ref.returncode == 0, out.decode()[-3000:]

  killed_dir = tmp_path / "killed"
  proc = _launch(killed_dir, *args)
  ckpt_dir = killed_dir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in (os.listdir(ckpt_dir) if ckpt_dir.exists() else [])
            if d.isdigit() and int(d) >= 4]
    if done:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with ocp.CheckpointManager(str(ckpt_dir)) as m:
    killed_at = m.latest_step()
  assert killed_at is not None and killed_at < steps
  resumed = _launch(killed_dir, *args)
  out, _ = resumed.communicate(timeout=600)
  log = out.decode()
  assert resumed.returncode == 0, log[-3000:]
  assert f"resumed from step {killed_at}" in log
  step_a, a = _final_state(tmp_path / "ref")
  step_b, b = _final_state(killed_dir)
  assert step_a == step_b == steps
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


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
  fresh = flax.traverse_util.flatten_dict(jax.device_get(train.init_variables(
      train.build_model(config, 10 if config.dataset == "cifar10" else 1000),
      config.image_size, config.seed)["params"]), sep="/")
  assert max(float(np.max(np.abs(s1[k] - fresh[k]))) for k in s1) > 1e-4


def test_stage1_then_stage2_cifar10_mock(tmp_path):
  mock = train_utils.mock_data_dir(str(tmp_path / "tfds"))
  base = dict(dataset="cifar10", data_dir=mock, batch_size=8,
              eval_batch_size=8, num_train_steps=2, num_epochs=1,
              log_every_steps=1, image_size=32, optimizer="adam",
              learning_rate=1e-3, weight_decay_rule="conv_or_4d")
  with tfds.testing.mock_data(num_examples=12, data_dir=mock):
    c1 = _tiny_ir2net_config(train_utils.tiny_digits_config(mock), **base,
                             model="ir2net_c", stage=1)
    s1 = train.train_and_evaluate(c1, str(tmp_path / "run" / "stage1"))
    c2 = _tiny_ir2net_config(train_utils.tiny_digits_config(mock), **base,
                             model="ir2net_c", stage=2)
    c2.learning_rate = 1e-30
    c2.weight_decay = 0.0
    s2 = train.train_and_evaluate(c2, str(tmp_path / "run" / "stage2"))
  assert s1["stage"] == 1 and s2["stage"] == 2 and s2["steps"] == 2
  _check_stage2_starts_from_stage1(tmp_path / "run", c1)


def test_stage1_then_stage2_imagenet_mock_with_teacher(tmp_path):
  mock = train_utils.mock_data_dir(str(tmp_path / "tfds"))
  teacher = models.create_model("teacher_resnet34", num_blocks=TINY_IR2NET)
  teacher_dir = str(tmp_path / "teacher")
  convert.save_variables(teacher_dir, jax.device_get(
      train.init_variables(teacher, 32, 1)))
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
      summaries.append(train.train_and_evaluate(c, str(runs / f"stage{stage}")))
  assert [s["stage"] for s in summaries] == [1, 2]
  assert os.path.exists(runs / "stage2" / "summary.json")
  _check_stage2_starts_from_stage1(runs, c)
  # The teacher is never part of the student's checkpoint.
  assert not any("teacher" in k for k in _params(runs / "stage2"))


def _workdir_listing(path):
  return sorted(os.path.relpath(os.path.join(d, f), path)
                for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def workdir(tmp_path):
  path = tmp_path / "work"
  path.mkdir()
  (path / "notes.txt").write_text("keep me")
  return path


@pytest.fixture
def no_compile(monkeypatch):
  """Makes any compilation fail, so errors must come before it."""
  # train_and_evaluate imports these lazily (they need TensorFlow); clu
  # decorates functions with jax.jit at import, which compiles nothing.
  import clu.periodic_actions  # pylint: disable=g-import-not-at-top,unused-import

  def boom(*a, **k):
    raise AssertionError("compiled before reporting the error")
  monkeypatch.setattr(jax, "jit", boom)


@pytest.mark.parametrize("override,message", [
    ({"optimizer": "rmsprop"}, "config.optimizer='rmsprop'"),
    ({"model": "resnet9000"}, "config.model='resnet9000' is not a model"),
    ({"batch_size": 12}, "not divisible by the 8 devices"),
    ({"loss": "distillation", "teacher_checkpoint": ""}, "needs a teacher"),
    ({"binary_compute_dtype": "int9"}, "config.binary_compute_dtype='int9' "
                                       "is not a dtype"),
])
def test_bad_values_fail_early_and_leave_workdir(override, message, workdir,
                                                 digits_dir, no_compile):
  c = train_utils.tiny_digits_config(digits_dir, **override)
  with pytest.raises(train.ConfigError, match=message.replace("(", r"\(")):
    train.train_and_evaluate(c, str(workdir))
  assert _workdir_listing(workdir) == ["notes.txt"]


def test_missing_data_fails_early(tmp_path, workdir, no_compile):
  c = train_utils.tiny_digits_config(str(tmp_path / "empty"), dataset="cifar10")
  with pytest.raises(data.DataError, match="tfds build cifar10"):
    train.train_and_evaluate(c, str(workdir))
  assert _workdir_listing(workdir) == ["notes.txt"]


def test_missing_stage1_checkpoint_names_the_path(tmp_path, workdir,
                                                  digits_dir, no_compile):
  c = _tiny_ir2net_config(train_utils.tiny_digits_config(digits_dir),
                          model="ir2net_a", stage=2)
  with pytest.raises(checkpoints.CheckpointError,
                     match=str(tmp_path / "stage1")):
    train.train_and_evaluate(c, str(workdir))
  assert _workdir_listing(workdir) == ["notes.txt"]


def test_stage1_of_another_model_is_refused(tmp_path, digits_dir):
  c1 = _tiny_ir2net_config(train_utils.tiny_digits_config(digits_dir),
                           model="ir2net_a", stage=1, num_train_steps=1)
  train.train_and_evaluate(c1, str(tmp_path / "stage1"))
  c2 = _tiny_ir2net_config(train_utils.tiny_digits_config(digits_dir),
                           model="ir2net_d", stage=2)
  with pytest.raises(checkpoints.CheckpointError, match="ir2net_a"):
    train.train_and_evaluate(c2, str(tmp_path / "stage2"))
  assert not (tmp_path / "stage2").exists()


def test_launcher_rejects_unknown_field_before_touching_workdir(workdir):
  p = _launch(workdir, "--config.no_such_field=3")
  out, _ = p.communicate(timeout=120)
  assert p.returncode != 0
  assert "no_such_field" in out.decode()
  assert _workdir_listing(workdir) == ["notes.txt"]


def test_launcher_smoke_run_writes_summary_and_tensorboard(tmp_path, digits_dir):
  p = _launch(tmp_path / "w", f"--config.data_dir={digits_dir}")
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out.decode()[-3000:]
  summary = __import__("json").loads((tmp_path / "w" / "summary.json").read_text())
  assert summary["steps"] == 6 and summary["name"] == "digits_resnet20"
  assert 0 <= summary["final_eval_top1"] <= 1
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "w"))
  assert "steps/s" in out.decode() or "steps_per_sec" in out.decode()
