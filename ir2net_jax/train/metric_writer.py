"""TensorBoard metrics and training progress, without TensorFlow.

``MetricWriter`` writes what clu's default writer writes (the same TF2
summaries: scalars, images, histograms as tensors with their plugin's
metadata, and the hparams plugin's session), with the ``tensorboard``
package's own event-file writer, so a run writes its TensorBoard files where
TensorFlow is not installed (GPU images, Colab TPU runtimes). It also logs
each scalar, as clu's ``LoggingWriter`` does, where asked (``log_scalars``;
the loop's own lines say what a person reads). ``ReportProgress`` logs and
writes steps per second and the ETA every few steps.

The interface is clu's ``MetricWriter``'s, so either can serve the loop.
"""

import io
import time
from typing import Any, Dict, Mapping, Optional

from absl import logging
import numpy as np
from PIL import Image

from ir2net_jax.storage import event_files, paths

__all__ = ["MetricWriter", "ReportProgress", "histogram_buckets"]

HISTOGRAM_BUCKETS = 30  # tf.summary.histogram's default


def histogram_buckets(values: np.ndarray,
                      buckets: int = HISTOGRAM_BUCKETS) -> np.ndarray:
  """``tf.summary.histogram``'s buckets: float64 (buckets, 3) rows of
  [left edge, right edge, count], equal widths over [min, max]; all values
  equal give zero-width buckets at that value, the last one holding them."""
  values = np.asarray(values, np.float64).reshape(-1)
  out = np.zeros((buckets, 3))
  if values.size == 0:
    return out
  low, high = values.min(), values.max()
  if low == high:
    out[:, :2] = low
    out[-1, 2] = values.size
    return out
  counts, edges = np.histogram(values, bins=buckets, range=(low, high))
  out[:, 0], out[:, 1], out[:, 2] = edges[:-1], edges[1:], counts
  return out


def _png(image: np.ndarray) -> bytes:
  """(H, W, C) uint8, or floats in [0, 1], C in {1, 3, 4} -> PNG bytes."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
  if image.shape[-1] == 1:
    image = image[..., 0]
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


class MetricWriter:
  """Writes TensorBoard event files into ``logdir`` and logs scalars.

  Args:
    logdir: the directory of the event files (a run's workdir), local or
      a bucket URL (``storage.event_files``: uploaded in the background).
    just_logging: only log, write no file (other hosts than the first, and
      a finished run started again).
    max_images: images written per ``write_images`` entry (clu's default).
    log_scalars: also log every scalar and the hyperparameters.
  """

  def __init__(self, logdir: str, just_logging: bool = False,
               max_images: int = 3, log_scalars: bool = True):
    self._max_images, self._log = max_images, log_scalars
    self._events = None
    if just_logging:
      return
    if paths.is_cloud(logdir):   # uploaded whole, from a thread
      self._events = event_files.BucketEventFile(logdir)
    else:
      self._events = event_files.LocalEventFile(logdir)

  def _write(self, step: int, values) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    if self._events is not None:
      self._events.add_event(event_pb2.Event(
          step=int(step), wall_time=time.time(),
          summary=summary_pb2.Summary(value=list(values))))

  @staticmethod
  def _value(tag: str, tensor: np.ndarray, plugin: str):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.util import tensor_util
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin))
    return summary_pb2.Summary.Value(
        tag=tag, metadata=metadata,
        tensor=tensor_util.make_tensor_proto(tensor))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Scalars as 0-d float32 tensors (plugin ``scalars``), and a log line."""
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if self._log:
      logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}"
                                              for k, v in values.items()))
    self._write(step, [self._value(k, np.asarray(v, np.float32), "scalars")
                       for k, v in values.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """(N, H, W, C) images: the first ``max_images`` of each, as PNGs."""
    values = []
    for tag, batch in images.items():
      batch = np.asarray(batch)
      height, width = batch.shape[1:3]
      encoded = [str(width).encode(), str(height).encode()] + [
          _png(image) for image in batch[:self._max_images]]
      values.append(self._value(tag, np.array(encoded, dtype=object),
                                "images"))
    self._write(step, values)

  def write_histograms(self, step: int, arrays: Mapping[str, np.ndarray],
                       num_buckets: Optional[Mapping[str, int]] = None
                       ) -> None:
    """Each array's histogram (see ``histogram_buckets``)."""
    num_buckets = num_buckets or {}
    self._write(step, [self._value(
        tag, histogram_buckets(v, num_buckets.get(tag, HISTOGRAM_BUCKETS)),
        "histograms") for tag, v in arrays.items()])

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._write(step, [self._value(tag, np.array(text.encode(), dtype=object),
                                   "text") for tag, text in texts.items()])

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The hparams plugin's session: bools, numbers and strings as they are,
    anything else as its string."""
    from tensorboard.plugins.hparams import summary_v2 as hp  # pylint: disable=g-import-not-at-top
    plain = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
             for k, v in hparams.items()}
    if self._log:
      logging.info("hparams: %s", plain)
    if self._events is not None:
      self._write(0, hp.hparams_pb(plain).value)

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


class ReportProgress:
  """Every ``every_steps`` steps: the train loss and top-1 (from
  :meth:`latest`), steps/s and the ETA, logged, and steps/s written
  (scalar ``steps_per_sec``, as clu's ``ReportProgress``), and the share of
  that time the loop waited for its next batch (scalar
  ``input_wait_fraction``, from :meth:`waited`): near 0 when the input
  engine keeps up, the share of time the devices idled for data when not.

  Args:
    num_train_steps: the run's last step.
    writer: where ``steps_per_sec`` goes.
    every_steps: how often.
  """

  def __init__(self, num_train_steps: int, writer: MetricWriter,
               every_steps: int):
    self._num, self._writer, self._every = num_train_steps, writer, every_steps
    self._last: Optional[tuple] = None  # (step, time, waited)
    self._waited = 0.0
    self._metrics = ""

  def latest(self, train: Dict[str, float]) -> None:
    """The train metrics the next line shows (the loss and top-1 of the
    last logging steps), from the scalars the loop writes."""
    shown = [f"{name} {train[key]:.4g}" for key, name in
             (("loss", "loss"), ("top1", "top-1")) if key in train]
    self._metrics = ", ".join(shown) + ", " if shown else ""

  def waited(self, seconds: float) -> None:
    """Adds time the loop spent waiting for a batch."""
    self._waited += seconds

  def __call__(self, step: int) -> None:
    now = time.monotonic()
    if self._last is None:
      self._last = (step, now, self._waited)  # the first step compiles
      return
    if step % self._every and step != self._num:
      return
    first, then, waited = self._last
    self._last = (step, now, self._waited)
    if now <= then or step <= first:
      return
    rate = (step - first) / (now - then)
    wait = min(1.0, (self._waited - waited) / (now - then))
    eta = (self._num - step) / rate
    logging.info("step %d/%d: %s%.3g steps/s, %.1f%%, ETA %dh%02dm%02ds, "
                 "%.0f%% waiting for input", step, self._num, self._metrics,
                 rate, 100 * step / self._num, eta // 3600,
                 eta % 3600 // 60, eta % 60, 100 * wait)
    self._writer.write_scalars(step, {"steps_per_sec": rate,
                                      "input_wait_fraction": wait})
