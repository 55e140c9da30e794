"""Two local processes run ``launch.py`` like one process with as many devices.

The whole loop: per-host input pipelines, a shared data_dir prepared once,
orbax saves from both processes, the evaluation, a preemption that both
processes stop at one step and resume from bit-identically; and two
processes that resume from the step both can read; a stage 2 that one
process cannot start stops both. Loopback addresses only.
"""

import json
import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest

import train_utils
from ir2net_jax.storage import paths

# Long enough that the preemption (one or two steps after step 1) lands
# before the end.
STEPS = 12
PREPARING = "preparing ir2net_digits"


def _two_processes(workdir, data_dir, steps, *overrides, hosts=None):
  """Starts processes 0 and 1 of a run, 2 devices each; with ``hosts`` (two
  empty directories), each starts in its own, which is also its TMPDIR and
  holds its data_dir: no local path in common, as the hosts of a pod."""
  port = train_utils.free_port()
  return [train_utils.launch(
      workdir, f"--config.data_dir={hosts[i] / 'tfds' if hosts else data_dir}",
      f"--config.num_train_steps={steps}",
      f"--config.coordinator_address=127.0.0.1:{port}",
      "--config.num_processes=2", f"--config.process_id={i}", *overrides,
      devices=2, **({"cwd": hosts[i]} if hosts else {})) for i in range(2)]


def _finish(procs):
  """Waits for every process; each must exit 0. Returns their logs."""
  logs = [p.communicate(timeout=600)[0].decode() for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log[-3000:]}"
  return logs


def _summary(workdir):
  return json.loads((workdir / "summary.json").read_text())


# In float32 a binary network's training is chaotic: one ulp of difference
# (another order of the cross-device sums, another convolution kernel) flips
# activations that sit at zero, and the flips grow. Measured on a 2-core AMD
# EPYC: the smoke run's step-1 loss was 2.2490 on 1 device and 2.2535 on 4,
# and after 6 steps at the recipe's learning rate parameters differed by up
# to 0.5. So this test holds the parameters still (a learning rate of 1e-9)
# and compares what depends on the data alone: the running statistics of
# the first BatchNorm, which no sign precedes. They agreed to 4e-5 (relative)
# across those kernels; a host that trains on another host's rows moves them
# by 1.4-3.8%. That the sharded step computes what one device computes is
# tested in float64 (test_claims.py).
STILL = "--config.learning_rate=1e-9"
FIRST_BN = "['batch_stats']['bn1']"
# Every step logged (the signal waits for step 1); no checkpoint but the
# final one and the one of the preemption; the light network
# (``train_utils.LIGHT``): what is tested is the processes, not the method.
ARGS = ("--config.log_every_steps=1", "--config.checkpoint_every_steps=1000",
        STILL, *train_utils.LIGHT)


@pytest.mark.slow
def test_two_processes_run_launch_like_one_and_resume_after_preemption(
    tmp_path, gcs):
  """Two processes on one disk train like one process with as many
  devices; then, as the hosts of a pod (no local path in common, the
  workdir in a bucket: ``gcs``, a GCS server on this machine), preempted
  and started again, they end bit-identical to the first pair."""
  data_dir = tmp_path / "tfds"  # unused: digits are on the devices
  ref, single = tmp_path / "ref", tmp_path / "single"
  run = f"gs://runs/multihost-{uuid.uuid4().hex[:8]}"
  hosts = [tmp_path / f"host{i}" for i in range(2)]
  for host in hosts:
    host.mkdir()

  # Two processes, uninterrupted; at the same time one process with as many
  # devices. The input engine is the default for digits, 'device': each
  # process holds the data and draws its rows of the global batch.
  one = train_utils.launch(single, f"--config.num_train_steps={STEPS}", *ARGS,
                           devices=4)
  logs = _finish(_two_processes(ref, data_dir, STEPS, *ARGS) + [one])
  for log in logs:
    assert "input engine: device" in log

  # Two processes like one.
  step_m, state_m = train_utils.final_state(ref)
  step_s, state_s = train_utils.final_state(single)
  assert step_m == step_s == STEPS
  assert state_m.keys() == state_s.keys()
  first_bn = [k for k in state_s if k.startswith(FIRST_BN)]
  assert len(first_bn) == 2, first_bn  # mean and var
  for k in first_bn:  # the same images, in the same steps
    np.testing.assert_allclose(state_m[k], state_s[k], rtol=1e-3, err_msg=k)
  for k in state_s:  # the same initial parameters, held still
    if k.startswith("['params']"):
      np.testing.assert_allclose(state_m[k], state_s[k], atol=1e-6,
                                 err_msg=k)
  sm, ss = _summary(ref), _summary(single)
  assert (sm["processes"], sm["devices"]) == (2, 4)
  assert (ss["processes"], ss["devices"]) == (1, 4)
  # Every process ran the pictures' forward pass (process 0 writes them).
  assert os.listdir(ref / "restriction") == [f"step_{STEPS:06d}.png"]

  # The same run on two "hosts" into a bucket, preempted: JAX's preemption
  # service agrees on a step one or two after the signal; both processes
  # save it there and exit 143.
  outs = train_utils.preempt_after_step(
      _two_processes(run, data_dir, STEPS, *ARGS, hosts=hosts))
  stopped = [m for out in outs
             for m in re.findall(r"preempted at step (\d+) by SIGTERM", out)]
  assert len(stopped) == 2 and stopped[0] == stopped[1], stopped
  stopped = int(stopped[0])
  assert 1 <= stopped < STEPS
  step_p, state_p = train_utils.final_state(run)
  assert step_p == stopped
  assert not paths.exists(f"{run}/summary.json")

  for log in _finish(_two_processes(run, data_dir, STEPS, *ARGS,
                                    hosts=hosts)):
    assert f"resumed from step {stopped}" in log
  names = gcs.objects(run.split("://")[1])
  for i in range(2):   # each process wrote its own shard of the arrays
    assert any(f"ocdbt.process_{i}/" in n for n in names), names
  assert any(n.endswith("/summary.json") for n in names)
  for host in hosts:   # and nothing locally
    assert not [p.name for p in host.iterdir()], list(host.iterdir())
  step_r, state_r = train_utils.final_state(run)
  assert step_r == STEPS and state_r.keys() == state_m.keys()
  for k in state_m:  # bit-identical to the uninterrupted run
    np.testing.assert_array_equal(state_r[k], state_m[k], err_msg=k)
  # Not vacuous: the steps after the preemption moved the statistics.
  for k in first_bn:
    assert np.max(np.abs(state_r[k] / state_p[k] - 1)) > 1e-2, k


@pytest.mark.slow
def test_two_processes_on_the_grain_engine_train_like_one(tmp_path):
  """A folder of JPEGs on the grain engine: two processes of one device each
  read and decode only their rows of each global batch, and train like one
  process of two devices (the first BatchNorm's statistics, which depend
  on the images alone)."""
  import photos  # pylint: disable=g-import-not-at-top
  tree = photos.write_tree(str(tmp_path / "tree"), {"train": 8, "test": 2},
                           [(48, 64), (64, 48)])
  args = (f"--config.dataset=folder:{tree}", "--config.image_size=32",
          "--config.batch_size=8", "--config.input_engine=grain",
          "--config.input_workers=0", "--config.restriction_images=0", *ARGS)
  port = train_utils.free_port()
  two = [train_utils.launch(
      tmp_path / "two", f"--config.coordinator_address=127.0.0.1:{port}",
      "--config.num_processes=2", f"--config.process_id={i}",
      "--config.num_train_steps=4", *args) for i in range(2)]
  one = train_utils.launch(tmp_path / "one", "--config.num_train_steps=4",
                           *args, devices=2)
  for log in _finish(two + [one]):
    assert "input engine: grain" in log
  _, state_two = train_utils.final_state(tmp_path / "two")
  _, state_one = train_utils.final_state(tmp_path / "one")
  first_bn = [k for k in state_one if k.startswith(FIRST_BN)]
  assert len(first_bn) == 2, first_bn
  for k in first_bn:
    np.testing.assert_allclose(state_two[k], state_one[k], rtol=1e-3,
                               err_msg=k)
  assert _summary(tmp_path / "two")["processes"] == 2


_TINY_IR2NET = """
import ml_collections
from ir2net_jax.configs import digits
def get_config(arg=None):
  c = digits.get_config("smoke")
  c.model = "ir2net_a"
  c.model_kwargs = ml_collections.ConfigDict({"num_blocks": (1, 0, 0, 0)})
  c.information_recovery = False  # light: see train_utils.LIGHT
  c.restriction_images = 0
  return c
"""


@pytest.mark.slow
def test_stage2_that_one_process_cannot_start_stops_every_process(tmp_path):
  """Stage 2 on two processes where only process 0 finds the stage-1 run
  (one host's disk lacks it): both stop within seconds, process 0 naming
  process 1, and neither waits at the first collective for the other.
  Before, process 0 waited 30 s and failed with Gloo's timeout."""
  config = tmp_path / "tiny_ir2net.py"
  config.write_text(_TINY_IR2NET)
  _finish([train_utils.launch(tmp_path / "stage1", "--config.stage=1",
                              "--config.num_train_steps=1",
                              config=str(config))])
  port = train_utils.free_port()
  procs = [train_utils.launch(
      tmp_path / f"stage2_{i}", "--config.stage=2",
      f"--config.stage1_checkpoint={tmp_path / ('stage1', 'nowhere')[i]}",
      f"--config.coordinator_address=127.0.0.1:{port}",
      "--config.num_processes=2", f"--config.process_id={i}",
      config=str(config)) for i in range(2)]
  logs = [p.communicate(timeout=120)[0].decode() for p in procs]
  assert all(p.returncode == 1 for p in procs), [l[-2000:] for l in logs]
  assert "no stage-1 run at" in logs[1]
  assert re.search(r"process\(es\) \[1\] found no stage-1 run", logs[0])
  assert "DEADLINE_EXCEEDED" not in logs[0]


# Two processes open the data as a run starts (``startup.prepare`` calls
# ``data.dataset_info`` before anything is compiled).
_OPEN_DATA = r"""
import sys
from absl import logging
import jax
logging.set_verbosity(logging.INFO)
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
from ir2net_jax import data
from ir2net_jax.configs import digits
config = digits.get_config("smoke")
config.data_dir, config.input_engine = sys.argv[3], "tf.data"
info = data.dataset_info(config)
print("INFO", info.num_train, info.num_eval, flush=True)
"""


@pytest.mark.slow
def test_process_0_alone_prepares_a_shared_data_dir(tmp_path):
  """The tf.data engine reads digits from a tfds data_dir: an empty shared
  one is prepared once, by process 0, while process 1 waits."""
  data_dir = tmp_path / "tfds"
  port = train_utils.free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=train_utils.ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen(
      [sys.executable, "-c", _OPEN_DATA, str(port), str(i), str(data_dir)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
           for i in range(2)]
  logs = _finish(procs)
  assert PREPARING in logs[0] and PREPARING not in logs[1], (
      "process 0 alone prepares the shared data_dir")
  versions = os.listdir(data_dir / "ir2net_digits")
  assert versions == ["1.0.0"], versions  # no second, half-written copy
  for log in logs:
    assert "INFO 1437 360" in log


@pytest.mark.slow
def test_processes_resume_from_the_newest_step_both_can_read(tmp_path):
  """Process 1 cannot read step 6: both restore step 4, and process 0 alone
  sets step 6 aside (and best/'s step 6, the abandoned future)."""
  workdir = train_utils.tiny_run(tmp_path / "run", best_at=(4, 6))
  worker = os.path.join(train_utils.ROOT, "tests", "checkpoint_worker.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  port = train_utils.free_port()
  procs = [subprocess.Popen(
      [sys.executable, worker, str(i), "2", str(port), str(workdir), "6"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=90)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
  assert [re.findall(r"^RESTORED (\S+) (\S+)$", out, re.M)
          for out in outs] == [[("4", "4")]] * 2, outs
  names = lambda d: sorted(n.split("-")[0] for n in os.listdir(workdir / d))
  assert names("checkpoints") == ["4"] and names("corrupt_checkpoints") == ["6"]
  assert names("best") == ["4"] and names("abandoned_best") == ["6"]


