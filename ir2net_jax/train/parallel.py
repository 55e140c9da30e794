"""Data parallelism in the pmap programming model on today's JAX.

A step is written per device, with ``axis_name='data'`` collectives, and run
under ``jax.jit`` through ``jax.shard_map`` over a one-axis ``('data',)`` mesh
of every device of every host. Parameters are replicated; the batch is split
along its first axis.
"""

import importlib.util
import os
from typing import Any, Callable, Optional, Sequence

import jax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

__all__ = ["AXIS", "init_distributed", "shutdown_distributed", "data_mesh", "replicated",
           "batch_sharding", "replicate", "shard_step"]

AXIS = "data"


def init_distributed(config) -> None:
  """Starts multi-host JAX when the config or the environment asks for it.

  With ``config.coordinator_address`` set, the process count and id come from
  ``config.num_processes`` / ``config.process_id``; otherwise
  ``jax.distributed.initialize()`` reads the cluster environment (SLURM,
  Open MPI, GKE's TPU variables; on a TPU VM, where libtpu is installed,
  the pod's workers from the VM's metadata) when one is detected; a config
  of None reads only the environment. A single process does nothing.
  """
  address = config.get("coordinator_address") if config is not None else None
  if address:
    jax.distributed.initialize(coordinator_address=address,
                               num_processes=config.num_processes,
                               process_id=config.process_id)
  elif any(k in os.environ for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                                     "TPU_WORKER_HOSTNAMES")):
    jax.distributed.initialize()
  elif importlib.util.find_spec("libtpu") is not None:
    # A TPU VM: its workers are listed in the VM's metadata, not in the
    # environment, and JAX reads them there. A host of no pod has none.
    try:
      jax.distributed.initialize()
    except ValueError as e:
      logging.info("one process: no TPU pod detected (%s)", e)
      return
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def shutdown_distributed() -> None:
  """Leaves multi-host JAX once every process got here (one process: nothing).

  The barrier first: process 0 hosts the coordinator, which must not go away
  while another process still uses it.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ir2net_jax: done")
    jax.distributed.shutdown()


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A 1-D ``('data',)`` mesh over ``devices`` (default: all, all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicate(tree: Any, mesh) -> Any:
  """Places a tree, the same on every process, on every device of ``mesh``.

  Arrays already on one device (e.g. restored from a checkpoint) are fetched
  to the host first: a mesh that spans processes is fed host data, as
  ``device_put`` cannot copy from one device to another process's devices.
  """
  return jax.device_put(jax.device_get(tree), replicated(mesh))


def shard_step(fn: Callable, mesh, in_specs, out_specs,
               donate_argnums: Sequence[int] = ()) -> Callable:
  """``jit(shard_map(fn))``: ``fn`` sees its device's slice of the batch.

  Inside ``fn`` use ``lax.pmean(..., 'data')`` for global means. A gradient
  taken inside ``fn`` of a loss that is already ``pmean``-ed over ``'data'``
  is the gradient of the global loss (shard_map's varying-axis checking keeps
  replicated parameters' cotangents summed across devices, so do not
  ``pmean`` the gradients again: that is the gradient trap in STACK.md).
  """
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                               out_specs=out_specs),
                 donate_argnums=tuple(donate_argnums))
