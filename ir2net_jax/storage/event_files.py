"""TensorBoard event files, written without TensorFlow or stalling training.

``LocalEventFile`` appends each event's record to a file on a local disk and
flushes it, so TensorBoard sees every event as soon as it is written.
tensorboard's own ``EventFileWriter`` would do the same through
``tf.io.gfile``, importing TensorFlow where it is installed (its banners, a
second of start-up, gigabytes of address space) for nothing.

A bucket object cannot be appended to: ``BucketEventFile`` keeps the file's
records in memory and uploads the whole object again, from a background
thread, every ``flush_secs`` (and at ``close``). Each upload replaces the
object whole, so TensorBoard reading ``gs://`` sees a longer, complete file
each time, as it does with TensorFlow's own GCS writer. Past ``max_bytes`` a
new file is started. Both have tensorboard's ``EventFileWriter``'s interface
(``add_event``, ``flush``, ``close``). ``read_events`` reads any event
file back (TensorFlow's, PyTorch's, these), also without TensorFlow.
"""

import io
import itertools
import os
import socket
import struct
import threading
import time
from typing import Iterator

from absl import logging

from ir2net_jax.storage import paths

__all__ = ["BucketEventFile", "LocalEventFile", "read_events"]

_FILE_NUMBER = itertools.count()


def _file_name(logdir: str) -> str:
  """A new event file's path in ``logdir``, named as TensorFlow names it."""
  return paths.join(logdir, "events.out.tfevents.%010d.%s.%d.%d" % (
      time.time(), socket.gethostname(), os.getpid(), next(_FILE_NUMBER)))


def _first_event() -> bytes:
  """The record every event file starts with."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  return event_pb2.Event(wall_time=time.time(),
                         file_version="brain.Event:2").SerializeToString()


def _write_record(stream, data: bytes) -> None:
  """Appends one TFRecord-framed record (length, CRCs) to ``stream``."""
  from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
  RecordWriter(stream).write(data)


def read_events(data: bytes) -> Iterator:
  """The ``Event`` protos of an event file's bytes, in order.

  Records are TFRecord-framed: a little-endian uint64 length, its masked
  CRC-32C, the data, the data's masked CRC-32C. A record cut short (a file
  still being written) or whose length fails its CRC ends the file.
  """
  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import (
      masked_crc32c)
  offset = 0
  while offset + 12 <= len(data):
    header = data[offset:offset + 8]
    length, = struct.unpack("<Q", header)
    crc, = struct.unpack("<I", data[offset + 8:offset + 12])
    end = offset + 12 + length + 4
    if crc != masked_crc32c(header) or end > len(data):
      return
    event = event_pb2.Event()
    event.ParseFromString(data[offset + 12:end - 4])
    yield event
    offset = end


class LocalEventFile:
  """An event file in a local directory, appended to and flushed per event.

  Args:
    logdir: the directory (made if missing).
  """

  def __init__(self, logdir: str):
    paths.makedirs(logdir)
    path = _file_name(logdir)
    self._file = paths.filesystem(path).open(path, "ab")
    _write_record(self._file, _first_event())
    self._file.flush()

  def add_event(self, event) -> None:
    _write_record(self._file, event.SerializeToString())
    self._file.flush()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


class BucketEventFile:
  """An event file under a bucket URL, uploaded in the background.

  Args:
    logdir: the bucket directory (``gs://bucket/run``).
    flush_secs: the longest an event waits before it is uploaded.
    max_bytes: past this size the next event starts a new file.
  """

  def __init__(self, logdir: str, flush_secs: float = 30.0,
               max_bytes: int = 64 << 20):
    self._logdir, self._flush_secs = paths.resolve(logdir), flush_secs
    self._max_bytes = max_bytes
    self._lock = threading.Condition()
    self._closed = False
    self._uploaded = 0   # bytes of the current file already in the bucket
    self._wanted = False  # flush() asked for an upload
    self._finished = []   # (path, bytes) of full files not yet uploaded
    self._new_file()
    self._thread = threading.Thread(target=self._uploads, daemon=True,
                                    name="bucket-event-file")
    self._thread.start()

  def _new_file(self) -> None:
    self._path = _file_name(self._logdir)
    self._buffer, self._uploaded = io.BytesIO(), 0
    _write_record(self._buffer, _first_event())

  def add_event(self, event) -> None:
    with self._lock:
      if self._buffer.tell() > self._max_bytes:
        self._finished.append((self._path, self._buffer.getvalue()))
        self._new_file()
      _write_record(self._buffer, event.SerializeToString())

  def flush(self) -> None:
    """Asks for an upload now; returns at once."""
    with self._lock:
      self._wanted = True
      self._lock.notify()

  def _upload(self) -> None:
    """Uploads the finished files and the current one, if it grew; the
    lock is not held while uploading, so ``add_event`` never waits."""
    with self._lock:
      files = self._finished + [(self._path, self._buffer.getvalue())]
      self._finished = []
      uploaded = self._uploaded
    for i, (path, data) in enumerate(files):
      if path == files[-1][0] and len(data) == uploaded:
        continue
      try:
        paths.filesystem(path).pipe_file(path, data)
      except Exception as e:  # the next upload sends the whole file again
        logging.warning("could not upload the event file %s (%s: %s); "
                        "trying again in %.0f s", path, type(e).__name__, e,
                        self._flush_secs)
        with self._lock:
          self._finished[:0] = files[i:-1]
        return
    with self._lock:
      if self._path == files[-1][0]:
        self._uploaded = len(files[-1][1])

  def _uploads(self) -> None:
    while True:
      with self._lock:
        self._lock.wait_for(lambda: self._wanted or self._closed,
                            timeout=self._flush_secs)
        self._wanted = False
        if self._closed:
          return
      self._upload()

  def close(self) -> None:
    """Uploads what is left and stops the thread (waits for both)."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
      self._lock.notify()
    self._thread.join()
    self._upload()
