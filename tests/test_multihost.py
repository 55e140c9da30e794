"""Two local processes run ``launch.py`` like one process with as many devices.

The whole loop: per-host input pipelines, a shared data_dir prepared once,
orbax saves from both processes, a resumed run and the evaluation; and two
processes that resume from the step both can read. Loopback addresses only.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import train_utils

STEPS_FIRST, STEPS = 4, 6  # the multi-host run stops at 4 and is resumed
PREPARING = "preparing ir2net_digits"


def _two_processes(workdir, data_dir, steps, *overrides):
  """Starts processes 0 and 1 of a run, 2 devices each."""
  port = train_utils.free_port()
  return [train_utils.launch(
      workdir, f"--config.data_dir={data_dir}",
      f"--config.num_train_steps={steps}",
      f"--config.coordinator_address=127.0.0.1:{port}",
      "--config.num_processes=2", f"--config.process_id={i}", *overrides,
      devices=2) for i in range(2)]


def _finish(procs):
  """Waits for every process; each must exit 0. Returns their logs."""
  logs = [p.communicate(timeout=600)[0].decode() for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log[-3000:]}"
  return logs


def _summary(workdir):
  return json.loads((workdir / "summary.json").read_text())


def test_two_processes_run_launch_like_one(tmp_path):
  data_dir = tmp_path / "tfds"  # empty: the first run prepares digits
  multi, single = tmp_path / "multi", tmp_path / "single"

  # The one-process reference, at the same time, prepares its own data_dir.
  one = train_utils.launch(single, f"--config.data_dir={tmp_path / 'tfds1'}",
                           f"--config.num_train_steps={STEPS}", devices=4)
  logs = _finish(_two_processes(multi, data_dir, STEPS_FIRST) + [one])
  assert PREPARING in logs[0] and PREPARING not in logs[1], (
      "process 0 alone prepares the shared data_dir")
  versions = os.listdir(data_dir / "ir2net_digits")
  assert versions == ["1.0.0"], versions  # no second, half-written copy
  step_first, state_first = train_utils.final_state(multi)
  assert step_first == STEPS_FIRST

  for log in _finish(_two_processes(multi, data_dir, STEPS)):
    assert f"resumed from step {STEPS_FIRST}" in log
    assert PREPARING not in log

  # Every process ran the pictures' forward pass; they were drawn at both
  # evaluations (process 0 writes them).
  assert sorted(os.listdir(multi / "restriction")) == [
      f"step_{s:06d}.png" for s in (STEPS_FIRST, STEPS)]

  step_m, state_m = train_utils.final_state(multi)
  step_s, state_s = train_utils.final_state(single)
  assert step_m == step_s == STEPS
  assert state_m.keys() == state_s.keys()
  # Same data, same steps; only the order of the cross-device sums differs,
  # which the momentum (a sum of gradients) shows at ~1e-4; two steps move
  # the parameters by more than 1e-2 (checked below).
  for k in state_s:
    np.testing.assert_allclose(state_m[k], state_s[k], rtol=1e-3, atol=1e-3,
                               err_msg=k)
  sm, ss = _summary(multi), _summary(single)
  assert (sm["processes"], sm["devices"]) == (2, 4)
  assert (ss["processes"], ss["devices"]) == (1, 4)
  # (best_* differ: the multi-host run also evaluated at its first stop.)
  # Within one of the 360 test digits: parameters that differ in the last
  # bits may move one prediction that sits on a near-tie of two logits.
  for k in ("final_eval_top1", "final_eval_top5"):
    assert abs(sm[k] - ss[k]) <= 1 / 360 + 1e-9, (k, sm[k], ss[k])
  # Not vacuous: the resumed steps moved the parameters.
  assert max(float(np.max(np.abs(state_s[k] - state_first[k])))
             for k in state_s if k.startswith("['params']")) > 1e-2


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


@pytest.mark.slow
def test_sigterm_stops_both_processes_at_one_step_and_resumes_bit_identically(
    tmp_path, digits_dir):
  # The signal is sent once step 1 is logged; JAX's preemption service
  # agrees on a step one or two later.
  steps = 30
  args = ("--config.log_every_steps=1", "--config.checkpoint_every_steps=1000")
  ref = _two_processes(tmp_path / "ref", digits_dir, steps, *args)
  procs = _two_processes(tmp_path / "run", digits_dir, steps, *args)
  logs, stepping = [[], []], threading.Event()

  def read(i):
    for line in procs[i].stdout:
      logs[i].append(line.decode())
      if i == 0 and re.search(r"\[1\] .*train_loss=", logs[i][-1]):
        stepping.set()
  readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
  for r in readers:
    r.start()
  try:
    assert stepping.wait(timeout=300), "".join(logs[0])[-3000:]
    procs[1].send_signal(signal.SIGTERM)   # process 0 hears it from JAX
    for p, r in zip(procs, readers):
      p.wait(timeout=300)
      r.join()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outs = ["".join(log) for log in logs]
  stopped = []
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 128 + signal.SIGTERM, (
        f"process {i} exited {p.returncode}:\n{out[-3000:]}")
    stopped += re.findall(r"preempted at step (\d+) by SIGTERM", out)
  assert len(stopped) == 2 and stopped[0] == stopped[1], stopped
  stopped = int(stopped[0])
  assert 1 <= stopped < steps
  assert train_utils.final_state(tmp_path / "run")[0] == stopped
  assert not (tmp_path / "run" / "summary.json").exists()

  for log in _finish(_two_processes(tmp_path / "run", digits_dir, steps,
                                    *args)):
    assert f"resumed from step {stopped}" in log
  _finish(ref)
  step_a, a = train_utils.final_state(tmp_path / "ref")
  step_b, b = train_utils.final_state(tmp_path / "run")
  assert step_a == step_b == steps
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
