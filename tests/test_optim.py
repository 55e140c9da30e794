"""Optimizer recipes: PyTorch's coupled weight decay, masks, schedules."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ir2net_jax import models
from ir2net_jax.train import optim


def _config(**kw):
  c = ml_collections.ConfigDict(dict(
      optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-4,
      weight_decay_rule="all", num_epochs=4, schedule_unit="epoch",
      warmup_epochs=0.0))
  c.update(kw)
  return c


def _abstract_params(model, size):
  x = jnp.zeros((1, size, size, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]


def test_imagenet_decay_mask_is_the_reference_rule():
  model = models.create_model("ir2net_b")
  mask = flax.traverse_util.flatten_dict(optim.weight_decay_mask(
      _abstract_params(model, 64), model, "conv_or_4d"))
  on = {"/".join(p) for p, m in mask.items() if m}
  # Every conv weight, binary ones included.
  assert "conv1/kernel" in on and "layer1_0/binary_conv/kernel" in on
  assert "layer2_0/downsample_conv/kernel" in on
  # The quirk: BN / PReLU inside CIRec's primary_conv (torch name has 'conv').
  assert "fusion/primary_conv/bn/scale" in on
  assert "fusion/primary_conv/act/negative_slope" in on
  # ... but not in cheap_operation, nor other BN / PReLU / the classifier.
  for off in ("fusion/cheap_operation/bn/scale", "bn1/scale", "prelu/negative_slope",
              "layer2_0/downsample_bn/bias", "bn2/scale", "fc/kernel", "fc/bias"):
    assert off not in on, off


def test_sgd_matches_pytorch_coupled_decay_and_momentum():
  params = {"w": jnp.array([1.0, -2.0])}
  grads = [{"w": jnp.array([0.5, 0.25])}, {"w": jnp.array([-1.0, 2.0])}]
  c = _config(learning_rate=0.1, weight_decay=0.01, num_epochs=10)
  tx = optim.create_optimizer(c, params, None, steps_per_epoch=100)
  state = tx.init(params)
  w, buf = np.array([1.0, -2.0]), np.zeros(2)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    d = np.asarray(g["w"]) + 0.01 * w          # torch.optim.SGD
    buf = 0.9 * buf + d
    w = w - 0.1 * buf
  np.testing.assert_allclose(params["w"], w, rtol=1e-6)


def test_adam_coupled_decay_matches_pytorch():
  params = {"w": jnp.array([0.5, -1.5])}
  c = _config(optimizer="adam", learning_rate=1e-3, weight_decay=1e-2)
  tx = optim.create_optimizer(c, params, None, steps_per_epoch=10)
  state = tx.init(params)
  w, m, v = np.array([0.5, -1.5]), np.zeros(2), np.zeros(2)
  for t, g in enumerate([np.array([0.1, -0.2]), np.array([0.3, 0.05])], 1):
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
    d = g + 1e-2 * w                             # torch.optim.Adam
    m = 0.9 * m + 0.1 * d
    v = 0.999 * v + 0.001 * d * d
    w = w - 1e-3 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
  np.testing.assert_allclose(params["w"], w, rtol=1e-5)


def test_cosine_per_epoch_is_cosineannealinglr():
  sched = optim.learning_rate_schedule(_config(num_epochs=4), steps_per_epoch=3)
  lrs = [float(sched(s)) for s in range(12)]
  expected = [0.1 * (1 + np.cos(np.pi * (s // 3) / 4)) / 2 for s in range(12)]
  np.testing.assert_allclose(lrs, expected, rtol=1e-6)
  step = optim.learning_rate_schedule(_config(num_epochs=4, schedule_unit="step"),
                                      steps_per_epoch=3)
  assert float(step(0)) == pytest.approx(0.1)
  assert float(step(12)) == pytest.approx(0.0, abs=1e-9)
  assert float(step(1)) < 0.1
