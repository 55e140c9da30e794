"""Layers against PyTorch's semantics, computed here by hand in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir2net_jax.nn import layers


def test_batchnorm_train_normalises_biased_and_tracks_unbiased():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (4, 5, 5, 3)).astype(np.float32)
  bn = layers.BatchNorm()
  v = bn.init(jax.random.key(0), x, use_running_average=False)
  y, state = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4,
                             atol=1e-5)
  n = 4 * 5 * 5
  np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * mean,
                             rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"],
                             0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  # Eval mode uses the running statistics and changes nothing.
  y_eval = bn.apply(state | {"params": v["params"]}, x,
                    use_running_average=True)
  np.testing.assert_allclose(
      y_eval, (x - state["batch_stats"]["mean"]) /
      np.sqrt(state["batch_stats"]["var"] + 1e-5), rtol=1e-5)


def test_batchnorm_normalises_in_float32_and_casts_to_its_dtype():
  x = jnp.asarray(np.random.default_rng(5).normal(3.0, 2.0, (4, 3, 3, 8)),
                  jnp.bfloat16)
  bn = layers.BatchNorm(dtype=jnp.bfloat16)
  v = bn.init(jax.random.key(0), x, use_running_average=False)
  y, state = bn.apply(v, x, use_running_average=False,
                      mutable=["batch_stats"])
  y32, state32 = layers.BatchNorm().apply(
      v, x.astype(jnp.float32), use_running_average=False,
      mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert state["batch_stats"]["mean"].dtype == jnp.float32
  np.testing.assert_array_equal(y, y32.astype(jnp.bfloat16))
  jax.tree.map(np.testing.assert_array_equal, state, state32)


def _data_mesh():
  """A ('data',) mesh of every device; skips with fewer than two."""
  n = jax.device_count()
  if n < 2:
    pytest.skip("needs several devices")
  return n, jax.make_mesh((n,), ("data",))


def test_batchnorm_over_devices_uses_the_global_batch():
  n, mesh = _data_mesh()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2 * n, 3, 3, 4)).astype(np.float32)
  bn = layers.BatchNorm(axis_name="data")
  plain = layers.BatchNorm()
  v = plain.init(jax.random.key(0), x, use_running_average=False)
  y_ref, s_ref = plain.apply(v, x, use_running_average=False,
                             mutable=["batch_stats"])
  P = jax.sharding.PartitionSpec

  def local(x):
    return bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"),
                            out_specs=(P("data"), P())))
  y, s = f(jax.device_put(x, jax.NamedSharding(mesh, P("data"))))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               s, s_ref)


def test_hardtanh_gradient_is_pytorchs():
  x = jnp.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
  np.testing.assert_array_equal(layers.hardtanh(x),
                                [-1, -1, -0.5, 0, 0.5, 1, 1])
  g = jax.grad(lambda x: layers.hardtanh(x).sum())(x)
  np.testing.assert_array_equal(g, [0, 0, 1, 1, 1, 0, 0])


def test_prelu_per_channel():
  x = jnp.array([[-2.0, 3.0], [0.0, -1.0]])
  v = {"params": {"negative_slope": jnp.array([0.1, 0.5])}}
  y = layers.PReLU().apply(v, x)
  np.testing.assert_allclose(y, [[-0.2, 3.0], [0.0, -0.5]])


@pytest.mark.parametrize("size,out", [(7, 3), (10, 4), (8, 4), (5, 5)])
def test_adaptive_avg_pool_matches_pytorch_windows(size, out):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  y = np.asarray(layers.adaptive_avg_pool(jnp.asarray(x), out))
  expected = np.zeros((2, out, out, 3), np.float32)
  for i in range(out):
    for j in range(out):
      hs, he = (i * size) // out, -((-(i + 1) * size) // out)
      ws, we = (j * size) // out, -((-(j + 1) * size) // out)
      expected[:, i, j] = x[:, hs:he, ws:we].mean((1, 2))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def _np_conv(x, w, stride, pad):
  """Direct NHWC x HWIO convolution with symmetric padding (PyTorch's)."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw, _, o = w.shape
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, o))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
  return out


@pytest.mark.parametrize("binary_weights", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_binary_conv_stage_switch_and_symmetric_padding(binary_weights, stride):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  w = rng.normal(0, 0.7, size=(3, 3, 3, 4)).astype(np.float32)
  conv = layers.BinaryConv(4, stride, binary_weights=binary_weights)
  v = {"params": {"kernel": jnp.asarray(w)}}
  y = conv.apply(v, jnp.asarray(x))
  w_used = np.sign(w) if binary_weights else w
  np.testing.assert_allclose(y, _np_conv(np.sign(x), w_used, stride, 1),
                             rtol=1e-5, atol=1e-5)
  # Weight gradient: clipped STE in stage 2, plain in stage 1.
  g = jax.grad(lambda k: conv.apply({"params": {"kernel": k}},
                                    jnp.asarray(x)).sum())(jnp.asarray(w))
  g_plain = jax.grad(lambda k: jnp.sum(jax.lax.conv_general_dilated(
      jnp.sign(jnp.asarray(x)), k, (stride, stride), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))))(jnp.asarray(w))
  expected = g_plain * (np.abs(w) <= 1) if binary_weights else g_plain
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
@pytest.mark.parametrize("channels", [16, 64])
def test_binary_conv_low_precision_operands_are_exact(dtype, channels):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, channels)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(3, 3, channels, 8)).astype(np.float32))

  def run(compute_dtype):
    conv = layers.BinaryConv(8, compute_dtype=compute_dtype)
    f = lambda x, k: conv.apply({"params": {"kernel": k}}, x)
    y, vjp = jax.vjp(f, x, k)
    return y, vjp(jnp.asarray(rng.normal(size=y.shape).astype(np.float32)))

  rng = np.random.default_rng(5)
  y32, g32 = run(None)
  rng = np.random.default_rng(5)
  ylow, glow = run(dtype)
  assert ylow.dtype == jnp.float32
  np.testing.assert_array_equal(y32, ylow)
  for a, b in zip(g32, glow):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("features,ratio,divisor,cheap_shape", [
    (512, 20, None, (3, 3, 1, 494)),
    (512, 4, 16, (3, 3, 16, 384)),
    (64, 4, None, (3, 3, 1, 48)),
])
def test_cirec_shapes_and_kept_channels(features, ratio, divisor, cheap_shape):
  x = jnp.ones((1, 4, 4, 32))
  m = layers.CIRec(features, ratio=ratio, groups_divisor=divisor)
  v = m.init(jax.random.key(0), x, train=False)
  assert v["params"]["cheap_operation"]["conv"]["kernel"].shape == cheap_shape
  y = m.apply(v, x, train=False)
  assert y.shape == (1, 4, 4, features)


@pytest.mark.parametrize("size,kernel,stride", [(8, 2, 2), (7, 2, 2),
                                                (9, 3, 2), (6, 3, 3)])
def test_avg_pool_is_pytorchs_floor_mode_pool(size, kernel, stride):
  x = np.random.default_rng(4).normal(size=(2, size, size, 3))
  out = (size - kernel) // stride + 1
  want = np.zeros((2, out, out, 3))
  for i in range(out):
    for j in range(out):
      want[:, i, j] = x[:, i * stride:i * stride + kernel,
                        j * stride:j * stride + kernel].mean(axis=(1, 2))
  got = layers.avg_pool(jnp.asarray(x, jnp.float32), kernel, stride)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda v: jnp.sum(layers.avg_pool(v, kernel, stride) *
                                 jnp.arange(out * out * 3.0).reshape(
                                     out, out, 3)))(jnp.asarray(x, jnp.float32))
  want_g = np.zeros_like(x)
  for i in range(out):
    for j in range(out):
      want_g[:, i * stride:i * stride + kernel,
             j * stride:j * stride + kernel] += (
                 np.arange(out * out * 3.0).reshape(out, out, 3)[i, j]
                 / kernel ** 2)
  np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)
