"""TensorBoard event files in a bucket, written without stalling training.

A bucket object cannot be appended to: ``BucketEventFile`` keeps the file's
records in memory and uploads the whole object again, from a background
thread, every ``flush_secs`` (and at ``close``). Each upload replaces the
object whole, so TensorBoard reading ``gs://`` sees a longer, complete file
each time, as it does with TensorFlow's own GCS writer. Past ``max_bytes`` a
new file is started. The interface is tensorboard's ``EventFileWriter``'s
(``add_event``, ``flush``, ``close``), which serves local workdirs.
"""

import io
import itertools
import os
import socket
import threading
import time

from absl import logging

from ir2net_jax.storage import paths

__all__ = ["BucketEventFile"]

_FILE_NUMBER = itertools.count()


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
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._path = paths.join(self._logdir, "events.out.tfevents.%010d.%s.%d.%d"
                            % (time.time(), socket.gethostname(), os.getpid(),
                               next(_FILE_NUMBER)))
    self._buffer, self._uploaded = io.BytesIO(), 0
    self._record(event_pb2.Event(wall_time=time.time(),
                                 file_version="brain.Event:2").
                 SerializeToString())

  def _record(self, data: bytes) -> None:
    from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
    RecordWriter(self._buffer).write(data)

  def add_event(self, event) -> None:
    with self._lock:
      if self._buffer.tell() > self._max_bytes:
        self._finished.append((self._path, self._buffer.getvalue()))
        self._new_file()
      self._record(event.SerializeToString())

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
