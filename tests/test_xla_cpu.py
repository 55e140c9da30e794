"""The XLA:CPU flags the entry points apply before JAX starts, and the
compiler options of programs that run once."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sign_margins
from ir2net_jax import models
from ir2net_jax.backend import policy, xla_cpu
from ir2net_jax.configs import default


def test_adds_flags_and_keeps_the_users_value():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                      "--xla_cpu_experimental_ynn_fusion_type=X"}
  added = xla_cpu.apply_flags(
      xla_cpu.EIGEN_CONV_FLAGS + " --xla_cpu_enable_fast_min_max=false", env)
  assert added == ["--xla_cpu_enable_fast_min_max=false"]
  assert env["XLA_FLAGS"].split() == [
      "--xla_force_host_platform_device_count=2",
      "--xla_cpu_experimental_ynn_fusion_type=X",
      "--xla_cpu_enable_fast_min_max=false"]


def test_empty_flags_change_nothing():
  env = {}
  assert xla_cpu.apply_flags("", env) == []
  assert env == {}
  assert xla_cpu.apply_flags(xla_cpu.EIGEN_CONV_FLAGS, env) == [
      xla_cpu.EIGEN_CONV_FLAGS]
  assert env["XLA_FLAGS"] == xla_cpu.EIGEN_CONV_FLAGS


def test_rejects_a_word_that_is_not_a_flag():
  with pytest.raises(ValueError, match="not an XLA flag"):
    xla_cpu.apply_flags("xla_cpu_enable_fast_min_max=false", {})


def test_refuses_once_jax_has_started_and_leaves_xla_flags_alone():
  jax.devices()
  before = os.environ.get("XLA_FLAGS")
  with pytest.raises(RuntimeError, match="before JAX starts"):
    xla_cpu.apply_flags("--xla_cpu_enable_fast_min_max=false")
  assert os.environ.get("XLA_FLAGS") == before


def test_initialisation_is_compiled_as_a_program_that_runs_once(monkeypatch):
  """``init_variables`` compiles with ``RUN_ONCE_OPTIONS`` on the CPU and
  gives what XLA's default compile of ``model.init`` gives; under
  ``jax.eval_shape`` it compiles nothing."""
  model = models.create_model("ir2net_a", num_blocks=(1, 1, 1, 1),
                              num_classes=10)
  compile_options = []
  compile_ = jax.stages.Lowered.compile

  def spy(self, compiler_options=None, **kwargs):
    compile_options.append(compiler_options)
    return compile_(self, compiler_options=compiler_options, **kwargs)

  monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
  got = models.init_variables(model, 32, seed=3)
  shapes = jax.eval_shape(lambda: models.init_variables(model, 32, seed=3))
  monkeypatch.undo()
  assert compile_options == [xla_cpu.RUN_ONCE_OPTIONS]
  spec = lambda a: (a.shape, a.dtype)
  assert jax.tree.map(spec, shapes) == jax.tree.map(spec, got)
  want = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(3), jnp.zeros((1, 32, 32, 3), jnp.float32))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    # The same random bits; a multiply-add may round differently.
    np.testing.assert_allclose(g, w, rtol=1e-6,
                               atol=1e-6 * float(np.abs(w).max()))
  assert any(np.abs(w).max() > 0 for w in jax.tree.leaves(want))


def _config(model, **fields):
  c = default.get_config()
  c.model = model
  for k, v in fields.items():
    c[k] = v
  return c


def test_auto_picks_by_model_dtype_batch_and_cores():
  resolve = lambda model, cores=2, **f: policy.xla_cpu_flags(
      _config(model, **f), cpu_count=cores)
  assert resolve("cifar_resnet20") == xla_cpu.EIGEN_CONV_FLAGS
  assert resolve("cifar_vgg_small",
                 binary_compute_dtype="bfloat16") == xla_cpu.EIGEN_CONV_FLAGS
  assert resolve("cifar_resnet18", binary_compute_dtype="int8") == ""
  assert resolve("ir2net_a", batch_size=16) == xla_cpu.DATA_PARALLEL_FLAGS
  assert resolve("ir2net_d_resnet34", binary_compute_dtype="int8",
                 batch_size=16) == xla_cpu.DATA_PARALLEL_FLAGS
  # Only where two devices compute what one would, and have a core each.
  assert resolve("ir2net_a", cores=1) == ""
  assert resolve("ir2net_a", batch_size=15) == ""
  assert resolve("ir2net_a", batch_size=16, eval_batch_size=25) == ""
  assert resolve("ir2net_a", sync_batch_stats=False) == ""
  assert resolve("teacher_resnet34") == ""
  assert resolve("ir2net_a", xla_cpu_flags="--xla_foo=1") == "--xla_foo=1"
  assert resolve("cifar_resnet20", xla_cpu_flags="") == ""


_GRADIENTS = """
import sys
import jax, jax.numpy as jnp, numpy as np
from ir2net_jax import models
from ir2net_jax.nn import losses, objective


def inputs():
  model = models.create_model("cifar_resnet20", num_blocks=(1, 1, 1))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 8))
  return model, x, y, model.init(jax.random.key(0), x, train=False)


def gradients():
  model, x, y, v = inputs()
  grads, aux = jax.jit(jax.grad(
      lambda p: objective.two_pass_objective(
          p, v["batch_stats"], model, x, y, losses.cross_entropy),
      has_aux=True))(v["params"])
  return [np.asarray(a) for a in
          jax.tree.leaves(grads) + [aux.logits_erased, aux.mask]]


if __name__ == "__main__":
  np.savez(sys.argv[1], *gradients())
"""


@pytest.mark.slow
def test_tuned_flags_change_speed_not_results(tmp_path):
  """A two-pass ResNet-20 step's gradients here (XLA's default flags) and in
  a fresh process under EIGEN_CONV_FLAGS (XLA reads flags once per process)."""
  if xla_cpu.EIGEN_CONV_FLAGS in os.environ.get("XLA_FLAGS", ""):
    pytest.skip("this process already runs with EIGEN_CONV_FLAGS")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = tmp_path / "gradients.py"
  script.write_text(_GRADIENTS)
  out = str(tmp_path / "tuned.npz")
  env = dict(os.environ, XLA_FLAGS=xla_cpu.EIGEN_CONV_FLAGS, PYTHONPATH=root)
  subprocess.run([sys.executable, str(script), out], env=env, check=True,
                 timeout=600)
  tuned = np.load(out)
  namespace = {"__name__": "gradients_here"}
  exec(compile(_GRADIENTS, str(script), "exec"), namespace)  # pylint: disable=exec-used
  here = namespace["gradients"]()
  assert len(here) == len(tuned.files) > 20
  # Other kernels round differently; the comparison is meaningful only if no
  # binary-activation input of either pass lies within float32 rounding of
  # zero (sign_margins.py), measured in float64. Holds for this seed.
  model, x, _, v = namespace["inputs"]()
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), v)
    x64 = np.asarray(x, np.float64)
    for images in (x64, x64 * np.asarray(here[-1], np.float64)[..., None]):
      assert sign_margins.clears_rounding(sign_margins.activation_inputs(
          model, v64, images, train=True)), "choose another input seed"
  for i, a in enumerate(here):
    np.testing.assert_allclose(a, tuned[f"arr_{i}"], rtol=1e-4, atol=1e-5,
                               err_msg=str(i))
