"""Counts steps in a localhost JAX cluster until ``StopSignals`` says stop.

Usage: python preemption_worker.py PROCESS_ID NUM_PROCESSES PORT
Prints ``READY`` once it steps, then ``STOP <step> <signal>`` when every
process has agreed to stop. XLA_FLAGS sets the fake device count.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from ir2net_jax.train import preemption  # noqa: E402

MAX_STEPS = 2000


def run(process_id, num_processes, port):
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes,
                             process_id=process_id)
  with preemption.StopSignals() as stop_signals:
    for step in range(1, MAX_STEPS + 1):
      if step == 1:
        print("READY", flush=True)
      time.sleep(0.01)
      if stop_signals.stop_requested(step):
        print(f"STOP {step} {stop_signals.signum}", flush=True)
        break
    else:
      print("NEVER STOPPED", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
