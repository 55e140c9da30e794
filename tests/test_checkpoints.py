"""Resuming from the workdir's checkpoints: read errors that pass, ones that
do not, checkpoints that are corrupt, processes that must agree on a step,
and ``best/`` after a fallback. A tiny state, no model: seconds."""

import errno
import logging
import os

import orbax.checkpoint as ocp
import pytest

import train_utils
from ir2net_jax.io import checkpoints


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch):
  monkeypatch.setattr(checkpoints, "READ_RETRY_S", 0.0, raising=False)


def _failing_reads(monkeypatch, step=None, error=None, times=0):
  """Makes the first ``times`` reads of ``step`` raise ``error``; returns
  the steps read, one entry a read."""
  real = ocp.CheckpointManager.restore
  reads = []

  def restore(self, s, *args, **kwargs):
    reads.append(s)
    if s == step and reads.count(s) <= times:
      raise error
    return real(self, s, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  return reads


def _restore(workdir):
  """``(restored step, meta)`` of resuming ``workdir``."""
  ckpts = checkpoints.Checkpoints(str(workdir))
  try:
    state, meta = ckpts.restore(train_utils.tiny_state(0))
  finally:
    ckpts.close()
  return int(state["step"]), meta


def _listing(directory):
  """The entries of ``directory``, steps as ``<step>``, set-aside ones as
  ``<step>-*``; None if it is missing."""
  if not os.path.isdir(directory):
    return None
  return sorted(name if name.isdigit() else name.split("-")[0] + "-*"
                for name in os.listdir(directory))


# Read errors ---------------------------------------------------------------

def test_a_transient_read_error_moves_nothing(tmp_path, monkeypatch, caplog):
  workdir = train_utils.tiny_run(tmp_path)
  reads = _failing_reads(monkeypatch, 6, OSError(errno.EIO, "Input/output "
                                                 "error"), times=1)
  with caplog.at_level(logging.WARNING):
    step, _ = _restore(workdir)
  assert step == 6 and reads == [6, 6]
  assert _listing(workdir / "checkpoints") == ["4", "6"]
  assert _listing(workdir / "corrupt_checkpoints") is None
  assert "a transient read error; nothing was moved" in caplog.text


def _tensorstore_io_error():
  # What orbax raises when TensorStore's read of an array fails in the OS.
  error = Exception("Encountered error while reading array index")
  error.__cause__ = ValueError(
      'FAILED_PRECONDITION: Error reading "w/0" in OCDBT database at local '
      'file "state/": [OS error: Input/output error]')
  return error


@pytest.mark.parametrize("error", [
    OSError(errno.EIO, "Input/output error"), _tensorstore_io_error(),
    OSError(errno.ESTALE, "Stale file handle")], ids=["EIO", "tensorstore",
                                                       "ESTALE"])
def test_a_persistent_io_error_refuses_to_start_and_moves_nothing(
    tmp_path, monkeypatch, error):
  workdir = train_utils.tiny_run(tmp_path)
  reads = _failing_reads(monkeypatch, 6, error, times=100)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"cannot read the checkpoint .*/6: 3 tries failed "
                           r"with an I/O error .*Nothing was moved"):
    _restore(workdir)
  assert reads == [6] * checkpoints.READ_TRIES == [6, 6, 6]
  assert _listing(workdir / "checkpoints") == ["4", "6"]
  assert _listing(workdir / "corrupt_checkpoints") is None


def test_a_corrupt_checkpoint_is_read_again_then_set_aside(tmp_path,
                                                           monkeypatch,
                                                           caplog):
  workdir = train_utils.tiny_run(tmp_path)
  train_utils.truncate_files(workdir / "checkpoints" / "6")
  reads = _failing_reads(monkeypatch)
  with caplog.at_level(logging.WARNING):
    step, _ = _restore(workdir)
  assert step == 4 and reads == [6, 6, 6, 4]
  assert _listing(workdir / "checkpoints") == ["4"]
  assert _listing(workdir / "corrupt_checkpoints") == ["6-*"]
  assert "in 3 tries, none with an I/O error: it is corrupt" in caplog.text


# Processes agree on one step -----------------------------------------------

def _agree(readable, fail=()):
  """``_agree_on_step`` as process 0 of ``len(readable)`` runs it, the
  others simulated: process ``p`` can read the steps in ``readable[p]``;
  those in ``fail`` raise. Returns ``(agreed step, the bound of each
  round)``."""
  def newest(p, bound):
    if p in fail:
      raise checkpoints.CheckpointError(f"process {p} failed")
    return max((s for s in readable[p] if bound is None or s <= bound),
               default=None)

  bounds, last = [], [None]   # last: the bound of the round in progress

  def read(bound):
    bounds.append(bound)
    return newest(0, bound)

  def gather(offer):
    offers = [offer]
    for p in range(1, len(readable)):
      try:
        step = newest(p, last[0])
        offers.append(-1 if step is None else step)
      except checkpoints.CheckpointError:
        offers.append(-2)
    last[0] = min(offers)
    return offers

  return checkpoints._agree_on_step(read, gather), bounds  # pylint: disable=protected-access


@pytest.mark.parametrize("readable,agreed", [
    ([{2, 4, 6}], 6),
    ([{2, 4, 6}, {2, 4, 6}], 6),
    ([{2, 4, 6}, {2, 4}], 4),
    ([{2, 4}, {2, 4, 6}], 4),
    ([{2, 6}, {2, 4}], 2),           # each reads a step the other cannot
    ([{2, 4, 6}, {2, 4}, {2, 6}], 2),
    ([{4, 6}, {2}], None),
    ([set(), {2}], None)])
def test_processes_agree_on_the_newest_step_every_one_can_read(readable,
                                                               agreed):
  assert agreed == max(set.intersection(*readable), default=None)
  assert _agree(readable)[0] == agreed


def test_each_round_looks_no_later_than_the_smallest_offer():
  assert _agree([{2, 4, 6}, {2, 4, 6}])[1] == [None]
  assert _agree([{2, 4, 6}, {2, 4}])[1] == [None, 4]
  assert _agree([{2, 6}, {2, 4}])[1] == [None, 4, 2]


def test_a_process_that_fails_stops_every_process():
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"process\(es\) \[1\] could not read"):
    _agree([{2, 4}, {2, 4}], fail={1})
  with pytest.raises(checkpoints.CheckpointError, match="process 0 failed"):
    _agree([{2, 4}, {2, 4}], fail={0})


def test_a_load_that_fails_on_one_process_stops_every_process():
  """``on_every_process`` (the stage-1, init_from and teacher loads): each
  process offers its outcome before raising, so none is left waiting at a
  collective for one that stopped."""
  sent = []

  def gather_with(others):
    def gather(offer):
      sent.append(offer)
      return [offer] + others
    return gather

  assert checkpoints.on_every_process(lambda: "weights", "failed",
                                      gather_with([0, 0])) == "weights"
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"process\(es\) \[2\] could not load it"):
    checkpoints.on_every_process(lambda: "weights", "could not load it",
                                 gather_with([0, -2]))

  def broken():
    raise FileNotFoundError("no stage 1 here")
  with pytest.raises(FileNotFoundError, match="no stage 1 here"):
    checkpoints.on_every_process(broken, "failed", gather_with([0]))
  assert sent == [0, 0, -2]   # the failure was offered before raising
  assert checkpoints.on_every_process(lambda: 3, "failed") == 3   # 1 process


# best/ after a fallback ----------------------------------------------------

@pytest.mark.parametrize("best_at,run_best", [((4, 6), 4), ((2, 6), None)])
def test_best_after_a_fallback_agrees_with_the_run(tmp_path, best_at,
                                                   run_best):
  """best/ held step 6, which the run no longer has: it is set aside, and the
  run's best (step 4's, whose state it restored; or none, when best/ no
  longer holds its best) is what best/ holds, so the next best lands there."""
  workdir = train_utils.tiny_run(tmp_path, best_at=best_at)
  best_dir = str(workdir / "best")
  assert _listing(best_dir) == ["6"]
  train_utils.truncate_files(workdir / "checkpoints" / "6")

  step, meta = _restore(workdir)
  assert step == 4
  assert _listing(workdir / "abandoned_best") == ["6-*"]
  assert meta.get("best", {}).get("step") == run_best
  assert checkpoints.latest_step(best_dir) == run_best
  if run_best is not None:
    assert checkpoints.read_meta(best_dir, run_best)["best"] == meta["best"]
    restored, _ = checkpoints.restore_variables(
        best_dir, {k: train_utils.tiny_state(0)[k]
                   for k in ("params", "batch_stats")}, "the tiny state")
    assert restored == run_best

  # Step 6 again, with another top-1: the new best lands in best/.
  best = {"eval_top1": 0.55, "eval_top5": 1.0, "step": 6}
  ckpts = checkpoints.Checkpoints(str(workdir))
  ckpts.save(6, train_utils.tiny_state(6), {"best": best}, best=True)
  ckpts.wait()
  ckpts.close()
  assert checkpoints.latest_step(best_dir) == 6
  assert checkpoints.read_meta(best_dir, 6)["best"] == best
