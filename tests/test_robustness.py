"""Runs that survive divergence, preemption and a corrupt latest checkpoint."""

import logging
import os
import re
import signal
import subprocess
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_utils
from ir2net_jax.train import divergence, loop, parallel, preemption
from ir2net_jax.io import checkpoints
from ir2net_jax.tools import train as launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkpoint_states(directory):
  """``{step: {leaf path: array}}`` of every checkpoint in ``directory``."""
  out = {}
  with ocp.CheckpointManager(str(directory)) as m:
    for step in m.all_steps():
      state = m.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore())).state
      leaves = jax.tree_util.tree_flatten_with_path(state)[0]
      out[step] = {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}
  return out


def _assert_finite(leaves, what):
  for k, v in leaves.items():
    assert np.all(np.isfinite(v)), f"{what}: {k} is not finite"


# Divergence ----------------------------------------------------------------

@pytest.mark.slow
def test_divergence_stops_before_anything_nonfinite_is_saved(tmp_path,
                                                             digits_dir):
  # A checkpoint every step: without the check, the diverged states are
  # saved. The light network: the loop's handling is tested, not the method.
  c = train_utils.light_digits_config(digits_dir, learning_rate=1e30,
                                      checkpoint_every_steps=1,
                                      log_every_steps=100)
  with pytest.raises(divergence.DivergenceError,
                     match=r"diverged at step \d+: .*not finite.*"
                           r"config\.learning_rate") as e:
    loop.train_and_evaluate(c, str(tmp_path))
  diverged_at = int(re.search(r"step (\d+)", str(e.value)).group(1))
  saved = _checkpoint_states(tmp_path / "checkpoints")
  assert saved, "the steps before the divergence should have been saved"
  assert max(saved) == diverged_at - 1   # the last finite one stays the latest
  for step, leaves in saved.items():
    _assert_finite(leaves, f"checkpoint {step}")
  assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_skip_nonfinite_updates_finishes_with_finite_state(tmp_path,
                                                           digits_dir):
  c = train_utils.light_digits_config(digits_dir, learning_rate=1e30,
                                      skip_nonfinite_updates=True)
  summary = loop.train_and_evaluate(c, str(tmp_path))
  assert 0 < summary["skipped_steps"] <= c.num_train_steps
  step, leaves = train_utils.final_state(tmp_path)
  assert step == c.num_train_steps
  _assert_finite(leaves, "final state")


# Preemption ----------------------------------------------------------------

def test_launch_leaves_jax_distributed_before_exiting_on_a_signal(
    monkeypatch, tmp_path):
  calls = []

  def preempted(config, workdir, verbose=False):
    calls.append("train")
    raise preemption.Preempted(3, signal.SIGTERM, str(workdir))
  monkeypatch.setattr(loop, "train_and_evaluate", preempted)
  monkeypatch.setattr(parallel, "shutdown_distributed",
                      lambda: calls.append("shutdown"))
  monkeypatch.setattr(launch, "FLAGS", types.SimpleNamespace(
      config=train_utils.tiny_digits_config("", xla_cpu_flags=""),
      workdir=str(tmp_path), verbose=False))
  with pytest.raises(SystemExit) as e:
    launch.main(["launch.py"])
  assert e.value.code == 128 + signal.SIGTERM
  assert calls == ["train", "shutdown"]


def test_stop_signals_restore_handlers_and_a_second_signal_stops_at_once():
  # Python's own handlers, whatever earlier tests' libraries installed: the
  # second signal goes to the handler that was there before.
  saved = {signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL),
           signal.SIGINT: signal.signal(signal.SIGINT,
                                        signal.default_int_handler)}
  try:
    before = {s: signal.getsignal(s) for s in saved}
    with preemption.StopSignals() as stop_signals:
      assert not stop_signals.stop_requested(1)
      signal.raise_signal(signal.SIGINT)
      assert stop_signals.stop_requested(2)
      assert stop_signals.signum == signal.SIGINT
      with pytest.raises(KeyboardInterrupt):   # Ctrl-C twice: at once
        signal.raise_signal(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before
  finally:
    for signum, handler in saved.items():
      signal.signal(signum, handler)


@pytest.mark.slow
@pytest.mark.parametrize("signalled,signum", [(1, signal.SIGTERM),
                                              (0, signal.SIGINT)])
def test_processes_agree_on_the_step_to_stop_at(signalled, signum):
  worker = os.path.join(ROOT, "tests", "preemption_worker.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  port = train_utils.free_port()
  procs = [subprocess.Popen([sys.executable, worker, str(i), "2", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True) for i in range(2)]
  try:
    for p in procs:   # both are stepping
      for line in p.stdout:
        if "READY" in line:
          break
    procs[signalled].send_signal(signum)
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  stops = [re.findall(r"^STOP (\d+) (\d+)$", out, re.M) for out in outs]
  assert all(len(s) == 1 for s in stops), outs
  assert stops[0][0][0] == stops[1][0][0]         # the same step
  assert int(stops[signalled][0][1]) == signum


# A corrupt latest checkpoint -----------------------------------------------

@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_and_retrains(tmp_path,
                                                           digits_dir, caplog,
                                                           monkeypatch):
  monkeypatch.setattr(checkpoints, "READ_RETRY_S", 0.0)
  c = train_utils.tiny_digits_config(digits_dir)   # saves at steps 2, 4, 6
  loop.train_and_evaluate(c, str(tmp_path))
  steps = c.num_train_steps
  _, good = train_utils.final_state(tmp_path)
  latest = tmp_path / "checkpoints" / str(steps)
  train_utils.truncate_files(latest)
  os.remove(tmp_path / "summary.json")
  with caplog.at_level(logging.INFO):
    summary = loop.train_and_evaluate(c, str(tmp_path))
  log = caplog.text
  assert f"cannot read the checkpoint {latest}" in log
  assert f"resumed from step {steps - c.checkpoint_every_steps}" in log
  # Set aside, not deleted; then trained again to the same state.
  aside = os.listdir(tmp_path / "corrupt_checkpoints")
  assert [d.split("-")[0] for d in aside] == [str(steps)]
  step, again = train_utils.final_state(tmp_path)
  assert step == steps and again.keys() == good.keys()
  for k in good:
    np.testing.assert_array_equal(again[k], good[k], err_msg=k)
  # best/'s step of the abandoned run is set aside too; the new best lands.
  aside = os.listdir(tmp_path / "abandoned_best")
  assert [d.split("-")[0] for d in aside] == [str(steps)]
  best_dir = str(tmp_path / "best")
  assert checkpoints.latest_step(best_dir) == steps
  assert (checkpoints.read_meta(best_dir, steps)["best"]["eval_top1"]
          == summary["best_eval_top1"])

  # With none readable, a clear error, and they are left for a look.
  ckpt_dir = tmp_path / "checkpoints"
  train_utils.truncate_files(ckpt_dir)
  os.remove(tmp_path / "summary.json")
  before = sorted(os.listdir(ckpt_dir))
  with pytest.raises(checkpoints.CheckpointError,
                     match=f"none of the checkpoints in {ckpt_dir}"):
    loop.train_and_evaluate(c, str(tmp_path))
  assert sorted(os.listdir(ckpt_dir)) == before
