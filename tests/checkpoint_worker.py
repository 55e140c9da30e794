"""Resumes a workdir's checkpoints in a localhost JAX cluster, where process 1
cannot read one step.

Usage: python checkpoint_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR STEP
Process 1's reads of STEP fail to decode. Prints ``RESTORED <step> <the
run's best step, or None>``. XLA_FLAGS sets the fake device count.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import train_utils  # noqa: E402
from ir2net_jax.io import checkpoints  # noqa: E402
from ir2net_jax.train import parallel  # noqa: E402


def run(process_id, num_processes, port, workdir, unreadable):
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes,
                             process_id=process_id)
  checkpoints.READ_RETRY_S = 0.0
  if process_id == 1:
    real = ocp.CheckpointManager.restore

    def restore(self, step, *args, **kwargs):
      if step == unreadable:
        raise ValueError(f"step {step} does not decode on process 1")
      return real(self, step, *args, **kwargs)
    ocp.CheckpointManager.restore = restore
  ckpts = checkpoints.Checkpoints(workdir)
  state, meta = ckpts.restore(train_utils.tiny_state(0))
  print(f"RESTORED {int(state['step'])} {meta.get('best', {}).get('step')}",
        flush=True)
  ckpts.close()
  parallel.shutdown_distributed()


if __name__ == "__main__":
  run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
      int(sys.argv[5]))
