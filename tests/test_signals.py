"""SIGTERM / SIGINT stop a run in seconds, even while it waits for input."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ir2net_jax.io import checkpoints
from ir2net_jax.train import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "stalled_input_worker.py")
SMOKE = os.path.join(ROOT, "configs", "digits.py:smoke")  # saves at 2, 4, 6
STOP_S = 15   # from the signal to the exit, a checkpoint saved on the way


@pytest.fixture
def before():
  """SIGTERM and SIGINT handled, before ``StopSignals``, by recorders; the
  signals they were called for. The handlers are put back afterwards."""
  calls = []
  saved = {s: signal.signal(s, lambda signum, frame: calls.append(signum))
           for s in (signal.SIGTERM, signal.SIGINT)}
  yield calls
  for signum, handler in saved.items():
    signal.signal(signum, handler)


def _send_soon(signum, delay_s: float = 0.2) -> threading.Timer:
  """Sends ``signum`` to this process from another thread in ``delay_s``."""
  timer = threading.Timer(delay_s, os.kill, (os.getpid(), signum))
  timer.start()
  return timer


def _open_and_close(path):
  """Opens the FIFO ``path`` to read: it blocks until a writer opens it, or
  30 s at most (a failing test, not a hung one)."""
  def rescue():
    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
  timer = threading.Timer(30, rescue)
  timer.start()
  try:
    with open(path, "rb"):
      pass
  finally:
    timer.cancel()


# StopSignals, in this process --------------------------------------------

def test_a_signal_raises_only_while_interruptible(before):
  with preemption.StopSignals() as stop_signals:
    signal.raise_signal(signal.SIGTERM)   # between steps: only asks
    assert stop_signals.stop_requested(1)
    with pytest.raises(preemption.Interrupted) as e:   # asked before it
      with stop_signals.waiting():
        pass
    assert e.value.signum == signal.SIGTERM
  with preemption.StopSignals() as stop_signals:
    stop_signals.interruptible = True   # the first step
    with pytest.raises(preemption.Interrupted):
      signal.raise_signal(signal.SIGINT)
    assert stop_signals.signum == signal.SIGINT
    assert before == []
    signal.raise_signal(signal.SIGINT)   # again: to the handler before
    assert before == [signal.SIGINT]
    signal.raise_signal(signal.SIGINT)   # which is back in place
    assert before == [signal.SIGINT] * 2


def test_waiting_is_interruptible_only_inside_and_restores_the_state(before):
  with preemption.StopSignals() as stop_signals:
    with stop_signals.waiting():
      assert stop_signals.interruptible
    assert not stop_signals.interruptible
    stop_signals.interruptible = True
    with stop_signals.waiting():
      pass
    assert stop_signals.interruptible
  assert before == []


@pytest.mark.parametrize("how", ["lock", "fifo"])
def test_a_signal_gives_up_a_blocked_wait(before, how, tmp_path):
  fifo = str(tmp_path / "never_written")
  os.mkfifo(fifo)
  block = {"lock": lambda: threading.Event().wait(timeout=30),
           "fifo": lambda: _open_and_close(fifo)}[how]
  with preemption.StopSignals() as stop_signals:
    timer = _send_soon(signal.SIGTERM)
    start = time.monotonic()
    with pytest.raises(preemption.Interrupted):
      with stop_signals.waiting():
        block()
    timer.join()
  assert time.monotonic() - start < 10
  assert before == []


def test_several_processes_never_raise(before, monkeypatch):
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils,
                      "reached_preemption_sync_point", lambda step: False)
  with preemption.StopSignals() as stop_signals:
    stop_signals.interruptible = True
    with stop_signals.waiting():
      signal.raise_signal(signal.SIGINT)   # passed on to JAX's SIGTERM
      assert stop_signals.signum == signal.SIGINT
    with stop_signals.waiting():
      pass
  assert before == [signal.SIGTERM]


def test_preempted_before_a_step_says_nothing_was_saved():
  message = str(preemption.Preempted(4, signal.SIGINT, None))
  assert message.startswith("preempted at step 4 by SIGINT: nothing new")
  assert "nothing was saved" in message
  assert "run the same command again to resume" in message


# A run whose input stalls -------------------------------------------------

def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _stalled_run(workdir, batches: int, how: str):
  """``launch.py`` on the smoke recipe, whose input blocks for ever after
  ``batches`` batches (``stalled_input_worker.py``)."""
  return subprocess.Popen(
      [sys.executable, WORKER, str(batches), how, f"--config={SMOKE}",
       f"--workdir={workdir}"], cwd=ROOT, env=_env(), text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _signal_when_stalled(proc, signum):
  """Sends ``signum`` once ``proc`` waits for its input; returns its whole
  output and the seconds from the signal to its exit."""
  lines, stalled = [], threading.Event()

  def read():
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("WAITING"):
        stalled.set()
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    assert stalled.wait(timeout=120), "".join(lines)[-3000:]
    time.sleep(0.5)   # in the blocking call by now
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      pytest.fail(f"{signum!r} did not stop the run:\n"
                  + "".join(lines)[-3000:])
    took = time.monotonic() - sent
    reader.join(timeout=10)
  finally:
    if proc.poll() is None:
      proc.kill()
  return "".join(lines), took


@pytest.mark.slow
def test_sigterm_while_the_input_stalls_saves_the_last_step(tmp_path):
  workdir = tmp_path / "work"
  proc = _stalled_run(workdir, 3, "fifo")
  out, took = _signal_when_stalled(proc, signal.SIGTERM)
  assert "WAITING 3" in out
  assert took < STOP_S, out[-3000:]
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert "preempted at step 3 by SIGTERM: saved" in out, out[-3000:]
  assert "CLOSED" in out   # the loop closed the train iterator
  assert checkpoints.latest_step(str(workdir / "checkpoints")) == 3
  assert not (workdir / "summary.json").exists()

  resumed = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={SMOKE}",
       f"--workdir={workdir}"], cwd=ROOT, env=_env(), text=True, timeout=120,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  assert "resumed from step 3" in resumed.stdout
  assert checkpoints.latest_step(str(workdir / "checkpoints")) == 6
  assert (workdir / "summary.json").exists()


@pytest.mark.slow
def test_sigint_before_the_first_batch_saves_nothing(tmp_path):
  workdir = tmp_path / "work"
  proc = _stalled_run(workdir, 0, "event")
  out, took = _signal_when_stalled(proc, signal.SIGINT)
  assert took < STOP_S, out[-3000:]
  assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
  assert ("preempted at step 0 by SIGINT: nothing new was trained, so "
          "nothing was saved; run the same command again to resume") in out
  assert "CLOSED" in out
  assert checkpoints.latest_step(str(workdir / "checkpoints")) is None
  assert not (workdir / "summary.json").exists()
