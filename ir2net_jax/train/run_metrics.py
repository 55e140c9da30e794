"""Reads the scalar metrics a training run wrote into its workdir.

``train.loop.train_and_evaluate`` writes TensorBoard event files into the
workdir (``metric_writer``: ``train_loss``, ``train_top1``, ...,
``eval_top1``, ``eval_top5``, ``eval_loss``, ``steps_per_sec``) as TF2
summaries do, each scalar a 0-d tensor (plugin ``scalars``); older writers,
``tf.compat.v1`` and PyTorch's ``SummaryWriter`` store ``simple_value``
scalars instead. ``read_scalars`` returns both as plain ``(step, value)``
pairs, e.g. to plot a training curve in a notebook::

  scalars = read_scalars("runs/digits")
  steps, top1 = zip(*scalars["eval_top1"])

Needs the ``tensorboard`` package (in the ``train`` extra), not TensorFlow:
the event files are read by ``storage.event_files.read_events``.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ir2net_jax.storage import event_files, paths

__all__ = ["read_scalars"]


def read_scalars(workdir: str, tags: Optional[Sequence[str]] = None
                 ) -> Dict[str, List[Tuple[int, float]]]:
  """Every scalar series in the event files directly inside ``workdir``.

  Args:
    workdir: a run's workdir (the directory holding ``events.out.tfevents.*``;
      sub-directories are not read), local or a bucket URL.
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
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  events = sorted(name for name in paths.listdir(workdir) if "tfevents" in name)
  if not events:
    raise FileNotFoundError(
        f"no TensorBoard event files in {workdir}; train_and_evaluate writes "
        "them into its workdir (is this the right directory?)")
  wanted = (lambda tag: True) if tags is None else set(tags).__contains__
  plugins: Dict[str, str] = {}   # TensorFlow writes a tag's metadata once
  series: Dict[str, Dict[int, float]] = {}
  for name in events:   # named by their start time: later ones win
    for event in event_files.read_events(
        paths.read_bytes(paths.join(workdir, name))):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name:
          plugins[value.tag] = value.metadata.plugin_data.plugin_name
        if not wanted(value.tag):
          continue
        if value.HasField("simple_value"):
          number = value.simple_value
        elif value.HasField("tensor") and plugins.get(value.tag) == "scalars":
          array = tensor_util.make_ndarray(value.tensor)
          if np.size(array) != 1:
            continue
          number = np.asarray(array).reshape(())
        else:
          continue   # images, histograms, hparams, text
        series.setdefault(value.tag, {})[int(event.step)] = float(number)
  return {tag: sorted(points.items()) for tag, points in series.items()}
