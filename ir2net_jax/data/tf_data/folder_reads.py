"""A ``folder:`` data set's files read by tf.data under the run's
``bad_examples`` policy (see ``shared.bad_data``).

TensorFlow's decoders stop the whole pipeline at a bad file and name no
file. An example read *guarded* goes through a small dataset of its own:
the file, then (under 'skip') the next ones of the listing, with the
failures dropped (``ignore_errors``) and the first that decodes kept; it
carries a failed file's path in ``bad``. Guarding costs about a third of
the throughput, so :func:`with_policy` reads the positions known to be bad
guarded and the rest directly; a batch that fails is read again with every
example guarded, which names its bad files, and they are guarded from then
on. Guarded or not, a good file gives the same example.

A train example that fails is replaced by the next file of the listing
(cyclically) that decodes, augmented with the draws of its own place in the
stream, so a resumed run reads exactly what an uninterrupted one reads. An
eval example that fails is left out of the accuracy (``mask`` 0). Every
image's header is checked against the pixel cap before it is decoded
(:func:`bounded`).
"""

import os
from typing import Callable, Dict, Iterator, Optional, Sequence, Set, Tuple

import numpy as np
import tensorflow as tf

from ir2net_jax.data.shared import bad_data, image_files
from ir2net_jax.data.shared.prefetch import close_source
from ir2net_jax.data.shared.specs import DataError

__all__ = ["MAX_REPLACEMENTS", "Files", "declared_pixels", "bounded",
           "read", "with_policy", "error_words"]

# Files tried for one train example under 'skip' before the run stops.
MAX_REPLACEMENTS = 64

Files = Tuple[tf.Tensor, tf.Tensor]   # paths string (N,), labels int64 (N,)
Batch = Dict[str, np.ndarray]


def declared_pixels(encoded: tf.Tensor) -> tf.Tensor:
  """int64 (): the pixels a JPEG, PNG, GIF, BMP or WebP header declares,
  read without decoding (0 for anything else, which the decoder refuses)."""
  head = tf.strings.substr(encoded, 0, 32)
  head = tf.strings.substr(tf.strings.join([head, b"\0" * 32]), 0, 32)
  b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

  def le(start, count):
    return sum(b[start + i] * 256**i for i in range(count))

  def be(start, count):
    return sum(b[start + i] * 256**(count - 1 - i) for i in range(count))

  def jpeg():
    shape = tf.cast(tf.image.extract_jpeg_shape(encoded), tf.int64)
    return shape[0] * shape[1]

  def bmp():
    height = le(22, 4)   # int32, negative for a top-down image
    return le(18, 4) * tf.abs(tf.where(height >= 2**31, height - 2**32,
                                       height))

  def starts(magic: bytes, at: int = 0):
    return tf.strings.substr(head, at, len(magic)) == magic

  def cases(branches):   # each branch's ops run only where it is taken
    return tf.case(branches, default=lambda: tf.constant(0, tf.int64))

  def webp():
    return cases([
        (starts(b"VP8X", 12), lambda: (le(24, 3) + 1) * (le(27, 3) + 1)),
        (starts(b"VP8L", 12), lambda: (le(21, 2) % 2**14 + 1) *
         ((le(22, 3) // 2**6) % 2**14 + 1)),
        (starts(b"VP8 ", 12), lambda: (le(26, 2) % 2**14) *
         (le(28, 2) % 2**14))])

  return cases([
      (starts(b"\xff\xd8"), jpeg),
      (starts(b"\x89PNG"), lambda: be(16, 4) * be(20, 4)),
      (starts(b"GIF8"), lambda: le(6, 2) * le(8, 2)),
      (starts(b"BM"), bmp),
      (starts(b"RIFF"), webp)])


def bounded(encoded: tf.Tensor) -> tf.Tensor:
  """``encoded``, once its header is found to declare no more than
  ``image_files.max_pixels()`` (an error otherwise, before any decoder
  allocates the image: TensorFlow's have no cap of their own)."""
  check = tf.debugging.assert_less_equal(
      declared_pixels(encoded), tf.constant(image_files.max_pixels(),
                                            tf.int64),
      message="an image declares more pixels than $IR2NET_MAX_IMAGE_PIXELS")
  with tf.control_dependencies([check]):
    return tf.identity(encoded)


def _plain(files: Files, position: tf.Tensor,
           decode: Callable) -> Dict[str, tf.Tensor]:
  paths, labels = files
  out = decode(bounded(tf.io.read_file(paths[position])), labels[position])
  return {**out, "bad": tf.constant(b""), "failed": tf.constant(False),
          "bad_position": tf.constant(-1, tf.int64)}


def _guarded(files: Files, position: tf.Tensor, decode: Callable,
             tries: int, failed: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
  paths, _ = files
  count = tf.shape(paths, out_type=tf.int64)[0]
  own_path = paths[position]

  def attempt(index):
    out = _plain(files, index, decode)
    own = index == position
    return {**out, "bad": tf.where(own, tf.constant(b""), own_path),
            "bad_position": tf.where(own, tf.constant(-1, tf.int64),
                                     position)}

  candidates = (position + tf.range(tries, dtype=tf.int64)) % count
  decoded = tf.data.Dataset.from_tensor_slices(candidates).map(
      attempt).ignore_errors()
  fallback = tf.data.Dataset.from_tensors(
      {**failed, "bad": own_path, "failed": tf.constant(True),
       "bad_position": position})
  return decoded.concatenate(fallback).take(1).get_single_element()


def read(files: Files, position: tf.Tensor, decode: Callable, tries: int,
         failed: Dict[str, tf.Tensor],
         guard: Optional[Sequence[int]] = None) -> Dict[str, tf.Tensor]:
  """Example ``position``: the first of ``tries`` files from ``position``
  on that decodes.

  Args:
    files: the split's listing (paths, labels).
    position: int64 (), the example's place in ``files``.
    decode: ``(encoded string (), label int64 ()) -> dict`` of tensors.
    tries: files to try, ``position`` and the ``tries - 1`` after it.
    failed: what ``decode`` gives, for an example none of whose tries
      decoded (zeros: the batch keeps its shape).
    guard: the positions read guarded (through a dataset of their own,
      which a bad file cannot stop: about 30% slower); the others are
      decoded directly, and a bad one stops the pipeline (see
      :func:`with_policy`). None: every position is guarded.

  Returns:
    ``decode``'s dict, with ``bad``: string (), the path of the file at
    ``position`` if it failed, else ''; ``bad_position``: int64 (), then
    ``position``, else -1; and ``failed``: bool (), whether every try
    failed (``failed``'s values are then returned).
  """
  if guard is None:
    return _guarded(files, position, decode, tries, failed)
  if not guard:
    return _plain(files, position, decode)
  guarded = tf.reduce_any(tf.constant(sorted(guard), tf.int64) == position)
  return tf.cond(guarded,
                 lambda: _guarded(files, position, decode, tries, failed),
                 lambda: _plain(files, position, decode))


def with_policy(make: Callable[[int, Optional[Set[int]]], tf.data.Dataset],
                start: int, tally: bad_data.Tally, split: str,
                split_size: int) -> Iterator[Batch]:
  """The batches of ``make``, from batch ``start`` on, read fast and
  unstopped by bad files; each bad file is counted in ``tally`` (logged
  once), or, under 'error', stops the run with its path.

  ``make(k, guard)`` is the batched dataset from batch ``k`` on, whose
  examples are read by :func:`read` with ``guard`` (``make(k, None)``
  need hold batch ``k`` alone). Batches are read with
  the positions known to be bad guarded; where a batch fails, that batch
  is read again with every position guarded, which names its bad files,
  and the rest with those guarded too. Guarded or not, a good file gives
  the same example, so the batches are those of ``make(start, None)``.

  Yields:
    Batches without their ``bad``, ``bad_position`` and ``failed`` entries.

  Raises:
    BadImage: under 'error', a file that failed to decode.
    DataError: under 'skip', a train example none of whose
      ``MAX_REPLACEMENTS`` files decoded, or more bad files in the split
      than the policy's share; a batch that fails though no file of it
      is bad.
  """
  guard: Set[int] = set()
  step = start
  while True:
    batches = make(step, set(guard)).as_numpy_iterator()
    try:
      for batch in batches:
        step += 1
        yield _checked(batch, tally, split, split_size)
      return
    except tf.errors.OpError as e:
      first_error = e
    finally:
      close_source(batches)
    batch = next(make(step, None).as_numpy_iterator())
    found = set(batch["bad_position"][batch["bad_position"] >= 0].tolist())
    if not found - guard:   # Not a bad file: a fault to report.
      raise DataError(f"{tally.where}: reading {split!r} failed "
                      f"({error_words(first_error)}).") from first_error
    guard |= found
    step += 1
    yield _checked(batch, tally, split, split_size)


def error_words(error: tf.errors.OpError) -> str:
  """TensorFlow's first line ends with the op's words, after the names of
  the ops it went through."""
  return error.message.splitlines()[0].rsplit(": ", 1)[-1].strip()


def _checked(batch: Batch, tally: bad_data.Tally, split: str,
             split_size: int) -> Batch:
  bad, failed = batch.pop("bad"), batch.pop("failed")
  del batch["bad_position"]
  for path in np.unique(bad[bad != b""]):
    name = os.fsdecode(path)
    reason = bad_data.reason(name)
    if not tally.policy.skip:
      raise image_files.BadImage(name, reason)
    tally.add(name, reason, split, split_size)
  if failed.any() and "mask" not in batch:
    raise DataError(
        f"{MAX_REPLACEMENTS} bad files in a row (the first: "
        f"{image_files.printable(os.fsdecode(bad[failed][0]))}); check "
        "the data with ir2net-check-data.")
  return batch
