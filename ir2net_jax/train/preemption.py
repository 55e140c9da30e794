"""Stopping cleanly on SIGTERM / SIGINT: the step to save at, on every host.

TPU VMs and spot GPUs send SIGTERM shortly before they take a machine away;
SIGINT is Ctrl-C. ``StopSignals`` turns either into "save a checkpoint after
this step and stop" (``Preempted``):

- One process: a Python handler records the signal; ``stop_requested(step)``
  reads it after each step (a Python attribute: free).
- Several processes: they must all stop after the *same* step, or the ones
  that carry on wait forever in a collective. JAX's preemption service
  (started by ``jax.distributed.initialize``) already listens for SIGTERM,
  spreads the notice to every process and agrees on the step to stop at;
  ``stop_requested`` asks it, each step, through
  ``multihost_utils.reached_preemption_sync_point`` (orbax's
  ``reached_preemption`` does the same). SIGINT is passed on to it as the
  SIGTERM it listens for.

A flag read after each step is never read while the run waits for a batch
that does not come: an input pipeline stalled on a hung mount or worker
blocks the main thread in a syscall or a lock, which Python retries after a
handler that returns. So in one process, while ``waiting()`` for a batch and
until the first step is dispatched, its compilation included (the loop sets
``interruptible``), the handler raises ``Interrupted`` in the main thread
instead, which gives up the wait; the loop saves the last completed step.
Several processes never raise: they must stop at the step they agreed on,
not in the middle of a collective, so there a signal only asks, as above.

A second signal of the same kind stops the process at once, the way it would
have without the handler.
"""

import contextlib
import os
import signal
import threading
from typing import Optional

import jax
from absl import logging
from jax.experimental import multihost_utils

__all__ = ["Interrupted", "Preempted", "StopSignals"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal; it resumes from ``step``.

  Attributes:
    step: the step the checkpoint was saved at, or, where ``checkpoint`` is
      None, the step the run started (or resumed) from: the signal came
      before it trained a step, and nothing was saved.
    signum: the signal that asked for it (SIGTERM on a process that stopped
      because another one was told to).
  """

  def __init__(self, step: int, signum: int, checkpoint: Optional[str]):
    self.step, self.signum = step, signum
    saved = (f"saved {checkpoint}" if checkpoint else
             "nothing new was trained, so nothing was saved")
    super().__init__(
        f"preempted at step {step} by {signal.Signals(signum).name}: {saved}; "
        "run the same command again to resume")


class Interrupted(BaseException):
  """Raised by the handler while ``StopSignals.interruptible``: gives up a wait.

  A BaseException, as KeyboardInterrupt is: an input pipeline's ``except
  Exception`` (a retry of a read) lets it through.

  Attributes:
    signum: the signal.
  """

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(f"{signal.Signals(signum).name} while waiting")


class StopSignals:
  """Installs the SIGTERM / SIGINT handlers while training; a context manager.

  The previous handlers are put back on exit. Outside the main thread (where
  Python cannot install handlers) it does nothing and never asks to stop.

  Attributes:
    signum: the signal that arrived, if one did.
    interruptible: whether a signal raises ``Interrupted`` now (single
      process only); False unless set (``waiting`` sets it for its block).
  """

  def __init__(self):
    self.signum: Optional[int] = None
    self.interruptible = False
    self._previous = {}
    self._multi_process = jax.process_count() > 1
    self._agreed = False   # JAX's preemption service answers stop_requested
    self._raises = False   # our handlers are installed, in one process

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("not in the main thread: SIGTERM / SIGINT will not "
                      "save a checkpoint before the run stops")
      return self
    if self._multi_process:
      try:  # Raises if the run's JAX has its preemption service turned off.
        multihost_utils.reached_preemption_sync_point(-1)
      except RuntimeError as e:
        logging.warning("SIGTERM / SIGINT will not save a checkpoint: %s", e)
        return self
      self._agreed = True
      handled = (signal.SIGINT,)   # SIGTERM is left to JAX's service
    else:
      handled = _SIGNALS
    for signum in handled:
      self._previous[signum] = signal.signal(signum, self._handle)
    self._raises = not self._multi_process
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def _restore(self) -> None:
    self._raises = False
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum == signum:  # asked twice: stop now, as without us
      self._restore()
      signal.raise_signal(signum)
      return
    self.signum = signum
    if self._raises and self.interruptible:
      logging.warning("%s: giving up the wait, then saving the last "
                      "completed step, if any, and stopping (send it again "
                      "to stop at once)", signal.Signals(signum).name)
      raise Interrupted(signum)
    logging.warning("%s: finishing this step, then saving a checkpoint and "
                    "stopping (send it again to stop at once)",
                    signal.Signals(signum).name)
    if self._multi_process:  # JAX's preemption service listens for SIGTERM
      os.kill(os.getpid(), signal.SIGTERM)

  @contextlib.contextmanager
  def waiting(self):
    """A block that a signal gives up: ``interruptible`` while in it.

    Single process only (elsewhere it changes nothing).

    Raises:
      Interrupted: a signal arrived in the block, or had before it.
    """
    before, self.interruptible = self.interruptible, True
    try:
      if self._raises and self.signum is not None:
        raise Interrupted(self.signum)
      yield
    finally:
      self.interruptible = before

  def stop_requested(self, step: int) -> bool:
    """Whether to save at ``step`` and stop; the same answer on every process.

    Call it once per step, with increasing steps, on every process.
    """
    if self._multi_process:
      if not self._agreed:
        return False
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None
