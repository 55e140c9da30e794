"""Runs ``launch.py`` with an input that stalls for ever after some batches.

Usage: python stalled_input_worker.py BATCHES HOW LAUNCH_FLAGS...

The run's train iterator serves ``BATCHES`` batches, prints ``WAITING
<batches>`` and blocks, as an input pipeline stalled on a hung mount or
worker does: ``HOW`` is ``fifo`` (opening a FIFO that no one writes to: a
syscall) or ``event`` (an event no one sets: a lock). Prints ``CLOSED`` when
the loop closes it. The exit status is ``launch.py``'s.
"""

import os
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ir2net_jax import data  # noqa: E402
from ir2net_jax.data.shared.prefetch import close_source  # noqa: E402
from ir2net_jax.tools import train  # noqa: E402


def _block_on_fifo():
  path = os.path.join(tempfile.mkdtemp(), "never_written")
  os.mkfifo(path)
  with open(path, "rb"):   # blocks until a writer opens it: never
    pass


def _block_on_event():
  threading.Event().wait()


class _Stalling:
  """``batches``' first ``count`` batches, then a wait for ever."""

  def __init__(self, batches, count: int, block):
    self._batches, self._count, self._block = batches, count, block
    self._served = 0

  def __iter__(self):
    return self

  def __next__(self):
    if self._served == self._count:
      print(f"WAITING {self._served}", flush=True)
      self._block()
      raise AssertionError("the stalled input delivered")
    self._served += 1
    return next(self._batches)

  def close(self):
    close_source(self._batches)
    print("CLOSED", flush=True)


def main(count: int, how: str, flags):
  block = {"fifo": _block_on_fifo, "event": _block_on_event}[how]
  open_inputs = data.open_inputs

  def stalling_inputs(*args, **kwargs):
    inputs = open_inputs(*args, **kwargs)
    train_batches = inputs.train_batches
    inputs.train_batches = lambda start_step=0: _Stalling(
        train_batches(start_step), count, block)
    return inputs
  data.open_inputs = stalling_inputs
  sys.argv = [os.path.join(ROOT, "launch.py"), *flags]
  train.run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
