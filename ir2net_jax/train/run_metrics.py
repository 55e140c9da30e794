"""Reads the scalar metrics a training run wrote into its workdir.

``train.loop.train_and_evaluate`` writes TensorBoard event files into the
workdir through clu's metric writers (``train_loss``, ``train_top1``, ...,
``eval_top1``, ``eval_top5``, ``steps_per_sec``). clu writes TF2 summaries,
which store each scalar as a 0-d tensor (plugin ``scalars``); older writers,
``tf.compat.v1`` and PyTorch's ``SummaryWriter`` store ``simple_value``
scalars instead. ``read_scalars`` returns both as plain ``(step, value)``
pairs, e.g. to plot a training curve in a notebook::

  scalars = read_scalars("runs/digits")
  steps, top1 = zip(*scalars["eval_top1"])

Needs the ``tensorboard`` package (in the ``train`` extra), not TensorFlow.
"""

import contextlib
import logging
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ir2net_jax.storage import paths

__all__ = ["read_scalars"]


def read_scalars(workdir: str, tags: Optional[Sequence[str]] = None
                 ) -> Dict[str, List[Tuple[int, float]]]:
  """Every scalar series in the event files directly inside ``workdir``.

  Args:
    workdir: a run's workdir (the directory holding ``events.out.tfevents.*``;
      sub-directories are not read), local or a bucket URL (its event files
      are copied to a temporary directory first).
    tags: only these tags (missing ones are left out); None: every scalar.

  Returns:
    ``{tag: [(step, value), ...]}`` sorted by step. Where a step was written
    more than once (a run resumed from a checkpoint older than its last
    logged step logs those steps again), the value written last is kept.
    Non-scalar summaries (images, histograms, hparams) are left out.

  Raises:
    FileNotFoundError: ``workdir`` holds no event file.
  """
  # Imported here: tensorboard is an optional dependency (the train extra).
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  events = [name for name in paths.listdir(workdir) if "tfevents" in name]
  if not events:
    raise FileNotFoundError(
        f"no TensorBoard event files in {workdir}; train_and_evaluate writes "
        "them into its workdir (is this the right directory?)")
  with contextlib.ExitStack() as stack:
    local = paths.resolve(workdir)
    if paths.is_cloud(workdir):   # tensorboard's reader reads local files
      local = stack.enter_context(tempfile.TemporaryDirectory())
      for name in events:
        paths.write_atomic(os.path.join(local, name),
                           paths.read_bytes(paths.join(workdir, name)))
    acc = event_accumulator.EventAccumulator(
        local, size_guidance={event_accumulator.SCALARS: 0,
                              event_accumulator.TENSORS: 0})
    with _quiet_tensorboard_info():
      acc.Reload()   # logs an INFO line per event file it finishes
  available = acc.Tags()
  wanted = (lambda tag: True) if tags is None else set(tags).__contains__

  series: Dict[str, Dict[int, float]] = {}
  for tag in available.get(event_accumulator.SCALARS, []):
    if wanted(tag):
      for event in acc.Scalars(tag):   # wall-time order: later ones win
        series.setdefault(tag, {})[int(event.step)] = float(event.value)
  for tag in available.get(event_accumulator.TENSORS, []):
    if not wanted(tag):
      continue
    if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
      continue   # images, histograms, hparams, text
    for event in acc.Tensors(tag):
      value = tensor_util.make_ndarray(event.tensor_proto)
      if np.size(value) != 1:
        continue
      series.setdefault(tag, {})[int(event.step)] = float(
          np.asarray(value).reshape(()))
  return {tag: sorted(points.items()) for tag, points in series.items()}


@contextlib.contextmanager
def _quiet_tensorboard_info():
  """Raises tensorboard's logger to WARNING for the block, then restores it."""
  logger = logging.getLogger("tensorboard")
  level = logger.level
  logger.setLevel(max(level, logging.WARNING))
  try:
    yield
  finally:
    logger.setLevel(level)
