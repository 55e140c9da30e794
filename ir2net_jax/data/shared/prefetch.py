"""Host-local numpy batches -> global, sharded ``jax.Array`` batches."""

import collections
import itertools
from typing import Any, Iterable, Iterator

import jax

__all__ = ["prefetch_to_device", "close_source"]


def close_source(iterator) -> None:
  """Closes ``iterator`` where it can be (generators, grain's iterators,
  whose worker processes and shared memory it releases)."""
  close = getattr(iterator, "close", None)
  if callable(close):
    close()


def prefetch_to_device(iterator: Iterable[Any], size: int,
                       sharding: jax.sharding.Sharding) -> Iterator[Any]:
  """Places each batch on the devices, keeping ``size`` batches in flight.

  Each leaf of each batch is this host's slice, (local_B, ...), of a global
  array of (global_B, ...); ``jax.make_array_from_process_local_data``
  assembles the global array, split along its first axis as ``sharding``
  says (e.g. ``NamedSharding(mesh, P('data'))``). Transfers are asynchronous,
  so the ``size`` batches queued ahead are copied while the current step
  runs. This is a plain generator: no thread, and the order of batches is
  kept.

  Args:
    iterator: yields pytrees (e.g. dicts) of host-local numpy arrays.
    size: batches placed ahead of the one being consumed; 0 places each batch
      only when it is asked for.
    sharding: how the global arrays are laid out over the devices.

  Yields:
    The same pytrees, with global ``jax.Array`` leaves. Closing this
    generator closes ``iterator``.
  """
  if size < 0:
    raise ValueError(f"size must be >= 0; got {size}.")
  iterator = iter(iterator)
  queue = collections.deque()

  def enqueue(n: int) -> None:
    for batch in itertools.islice(iterator, n):
      queue.append(jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x),
          batch))

  try:
    enqueue(max(size, 1))
    while queue:
      yield queue.popleft()
      enqueue(1)
  finally:
    close_source(iterator)
