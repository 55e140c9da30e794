"""Packed binary convolutions (``ir2net_jax.deploy.bits``): the integer
accumulators equal the float convolution of the same {-1, 0, +1} operands
exactly, for any channel count (whole words or not), stride, kernel size
and padding, with zeros inside the operands as well as at the border."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir2net_jax.deploy import bits, native
from ir2net_jax.nn import kernels


def _ternary(rng, shape, zeros):
  """Values in {-1, +1}, a share ``zeros`` of them 0."""
  values = rng.choice([-1.0, 1.0], size=shape)
  values[rng.random(shape) < zeros] = 0.0
  return values.astype(np.float32)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 100])
def test_pack_unpack_round_trip(n):
  values = _ternary(np.random.default_rng(n), (3, 2, n), 0.2)
  packed = bits.pack(jnp.asarray(values))
  assert packed.negative.dtype == jnp.uint32
  assert packed.negative.shape == (3, 2, -(-n // 32))
  np.testing.assert_array_equal(bits.unpack(packed), values)
  # Channels past the last whole word are zero bits in both planes.
  tail = n % 32
  if tail:
    assert not np.any(np.asarray(packed.nonzero[..., -1]) >> tail)


@pytest.mark.parametrize("n", [1, 9, 16, 31, 33, 70])
@pytest.mark.parametrize("zero_to_one", [False, True])
def test_native_packing_is_sign_then_pack_on_every_isa(n, zero_to_one):
  """``native.pack_signs`` = ``bits.pack(binarize.sign(.))``, zeros and a
  NaN included, on each instruction set this CPU has."""
  from ir2net_jax.nn import binarize  # pylint: disable=g-import-not-at-top
  values = _ternary(np.random.default_rng(n), (3, 4, n), 0.3)
  values[0, 0, 0] = np.nan
  want = bits.pack(binarize.sign(jnp.asarray(values), zero_to_one))
  for isa in native.isas_here():
    got = jax.jit(lambda v, isa=isa: native.pack_signs(v, zero_to_one, isa))(
        jnp.asarray(values))
    np.testing.assert_array_equal(got.negative, want.negative, err_msg=isa)
    np.testing.assert_array_equal(got.nonzero, want.nonzero, err_msg=isa)
    assert got.size == n


def test_bit_order_is_channel_order():
  values = np.ones(40, np.float32)
  values[[0, 5, 33]] = -1
  values[7] = 0
  packed = bits.pack(jnp.asarray(values))
  assert list(np.asarray(packed.negative)) == [(1 << 0) | (1 << 5), 1 << 1]
  assert list(np.asarray(packed.nonzero)) == [0xFFFFFFFF & ~(1 << 7), 0xFF]


@pytest.mark.parametrize("cin,cout,size,stride,kernel_size,zeros", [
    (3, 4, 7, 1, 3, 0.0),
    (32, 5, 6, 1, 3, 0.1),
    (33, 8, 8, 2, 3, 0.3),
    (64, 16, 5, 1, 3, 0.0),
    (100, 3, 9, 2, 3, 0.05),
    (70, 6, 6, 1, 1, 0.1),
    (16, 4, 4, 1, 5, 0.2),
    (64, 70, 6, 1, 3, 0.0),      # a dense kernel, channels past one block
])
def test_conv2d_accumulators_equal_the_float_convolution(
    cin, cout, size, stride, kernel_size, zeros):
  rng = np.random.default_rng(cin * 100 + cout)
  x = _ternary(rng, (2, size, size + 1, cin), zeros)
  w = _ternary(rng, (kernel_size, kernel_size, cin, cout), zeros / 2)
  pad = kernel_size // 2
  want = np.asarray(kernels.conv_nhwc(jnp.asarray(x), jnp.asarray(w),
                                      stride, pad))
  got = jax.jit(bits.conv2d, static_argnums=(2, 3))(
      bits.pack(jnp.asarray(x)), bits.pack_kernel(jnp.asarray(w)),
      stride, pad)
  assert got.dtype == jnp.int32 and got.shape == want.shape
  np.testing.assert_array_equal(got, want.astype(np.int32))
  packed_x, packed_w = bits.pack(jnp.asarray(x)), bits.pack_kernel(
      jnp.asarray(w))
  assert packed_w.dense == (zeros == 0)
  # The native kernel (test_deploy builds it) on each instruction set this
  # CPU has: the same sums.
  for isa in native.isas_here():
    got = jax.jit(lambda a, b, isa=isa: native.conv2d(
        a, b, stride, pad, isa))(packed_x, packed_w)
    np.testing.assert_array_equal(got, want.astype(np.int32), err_msg=isa)
  # Not vacuous: the border (padding) and the zeros change sums.
  assert len(np.unique(want)) > 5


def test_conv2d_refuses_mismatched_channels():
  x = bits.pack(jnp.ones((1, 4, 4, 33)))
  w = bits.pack_kernel(jnp.ones((3, 3, 32, 2)))
  with pytest.raises(ValueError, match="33 channels, the kernel 32"):
    bits.conv2d(x, w, 1, 1)


# IR2Net-A..D stage 2 on bits: test_deploy's reference fixtures.
@pytest.mark.parametrize("name,kwargs,size,dtype", [
    ("cifar_resnet20", {"num_blocks": (1, 1, 1)}, 32, "float32"),
])
def test_packed_model_gives_the_float_models_logits(name, kwargs, size,
                                                    dtype):
  """Every binary convolution on bits: the logits are the float model's,
  bit for bit (the integer sums are exact, the rest is the same program).
  In float32: in bfloat16 XLA fuses the float layers around a packed
  convolution otherwise than around a float one, which moved logits by one
  bfloat16 ulp (measured on IR2Net-D; the sums themselves stay exact)."""
  from ir2net_jax import models  # pylint: disable=g-import-not-at-top
  from ir2net_jax.deploy import packed  # pylint: disable=g-import-not-at-top
  model = models.create_model(name, dtype=getattr(jnp, dtype), **kwargs)
  variables = models.init_variables(model, size, 0)
  # Trained-looking weights: some exactly 0 (sign 0), the rest both signs.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.where(jnp.abs(v) < 1e-3, 0.0, v).astype(v.dtype)
      if "kernel" in jax.tree_util.keystr(p) else v, variables)
  images = jax.random.normal(jax.random.key(1), (3, size, size, 3))
  kernels = packed.pack_kernels(model, variables, size)
  assert len(kernels) >= 4
  want = model.apply(variables, images, train=False)[0]
  got = jax.jit(lambda v, k, x: packed.apply_packed(model, v, k, x)[0])(
      variables, kernels, images)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))
  assert np.std(np.asarray(want, np.float32)) > 0


def test_stage_one_is_refused():
  from ir2net_jax import models  # pylint: disable=g-import-not-at-top
  from ir2net_jax.deploy import packed  # pylint: disable=g-import-not-at-top
  model = models.create_model("ir2net_a", stage=1, num_blocks=(1, 1, 1, 1))
  variables = models.init_variables(model, 64, 0)
  with pytest.raises(packed.PackError, match="real weights"):
    packed.pack_kernels(model, variables, 64)
