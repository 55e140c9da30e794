"""The custom-gradient convolution kernels against lax's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir2net_jax.nn import kernels, layers
from test_layers import _data_mesh


def _lax_grouped(x, kernel, strides, padding, groups):
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)


@pytest.mark.parametrize("cin,cout,groups,k,stride", [
    (12, 12, 12, 3, 1),   # depthwise (CIRec, ratio 2)
    (8, 24, 8, 3, 1),     # depthwise with multiplier 3 (CIRec, ratio 4)
    (32, 64, 2, 3, 2),    # grouped, strided
    (6, 6, 3, 1, 1),      # 1x1 grouped
])
def test_grouped_conv_gradients_equal_lax(cin, cout, groups, k, stride):
  """The tap-wise weight gradient is the convolution's, in float64."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 9, 7, cin)))
    w = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)))
    pad = ((k // 2, k // 2), (k // 2, k // 2))

    def loss(conv):
      return lambda x, w: jnp.sum(
          jnp.sin(conv(x, w, (stride, stride), pad, groups)))

    np.testing.assert_array_equal(
        kernels.grouped_conv(x, w, (stride, stride), pad, groups),
        _lax_grouped(x, w, (stride, stride), pad, groups))
    got = jax.grad(loss(kernels.grouped_conv), (0, 1))(x, w)
    want = jax.grad(loss(_lax_grouped), (0, 1))(x, w)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_grouped_conv_weight_gradient_is_summed_over_devices():
  """Inside shard_map the replicated kernel's gradient is the global one."""
  n, mesh = _data_mesh()
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2 * n, 6, 6, 8)).astype(np.float32)
  w = rng.normal(size=(3, 3, 1, 8)).astype(np.float32)
  pad = ((1, 1), (1, 1))

  def loss(w, x):
    return jnp.mean(jnp.square(kernels.grouped_conv(x, w, (1, 1), pad, 8)))

  P = jax.sharding.PartitionSpec
  sharded = jax.jit(jax.shard_map(
      jax.grad(lambda w, x: jax.lax.pmean(loss(w, x), "data")), mesh=mesh,
      in_specs=(P(), P("data")), out_specs=P()))
  got = sharded(w, jax.device_put(x, jax.NamedSharding(mesh, P("data"))))
  np.testing.assert_allclose(got, jax.grad(loss)(w, x), rtol=1e-5, atol=1e-6)


def test_flax_conv_uses_grouped_conv_for_groups():
  """``layers.conv`` with groups is the same function as nn.Conv's default,
  through ``kernels.grouped_conv`` where asked (the CPU's choice)."""
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 5, 8)),
                  jnp.float32)
  ours = layers.conv(8, 3, groups=4, grouped_conv_by_taps=True)
  v = ours.init(jax.random.key(0), x)
  plain = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=4,
                  use_bias=False)
  g_ours = jax.grad(lambda v: jnp.sum(ours.apply(v, x) ** 2))(v)
  g_plain = jax.grad(lambda v: jnp.sum(plain.apply(v, x) ** 2))(v)
  np.testing.assert_allclose(ours.apply(v, x), plain.apply(v, x), rtol=1e-6)
  np.testing.assert_allclose(g_ours["params"]["kernel"],
                             g_plain["params"]["kernel"], rtol=1e-5,
                             atol=1e-5)
  jaxpr = lambda m: str(jax.make_jaxpr(lambda v: m.apply(v, x))(v))
  assert "custom_vjp" in jaxpr(ours)
  assert "custom_vjp" not in jaxpr(layers.conv(8, 3, groups=4,
                                               grouped_conv_by_taps=False))
