"""The backend policy: one place for every backend-dependent choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir2net_jax.configs import cifar10_resnet20, imagenet as imagenet_config
from ir2net_jax.train import config_checks, step as step_lib
from ir2net_jax.backend import policy, xla_cpu
from ir2net_jax import models
from ir2net_jax.nn import objective, losses


def test_auto_binary_compute_dtype_is_int8_only_for_imagenet_stage2_on_cpu():
  """Every choice is exact; 'auto' picks int8 only where it measured faster."""
  def pick(model="ir2net_a", stage=2, backend="cpu", value="auto"):
    c = (imagenet_config.get_config(f"{model[-1]},stage={stage}")
         if model.startswith("ir2net") else cifar10_resnet20.get_config())
    c.binary_compute_dtype = value
    return policy.binary_compute_dtype(c, backend)

  assert pick() == "int8"
  assert pick("ir2net_d") == "int8"
  assert pick(stage=1) is None
  assert pick(backend="gpu") is None and pick(backend="tpu") is None
  assert pick(backend="cuda") is None
  assert pick("cifar_resnet20") is None
  assert pick(value="bfloat16") == "bfloat16"
  assert pick(value="") is None and pick(value=None) is None
  config = imagenet_config.get_config("a,stage=2")
  assert step_lib.build_model(config, 10).compute_dtype == (
      "int8" if jax.default_backend() == "cpu" else None)
  assert step_lib.build_model(config, 10, backend="cuda").compute_dtype is None
  assert policy.binary_compute_dtype is policy.binary_compute_dtype


def test_cpu_tricks_only_on_the_cpu():
  c = imagenet_config.get_config("b,stage=2")
  c.batch_size = 16
  cpu = policy.resolve(c, "cpu", cpu_count=2)
  assert cpu == policy.Policy(
      backend="cpu", dtype=None, binary_compute_dtype="int8",
      grouped_conv_by_taps=True, xla_cpu_flags=xla_cpu.DATA_PARALLEL_FLAGS)
  for backend in ("gpu", "cuda", "rocm", "tpu"):
    p = policy.resolve(c, backend, cpu_count=2)
    assert p == policy.Policy(
        backend=policy.platform(backend), dtype=None,
        binary_compute_dtype=None, grouped_conv_by_taps=False,
        xla_cpu_flags="")
  c.dtype = "bfloat16"
  gpu = policy.resolve(c, "gpu")
  assert gpu.dtype == "bfloat16" and gpu.binary_compute_dtype is None
  assert gpu.model_kwargs() == {"dtype": "bfloat16", "compute_dtype": None,
                                "grouped_conv_by_taps": False}
  assert gpu.teacher_kwargs() == {"dtype": "bfloat16"}
  # The CPU flags of a config, whatever the backend that runs them.
  assert policy.xla_cpu_flags(cifar10_resnet20.get_config()) == (
      xla_cpu.EIGEN_CONV_FLAGS)
  with pytest.raises(ValueError, match="unknown backend 'metal'"):
    policy.resolve(c, "metal")


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
  """``config.remat`` recomputes each residual block: the same numbers."""
  c = cifar10_resnet20.get_config()
  c.model_kwargs.num_blocks = (1, 1, 1)
  plain = step_lib.build_model(c, 10)
  c.remat = True
  remat = step_lib.build_model(c, 10)
  assert remat.remat and not plain.remat
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 4))
  v = models.init_variables(plain, 32, 0)

  def grads(model):
    f = lambda p: objective.two_pass_objective(
        p, v["batch_stats"], model, x, y, losses.cross_entropy)
    return jax.jit(jax.grad(f, has_aux=True))(v["params"])

  (g0, a0), (g1, a1) = grads(plain), grads(remat)
  jax.tree.map(np.testing.assert_array_equal, (g0, a0), (g1, a1))
  jaxpr = lambda m: str(jax.make_jaxpr(
      lambda p: m.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                        train=True, mutable=["batch_stats"]))(v["params"]))
  assert "prevent_cse" in jaxpr(remat) and "prevent_cse" not in jaxpr(plain)


def test_remat_without_residual_blocks_is_a_config_error():
  c = cifar10_resnet20.get_config()
  c.model, c.remat = "cifar_vgg_small", True
  with pytest.raises(config_checks.ConfigError, match="config.remat=True"):
    step_lib.build_model(c, 10)
