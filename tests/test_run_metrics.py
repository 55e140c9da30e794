"""run_metrics.read_scalars reads what clu and legacy writers wrote."""

import time

import numpy as np
import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from ir2net_jax.train import run_metrics


def test_reads_clu_tensor_scalars_and_skips_images(tmp_path):
  # clu's default writer: TF2 summaries, scalars stored as tensors.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  loss = rng.uniform(0.5, 3.0, size=5)
  writer = metric_writers.create_default_writer(str(tmp_path))
  for i, value in enumerate(loss):
    writer.write_scalars(10 * (i + 1), {"train_loss": value})
  writer.write_scalars(50, {"eval_top1": 0.75, "eval_top5": 0.96})
  writer.write_images(50, {"restriction": rng.uniform(size=(1, 8, 8, 3))})
  writer.close()

  scalars = run_metrics.read_scalars(str(tmp_path))
  assert set(scalars) == {"train_loss", "eval_top1", "eval_top5"}
  steps, values = zip(*scalars["train_loss"])
  assert steps == (10, 20, 30, 40, 50)
  np.testing.assert_allclose(values, loss, rtol=1e-6)
  assert scalars["eval_top1"] == [(50, pytest.approx(0.75))]
  only = run_metrics.read_scalars(str(tmp_path), tags=["eval_top5", "nope"])
  assert list(only) == ["eval_top5"]


def _legacy_event(step, tag, value, wall_time):
  summary = summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
  return event_pb2.Event(step=step, wall_time=wall_time, summary=summary)


def test_reads_simple_value_scalars_last_write_wins(tmp_path):
  writer = EventFileWriter(str(tmp_path))
  t = time.time()
  for step, value in ((1, 2.5), (2, 2.0), (3, 1.5)):
    writer.add_event(_legacy_event(step, "train_loss", value, t + step))
  # A resumed run logs step 3 again, with another value.
  writer.add_event(_legacy_event(3, "train_loss", 1.25, t + 10))
  writer.add_event(_legacy_event(4, "train_loss", 1.0, t + 11))
  writer.close()

  scalars = run_metrics.read_scalars(str(tmp_path))
  assert scalars == {"train_loss": [(1, 2.5), (2, 2.0), (3, 1.25), (4, 1.0)]}


def test_missing_event_files_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
    run_metrics.read_scalars(str(tmp_path))
