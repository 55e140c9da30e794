"""Runs a few train steps on a fixed global batch; saves the final state.

Usage: python multihost_worker.py OUT.npz PROCESS_ID NUM_PROCESSES PORT
With NUM_PROCESSES > 1 it joins a localhost JAX cluster; each process feeds
its own rows of every global batch. XLA_FLAGS sets the fake device count.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax  # noqa: E402
import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
import numpy as np  # noqa: E402

import train_utils  # noqa: E402
from ir2net_jax import optim, parallel, train  # noqa: E402

GLOBAL_BATCH, STEPS = 16, 3


def run(out, process_id, num_processes, port):
  if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes,
                               process_id=process_id)
  config = train_utils.tiny_digits_config(None)
  model = train.build_model(config, 10, parallel.AXIS)
  variables = train.init_variables(model, 32, 0)
  tx = optim.create_optimizer(config, variables["params"], model, 10)
  mesh = parallel.data_mesh()
  state = parallel.replicate(train.create_train_state(variables, tx), mesh)
  step = train.sharded_train_step(model, tx, config, mesh)
  local = GLOBAL_BATCH // num_processes
  rows = slice(process_id * local, (process_id + 1) * local)
  for i in range(STEPS):
    batch = {k: v[rows] for k, v in
             train_utils.random_batch(i, GLOBAL_BATCH).items()}
    batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        parallel.batch_sharding(mesh), x), batch)
    state, _ = step(state, batch, {})
  flat = flax.traverse_util.flatten_dict(
      {"params": state.params, "batch_stats": state.batch_stats}, sep="/")
  if process_id == 0:
    np.savez(out, **{k: np.asarray(v.addressable_data(0))
                     for k, v in flat.items()})
  if num_processes > 1:
    # Both processes finish their work (and process 0 its file) before the
    # coordinator's service goes down.
    multihost_utils.sync_global_devices("worker done")
    print("WORKER DONE", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
  run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
