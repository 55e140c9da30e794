"""Binary convolutions on packed bits, exact, in pure JAX (XOR + popcount).

A binary convolution's operands are ``sign`` outputs: -1, +1, and 0 where
the reference's ``torch.sign`` meets an exact zero (``zero_to_one=False``)
or where the convolution pads. A bit cannot hold three values, so each
operand is packed into two bit planes along its channels, 32 channels to a
``uint32`` word (``pack``):

* ``negative``: bit set where the value is -1;
* ``nonzero``: bit set where the value is not 0.

For two such vectors ``a`` and ``b`` (``popcount`` over the words)::

  both = nonzero_a & nonzero_b
  sum(a * b) = popcount(both) - 2 * popcount(both & (negative_a ^ negative_b))

an integer, equal to the float convolution's sum exactly. Zero padding is a
word of zeros in both planes: no correction term is needed, and a zero inside
the activations (or a weight of exactly 0) is handled the same way. Channels
past the last multiple of 32 are zero bits in both planes.

``conv2d`` gathers each output position's taps (an im2col of words, (M, K)
with K = taps x words) and accumulates over the K words one at a time
(``lax.fori_loop``), so no (M, N, K) tensor is built. It is the pure-JAX
path: the reference for a native kernel, and what runs on GPUs and TPUs.
"""

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

__all__ = ["Packed", "PackedKernel", "WORD_BITS", "pack", "unpack",
           "pack_kernel", "conv2d", "dot_words", "check_operands"]

WORD_BITS = 32


@struct.dataclass
class Packed:
  """Values in {-1, 0, +1} as two bit planes along the last axis (a pytree:
  ``size`` is static).

  Attributes:
    negative: uint32 (..., words): bit ``i % 32`` of word ``i // 32`` set
      where value ``i`` is -1.
    nonzero: uint32 (..., words): set where value ``i`` is not 0.
    size: the number of values along the packed axis (the rest of the last
      word is zero bits).
  """
  negative: jax.Array
  nonzero: jax.Array
  size: int = struct.field(pytree_node=False)


def _words(bits: jax.Array) -> jax.Array:
  """bool (..., n) -> uint32 (..., ceil(n / 32)), value ``i`` at bit
  ``i % 32`` of word ``i // 32``."""
  n = bits.shape[-1]
  words = -(-n // WORD_BITS)
  padded = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1)
                   + [(0, words * WORD_BITS - n)])
  grouped = padded.reshape(bits.shape[:-1] + (words, WORD_BITS))
  shifted = jnp.left_shift(grouped.astype(jnp.uint32),
                           jnp.arange(WORD_BITS, dtype=jnp.uint32))
  return lax.reduce(shifted, jnp.uint32(0), lax.bitwise_or,
                    (shifted.ndim - 1,))


def pack(values: jax.Array) -> Packed:
  """Packs the signs of ``values`` (..., n) along the last axis: -1 where
  negative, +1 where positive, 0 where exactly 0 (``torch.sign``)."""
  return Packed(_words(values < 0), _words(values != 0), values.shape[-1])


def unpack(packed: Packed, dtype=jnp.float32) -> jax.Array:
  """The inverse of ``pack``: (..., size) values in {-1, 0, +1}."""
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  bit = lambda words: ((words[..., None] >> shifts) & 1).reshape(
      words.shape[:-1] + (-1,))[..., :packed.size]
  negative, nonzero = bit(packed.negative), bit(packed.nonzero)
  return (nonzero.astype(dtype) * (1 - 2 * negative.astype(dtype)))


@struct.dataclass
class PackedKernel:
  """A convolution kernel's signs, packed along its input channels, one
  column per output channel (a pytree; the sizes are static).

  Attributes:
    negative: uint32 (k * k * words, Cout): row ``(i * k + j) * words + w``
      holds word ``w`` of tap (i, j) of every output channel.
    nonzero: uint32, the same shape: set where the weight is not 0.
    channels: Cin, the number of values packed along each tap.
    kernel_size: k.
    dense: True where no weight is exactly 0 (``nonzero`` is every
      channel's bit): a kernel can then skip a popcount per word.
  """
  negative: jax.Array
  nonzero: jax.Array
  channels: int = struct.field(pytree_node=False)
  kernel_size: int = struct.field(pytree_node=False)
  dense: bool = struct.field(pytree_node=False, default=False)

  @property
  def out_channels(self) -> int:
    return self.negative.shape[-1]


def pack_kernel(kernel: jax.Array) -> PackedKernel:
  """Packs the signs of an HWIO kernel (k, k, Cin, Cout); ``dense`` is
  found where ``kernel`` is a concrete array (False under a trace)."""
  kh, kw, cin, cout = kernel.shape
  if kh != kw:
    raise ValueError(f"a square kernel is packed, not {kh}x{kw}")
  packed = pack(jnp.transpose(kernel, (0, 1, 3, 2)))   # (k, k, O, words)
  column = lambda p: jnp.transpose(p, (0, 1, 3, 2)).reshape(-1, cout)
  try:
    dense = bool(np.all(np.asarray(kernel) != 0))
  except (jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    dense = False
  return PackedKernel(column(packed.negative), column(packed.nonzero), cin,
                      kh, dense)


def _patches(planes: jax.Array, kernel_size: int, stride: int,
             pad: int) -> Tuple[jax.Array, Tuple[int, int, int]]:
  """uint32 (B, H, W, words) -> (B * H' * W', k * k * words), the words of
  each output position's taps in (kh, kw) order, zero words where padded;
  and (B, H', W')."""
  b, h, w, words = planes.shape
  x = jnp.pad(planes, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (h + 2 * pad - kernel_size) // stride + 1
  out_w = (w + 2 * pad - kernel_size) // stride + 1
  taps = [x[:, i:i + stride * (out_h - 1) + 1:stride,
            j:j + stride * (out_w - 1) + 1:stride]
          for i in range(kernel_size) for j in range(kernel_size)]
  cols = jnp.concatenate(taps, axis=-1)   # (B, H', W', k * k * words)
  return cols.reshape(b * out_h * out_w, -1), (b, out_h, out_w)


def dot_words(a: Packed, b: PackedKernel) -> jax.Array:
  """Every row of ``a`` (M, K words) with every column of ``b`` (K words,
  N): int32 (M, N) sums of products, exact. Accumulates one word at a
  time."""
  def add(k, acc):
    both = a.nonzero[:, k, None] & b.nonzero[k][None, :]
    differ = both & (a.negative[:, k, None] ^ b.negative[k][None, :])
    return acc + (lax.population_count(both).astype(jnp.int32)
                  - 2 * lax.population_count(differ).astype(jnp.int32))
  # Zeros made of the operands, so that the carry varies over the same
  # mesh axes as they do (inside shard_map).
  zeros = ((a.nonzero[:, :1] & 0).astype(jnp.int32)
           + (b.nonzero[:1, :] & 0).astype(jnp.int32))     # (M, N)
  return lax.fori_loop(0, a.negative.shape[1], add, zeros)


def check_operands(x: Packed, kernel: PackedKernel) -> None:
  """Raises ValueError where ``x`` and ``kernel`` do not convolve."""
  if x.size != kernel.channels:
    raise ValueError(f"the activations have {x.size} channels, the kernel "
                     f"{kernel.channels}")


def conv2d(x: Packed, kernel: PackedKernel, stride: int, pad: int
           ) -> jax.Array:
  """The binary convolution of packed activations and a packed kernel.

  Args:
    x: ``pack`` of (B, H, W, Cin) activations.
    kernel: ``pack_kernel`` of a (k, k, Cin, Cout) kernel.
    stride: spatial stride.
    pad: zero padding on every side (PyTorch's ``padding=pad``).

  Returns:
    int32 (B, H', W', Cout): exactly the float convolution of the unpacked
    operands (``kernels.conv_nhwc``).
  """
  check_operands(x, kernel)
  k = kernel.kernel_size
  negative, shape = _patches(x.negative, k, stride, pad)
  nonzero, _ = _patches(x.nonzero, k, stride, pad)
  out = dot_words(Packed(negative, nonzero, x.size), kernel)
  return out.reshape(shape + (kernel.out_channels,))
