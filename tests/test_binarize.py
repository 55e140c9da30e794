"""Sign estimators against their analytic forward values and gradients."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ir2net_jax.nn import binarize

POINTS = np.array([-2.0, -1.0 - 1e-3, -1.0, -1.0 + 1e-3, -0.5, -1e-3, 0.0,
                   1e-3, 0.5, 1.0 - 1e-3, 1.0, 1.0 + 1e-3, 2.0], np.float32)


def _approx_sign_grad(x):
  if -1 <= x < 0:
    return 2 + 2 * x
  if 0 <= x < 1:
    return 2 - 2 * x
  return 0.0


def _clipped_grad(x):
  return 1.0 if -1 <= x <= 1 else 0.0


def _swish_grad(x, beta=5.0):
  return beta * (2 - beta * x * np.tanh(beta * x / 2)) / (1 + np.cosh(beta * x))


ANALYTIC = {
    "approx_sign": _approx_sign_grad,
    "clipped_ste": _clipped_grad,
    "ste_sign": lambda x: 1.0,
    "swish_sign": _swish_grad,
}


def _expected_grad(name, xs):
  return np.array([ANALYTIC[name](float(x)) for x in xs], np.float32)


@pytest.mark.parametrize("name", sorted(ANALYTIC))
def test_forward_is_sign_with_zero_at_zero(name):
  f = binarize.get_estimator(name)
  y = jax.jit(f)(jnp.asarray(POINTS))
  np.testing.assert_array_equal(y, np.sign(POINTS))
  assert float(f(jnp.float32(0.0))) == 0.0


@pytest.mark.parametrize("name", sorted(ANALYTIC))
def test_zero_to_one_option(name):
  f = binarize.get_estimator(name)
  if name == "swish_sign":
    y = f(jnp.asarray(POINTS), 5.0, True)
  else:
    y = f(jnp.asarray(POINTS), True)
  np.testing.assert_array_equal(y, np.where(POINTS >= 0, 1.0, -1.0))


@pytest.mark.parametrize("name", sorted(ANALYTIC))
def test_gradient_matches_analytic_under_jit_and_vmap(name):
  f = binarize.get_estimator(name)
  grad = jax.jit(jax.vmap(jax.grad(lambda x: f(x))))
  np.testing.assert_allclose(grad(jnp.asarray(POINTS)),
                             _expected_grad(name, POINTS), rtol=1e-5, atol=1e-6)
  # A cotangent other than one is scaled elementwise.
  xs = jnp.asarray(POINTS)
  g = jax.vjp(f, xs)[1](jnp.full_like(xs, 3.0))[0]
  np.testing.assert_allclose(g, 3 * _expected_grad(name, POINTS), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("name", sorted(ANALYTIC))
def test_bfloat16_keeps_dtype(name):
  f = binarize.get_estimator(name)
  x = jnp.asarray(POINTS, jnp.bfloat16)
  y, vjp = jax.vjp(f, x)
  assert y.dtype == jnp.bfloat16
  g = vjp(jnp.ones_like(y))[0]
  assert g.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(g, np.float32),
                             _expected_grad(name, np.asarray(x, np.float32)),
                             rtol=2e-2, atol=2e-2)


def test_checkpoint_and_shard_map():
  f = binarize.approx_sign
  xs = jnp.asarray(np.tile(POINTS[:12], 2))
  expected = _expected_grad("approx_sign", np.asarray(xs))
  g = jax.grad(lambda x: jnp.sum(jax.checkpoint(f)(x) * 1.0))(xs)
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)
  n = len(jax.devices())
  mesh = jax.make_mesh((n,), ("data",))
  sharded = jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
  x = jax.device_put(jnp.tile(xs, n), jax.NamedSharding(mesh, P("data")))
  g = jax.jit(jax.grad(lambda x: jnp.sum(sharded(x))))(x)
  np.testing.assert_allclose(g, np.tile(expected, n), rtol=1e-5, atol=1e-6)


def test_unknown_estimator_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown sign estimator"):
    binarize.get_estimator("nope")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_sign_equals_jnp_sign_on_special_values(dtype):
  x = jnp.asarray([-np.inf, -3.0, -1e-30, -0.0, 0.0, 1e-30, 2.5, np.inf,
                   np.nan], dtype)
  got, want = binarize.sign(x), jnp.sign(x)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))
  np.testing.assert_array_equal(np.signbit(np.asarray(got, np.float32)),
                                np.signbit(np.asarray(want, np.float32)))
