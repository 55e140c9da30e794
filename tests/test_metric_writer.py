"""``metric_writer`` writes what clu's default (TensorFlow) writer writes.

Both write the same scalars, images, histograms and hparams; TensorBoard's
own reader must find the same tags, plugins and values in both workdirs.
"""

import io
import logging

import numpy as np
from PIL import Image
import pytest

from ir2net_jax.train import metric_writer, run_metrics


def _write_all(writer, rng):
  writer.write_hparams({"learning_rate": 0.1, "model": "cifar_resnet20",
                        "remat": False, "num_blocks": (1, 1, 1)})
  for step in (3, 6):
    writer.write_scalars(step, {"train_loss": rng.uniform(0, 3),
                                "train_top1": np.float32(rng.uniform())})
  writer.write_images(6, {"restriction": rng.integers(
      0, 256, (1, 9, 7, 3), dtype=np.uint8)})
  writer.write_histograms(6, {
      "spread": rng.normal(size=500),
      "kept": np.ones(64),                  # every value equal
      "few": np.array([0.25, 0.5, 0.5, 1.0])})
  writer.close()


def _read(workdir):
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
    out[tag] = (plugin, [(e.step, tensor_util.make_ndarray(e.tensor_proto))
                         for e in acc.Tensors(tag)])
  return out


def test_same_summaries_as_clu(tmp_path):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  ours, theirs = tmp_path / "ours", tmp_path / "clu"
  _write_all(metric_writer.MetricWriter(str(ours)), np.random.default_rng(0))
  _write_all(metric_writers.create_default_writer(str(theirs)),
             np.random.default_rng(0))
  got, want = _read(ours), _read(theirs)
  assert set(got) == set(want)
  for tag, (plugin, events) in want.items():
    assert got[tag][0] == plugin, tag
    assert [s for s, _ in got[tag][1]] == [s for s, _ in events], tag
    for (_, mine), (_, clu) in zip(got[tag][1], events):
      if plugin == "images":  # width, height, PNGs: compare the pixels
        assert list(mine[:2]) == list(clu[:2])
        for a, b in zip(mine[2:], clu[2:]):
          np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(a))),
                                        np.asarray(Image.open(io.BytesIO(b))))
      elif plugin == "hparams":
        assert mine.tobytes() == clu.tobytes(), tag
      else:
        np.testing.assert_allclose(mine.astype(np.float64),
                                   clu.astype(np.float64), rtol=1e-6,
                                   atol=1e-12, err_msg=tag)
  assert run_metrics.read_scalars(str(ours)) == run_metrics.read_scalars(
      str(theirs))


@pytest.mark.parametrize("log_scalars", [True, False])
def test_just_logging_writes_no_file(tmp_path, caplog, log_scalars):
  """... and logs the scalars only where asked (the loop asks under
  ``--verbose``)."""
  writer = metric_writer.MetricWriter(str(tmp_path), just_logging=True,
                                      log_scalars=log_scalars)
  with caplog.at_level(logging.INFO):
    writer.write_scalars(5, {"eval_top1": 0.5})
    writer.write_hparams({"batch_size": 8})
  writer.close()
  assert list(tmp_path.iterdir()) == []
  assert ("[5] eval_top1=0.5" in caplog.text) == log_scalars
  assert ("batch_size" in caplog.text) == log_scalars


def test_report_progress_times_steps_after_the_first(tmp_path, monkeypatch):
  clock = iter([100.0, 101.0, 102.0, 103.0, 104.0, 105.0])
  monkeypatch.setattr(metric_writer.time, "monotonic", lambda: next(clock))
  written = []

  class Writer:
    def write_scalars(self, step, scalars):
      written.append((step, scalars["steps_per_sec"]))

  report = metric_writer.ReportProgress(num_train_steps=9, writer=Writer(),
                                        every_steps=2)
  for step in range(1, 7):   # step 1 compiles: its time is not counted
    report(step)
  assert written == [(2, pytest.approx(1.0)), (4, pytest.approx(1.0)),
                     (6, pytest.approx(1.0))]
