"""Reading one image file, bounded and checked: the reader every engine and
tool shares (the grain engine, ``ir2net-check-data``, ``ir2net-preresize``,
``ir2net-eval --images`` and ``visualize``).

What it refuses, each as a :class:`BadImage` that names the file, what is
wrong and the fix:

* anything but a regular file: a FIFO or a device named ``.jpg`` is never
  opened for reading (it would hang, or read without end), a dangling link
  or a link loop is named as one;
* an empty file, or one over :func:`max_bytes` (``IR2NET_MAX_IMAGE_BYTES``,
  256 MiB);
* content that is not an image both engines decode (JPEG, PNG, GIF, BMP,
  WebP: what ``tf.io.decode_image`` reads), whatever the suffix says;
* more pixels than :func:`max_pixels` (``IR2NET_MAX_IMAGE_PIXELS``, Pillow's
  own limit of 89.5 M), read from the header before anything is decoded:
  the same cap for libjpeg-turbo (simplejpeg, which ignores Pillow's) and
  for Pillow;
* a file that fails to decode: truncated, corrupt, a PNG bomb.

Pixels: :func:`to_rgb` makes uint8 (H, W, 3) from any Pillow mode as
``tf.io.decode_image(channels=3)`` does: 16-bit samples keep their high
byte (Pillow's own ``convert`` clips ``I;16`` to 255: a scan turns white),
alpha is dropped, palettes are expanded, CMYK and YCCK JPEGs go through
Pillow's Adobe-aware conversion (within a few levels of TensorFlow's).
"""

import errno
import io
import os
import stat
import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from ir2net_jax.data.shared.specs import DataError

__all__ = ["BadImage", "FORMATS", "max_bytes", "max_pixels", "read_file",
           "read_header", "printable", "file_kind", "open_error",
           "check_pixels", "open_image",
           "image_size", "to_rgb", "decode_rgb", "verify", "describe_error"]

# What tf.io.decode_image decodes; Pillow opens these and more (TIFF, ...),
# which the tf.data engine would refuse mid-epoch.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
_DEFAULT_MAX_BYTES = 256 << 20
_FIX = "remove or replace the file, or run with --config.bad_examples=skip"


class BadImage(DataError):
  """An image file that cannot be read.

  Attributes:
    path: the file.
    reason: what is wrong with it, in a few words.
  """

  def __init__(self, path: str, reason: str):
    self.path, self.reason = path, reason
    super().__init__(f"{printable(path)}: {reason}; {_FIX} (ir2net-check-data lists "
                     "every bad file of a data set).")

  def __reduce__(self):   # raised in grain's worker processes
    return BadImage, (self.path, self.reason)


def _env_int(name: str, default: int) -> int:
  value = os.environ.get(name, "")
  try:
    return int(value) if value else default
  except ValueError:
    raise DataError(f"${name}={value!r} is not a whole number.") from None


def max_bytes() -> int:
  """The largest image file read: ``$IR2NET_MAX_IMAGE_BYTES`` or 256 MiB."""
  return _env_int("IR2NET_MAX_IMAGE_BYTES", _DEFAULT_MAX_BYTES)


def max_pixels() -> int:
  """The most pixels an image may declare: ``$IR2NET_MAX_IMAGE_PIXELS`` or
  Pillow's ``Image.MAX_IMAGE_PIXELS`` (89,478,485)."""
  return _env_int("IR2NET_MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS or
                  89_478_485)


def printable(path: str) -> str:
  """``path`` as text that prints anywhere: bytes that are not UTF-8 (kept
  by ``os.listdir`` as surrogates) shown as ``\\xNN``."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def file_kind(mode: int) -> str:
  for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR,
                     "a character device"), (stat.S_ISBLK, "a block device"),
                     (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR,
                     "a directory")):
    if test(mode):
      return name
  return "not a regular file"


def open_error(path: str, error: OSError) -> "BadImage":
  if error.errno == errno.ELOOP:
    return BadImage(path, "a symbolic link loop")
  if error.errno == errno.ENOENT and os.path.islink(path):
    return BadImage(path, f"a symbolic link to {os.readlink(path)!r}, "
                    "which does not exist")
  return BadImage(path, f"cannot be read ({error.strerror or error})")


_HEADER_BYTES = 256 << 10   # headers, and the EXIF blocks before them


def read_header(path: str) -> bytes:
  """The first bytes of ``path`` (enough for :func:`image_size`), with
  :func:`read_file`'s checks."""
  return read_file(path, _HEADER_BYTES)


def read_file(path: str, first: Optional[int] = None) -> bytes:
  """The bytes of the image file ``path`` (its ``first`` bytes only, if
  given), read only if it is a regular file (links followed) of 1 byte to
  :func:`max_bytes`.

  Raises:
    BadImage: see the module docstring.
  """
  try:
    # O_NONBLOCK: opening a FIFO for reading would wait for a writer.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  except OSError as e:
    raise open_error(path, e) from None
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise BadImage(path, f"{file_kind(info.st_mode)}, not an image file")
    if info.st_size == 0:
      raise BadImage(path, "an empty file (0 bytes)")
    limit = max_bytes()
    if info.st_size > limit:
      raise BadImage(path, f"{info.st_size:,} bytes, over the "
                     f"{limit:,}-byte cap ($IR2NET_MAX_IMAGE_BYTES)")
    with os.fdopen(fd, "rb", closefd=False) as f:
      data = f.read(limit + 1 if first is None else min(first, limit))
  except OSError as e:
    raise BadImage(path, f"cannot be read ({e.strerror or e})") from None
  finally:
    os.close(fd)
  if len(data) > limit:   # grew while read
    raise BadImage(path, f"over the {limit:,}-byte cap")
  return data


def _is_jpeg(encoded: bytes) -> bool:
  return encoded[:3] == b"\xff\xd8\xff"


def _simplejpeg():
  try:
    import simplejpeg  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return simplejpeg


def check_pixels(path: str, height: int, width: int) -> None:
  """Raises BadImage where (height, width) is over :func:`max_pixels`."""
  limit = max_pixels()
  if height * width > limit:
    raise BadImage(path, f"declares {height}x{width} pixels, over the "
                   f"{limit:,}-pixel cap ($IR2NET_MAX_IMAGE_PIXELS): a "
                   "decompression bomb, or an image to shrink first")
  if height < 1 or width < 1:
    raise BadImage(path, f"declares {height}x{width} pixels")


def open_image(encoded: bytes, path: str = "<bytes>") -> Image.Image:
  """Pillow's image of ``encoded`` (header read, pixels not yet), checked
  for its format and pixel count."""
  try:
    with warnings.catch_warnings():   # our own cap is checked just below
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(encoded), formats=FORMATS)
  except Image.DecompressionBombError as e:
    raise BadImage(path, f"a decompression bomb ({e})") from None
  except (OSError, ValueError, SyntaxError) as e:
    reason = ("not a JPEG, PNG, GIF, BMP or WebP image"
              if isinstance(e, Image.UnidentifiedImageError)
              else f"an unreadable image header ({e})")
    raise BadImage(path, reason) from None
  check_pixels(path, image.height, image.width)
  return image


def image_size(encoded: bytes, path: str = "<bytes>") -> Tuple[int, int]:
  """``(height, width)`` from the header, checked against the caps.

  Raises:
    BadImage: not an image both engines decode, or too many pixels.
  """
  if _is_jpeg(encoded) and _simplejpeg() is not None:
    try:
      height, width = _simplejpeg().decode_jpeg_header(encoded)[:2]
    except ValueError as e:
      raise BadImage(path, f"an unreadable JPEG header ({e})") from None
    check_pixels(path, height, width)
    return height, width
  with open_image(encoded, path) as image:
    return image.height, image.width


def _high_byte(samples: np.ndarray) -> np.ndarray:
  return (samples.astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> np.ndarray:
  """A Pillow image -> uint8 (H, W, 3), as ``tf.io.decode_image(channels=3)``
  makes it (see the module docstring). ``I;16*`` and ``I`` (16-bit grey
  PNGs) keep the high byte of each sample; ``F`` is clipped to [0, 255] and
  truncated."""
  mode = image.mode
  if mode.startswith("I;16") or mode == "I":
    grey = _high_byte(np.asarray(image))
  elif mode == "F":
    grey = np.asarray(image).clip(0, 255).astype(np.uint8)
  else:
    return np.asarray(image.convert("RGB"))
  return np.repeat(grey[..., None], 3, axis=-1)


def decode_rgb(encoded: bytes, path: str = "<bytes>") -> np.ndarray:
  """Decodes a whole image to uint8 (H, W, 3) (:func:`to_rgb`), after the
  header checks.

  Raises:
    BadImage: see the module docstring.
  """
  with open_image(encoded, path) as image:
    try:
      return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as e:
      raise BadImage(path, describe_error(e)) from None


def describe_error(error: BaseException) -> str:
  """A decoder's exception as a few words for :class:`BadImage`."""
  text = str(error).strip().rstrip(".") or type(error).__name__
  if isinstance(error, Image.DecompressionBombError):
    return f"a decompression bomb ({text})"
  if "truncated" in text.lower() or "premature end" in text.lower():
    return f"truncated ({text})"
  return f"does not decode ({text})"


def verify(path: str) -> Optional[str]:
  """What is wrong with the image file ``path``, or None: read, header and a
  full decode (JPEGs at libjpeg's 1/8 scale, which still reads every
  coefficient: a truncated or corrupt stream fails as at full size).
  ``ir2net-check-data``'s check of one file."""
  try:
    encoded = read_file(path)
    height, width = image_size(encoded, path)
    if _is_jpeg(encoded) and _simplejpeg() is not None and _simplejpeg(
        ).decode_jpeg_header(encoded)[2] in ("YCbCr", "Gray", "RGB"):
      try:
        _simplejpeg().decode_jpeg(encoded, colorspace="RGB", strict=True,
                                  min_height=max(1, height // 8),
                                  min_width=max(1, width // 8))
      except ValueError as e:
        raise BadImage(path, describe_error(e)) from None
    else:
      decode_rgb(encoded, path)
  except BadImage as e:
    return e.reason
  return None
