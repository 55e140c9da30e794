"""What a GPU or TPU would run, read on the CPU from ``jax.export``.

The real train step (``step.sharded_train_step``: student, teacher,
optimizer, two passes) is built for the target backend with
``policy.resolve(config, backend)`` and lowered for ``cuda`` / ``tpu`` to
StableHLO, whose convolution and dot operand types are read here. A CPU
lowering of the same config is the positive control: its CPU-only kernels
must show up where the accelerator programs must not have them.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ir2net_jax.configs import cifar10_resnet20, imagenet as imagenet_config
from ir2net_jax.train import optim, parallel, step as step_lib
from ir2net_jax import models
from ir2net_jax.nn import kernels, layers, losses, objective

NUM_CLASSES = 10
BATCH = 2


def _config(recipe: str, dtype: str):
  if recipe == "cifar_resnet20":
    c = cifar10_resnet20.get_config()
    c.model_kwargs.num_blocks = (1, 1, 1)
  else:  # 'ir2net_b_stage2': CIRec (grouped convs), binary weights, teacher
    c = imagenet_config.get_config("b,stage=2")
    c.model_kwargs.num_blocks = (1, 1, 1, 1)
    c.teacher_kwargs.num_blocks = (1, 1, 1, 1)
  c.image_size = 32
  c.batch_size = BATCH
  c.dtype = dtype
  return c


@functools.lru_cache(maxsize=None)
def _lowered(recipe: str, dtype: str, platform: str) -> str:
  """StableHLO text of the sharded train step of ``recipe`` for
  ``platform``, built with that platform's policy."""
  config = _config(recipe, dtype)
  model = step_lib.build_model(config, NUM_CLASSES, parallel.AXIS,
                            backend=platform)
  teacher = (step_lib.build_teacher(config, NUM_CLASSES, backend=platform)
             if config.loss == "distillation" else None)
  size = config.image_size
  mesh = parallel.data_mesh(jax.devices()[:1])
  replicated = lambda tree: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                     sharding=parallel.replicated(mesh)),
      tree)
  variables = jax.eval_shape(lambda: models.init_variables(model, size, 0))
  tx = optim.create_optimizer(config, variables["params"], model, 10)
  state = jax.eval_shape(lambda v: step_lib.create_train_state(v, tx), variables)
  teacher_vars = (jax.eval_shape(lambda: models.init_variables(teacher, size,
                                                              0))
                  if teacher else {})
  batch = jax.tree.map(
      lambda shape, dtype: jax.ShapeDtypeStruct(
          shape, dtype, sharding=parallel.batch_sharding(mesh)),
      {"image": (BATCH, size, size, 3), "label": (BATCH,)},
      {"image": jnp.dtype(config.dtype), "label": jnp.dtype(jnp.int32)},
      is_leaf=lambda x: isinstance(x, tuple))
  step = step_lib.sharded_train_step(model, tx, config, mesh, teacher)
  exported = jax.export.export(step, platforms=[platform])(
      replicated(state), batch, replicated(teacher_vars))
  return exported.mlir_module()


_TENSOR = r"tensor<([0-9x]*)(\w+)>"


def _ops(text: str, op: str):
  """[(operand element types, operand ranks, result element type)] of every
  ``stablehlo.<op>`` in ``text``."""
  found = []
  for line in text.splitlines():
    if f"stablehlo.{op}" not in line:
      continue
    m = re.search(rf":\s*\({_TENSOR}, {_TENSOR}\)\s*->\s*{_TENSOR}", line)
    assert m, line
    found.append(((m.group(2), m.group(4)),
                  (m.group(1).count("x"), m.group(3).count("x")),
                  m.group(6)))
  return found


CASES = [("cifar_resnet20", "cuda"), ("ir2net_b_stage2", "cuda"),
         ("ir2net_b_stage2", "tpu")]


@pytest.mark.parametrize("recipe,platform", CASES)
def test_bfloat16_every_convolution_takes_bfloat16(recipe, platform):
  convs = _ops(_lowered(recipe, "bfloat16", platform), "convolution")
  assert len(convs) > 40
  assert {c[0] for c in convs} == {("bf16", "bf16")}, convs
  # The binary convolutions sum in float32 (exact): some results are f32.
  assert {c[2] for c in convs} == {"bf16", "f32"}


@pytest.mark.parametrize("recipe,platform", CASES)
def test_float32_every_convolution_takes_float32(recipe, platform):
  convs = _ops(_lowered(recipe, "float32", platform), "convolution")
  assert len(convs) > 40
  assert {c[0] for c in convs} == {("f32", "f32")}, convs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("recipe,platform", CASES)
def test_no_cpu_kernels_on_accelerators(recipe, platform, dtype):
  """No int8 and no tap-wise grouped weight gradient (rank-5 contractions)
  off the CPU; the CPU program of the same config has them."""
  def cpu_kernels(text):
    dots = _ops(text, "dot_general")
    return {"int8": "xi8>" in text,
            "taps": any(max(ranks) > 2 for _, ranks, _ in dots)}

  assert cpu_kernels(_lowered(recipe, dtype, platform)) == {
      "int8": False, "taps": False}
  on_cpu = cpu_kernels(_lowered(recipe, dtype, "cpu"))
  assert on_cpu == {"int8": recipe.startswith("ir2net"), "taps": True}


def test_binary_convolution_is_bit_identical_in_bfloat16():
  """±1 operands summed in float32: the same bits as float32 operands, for
  a 3x3 conv with fan-in 4608 (the widest in IR2Net)."""
  rng = np.random.default_rng(0)
  # Mostly positive signs: sums in the thousands, where bfloat16 has no
  # integers to spare.
  x = jnp.asarray(rng.normal(1.0, 1.0, size=(2, 6, 6, 512)), jnp.float32)
  k = jnp.asarray(rng.normal(1.0, 1.0, size=(3, 3, 512, 8)), jnp.float32)
  conv = layers.BinaryConv(8)
  v = {"params": {"kernel": k}}
  y32 = conv.apply(v, x)
  y16 = conv.clone(dtype=jnp.bfloat16).apply(v, x)
  assert y16.dtype == jnp.float32 and np.abs(y32).max() > 1024
  np.testing.assert_array_equal(y16, y32)
  # Cast to bfloat16, sums above 256 would have lost their low bits.
  assert not np.array_equal(y32.astype(jnp.bfloat16).astype(jnp.float32), y32)
  direct = kernels.low_precision_conv(jnp.sign(x), jnp.sign(k), 1, 1,
                                      "bfloat16")
  np.testing.assert_array_equal(direct, y32)


@pytest.mark.slow
def test_bfloat16_step_is_the_float32_step_within_tolerance():
  """The bfloat16 training step of a tiny IR2Net-A stage 2 and its teacher
  against the float32 one, from the same float32 parameters.

  Tolerances (relative to the float32 value; measured on seeds 0-2):
  the real-valued teacher's logits 5e-2 (measured <= 2.4e-2); the student's
  loss 5e-2 (<= 1.5e-2) and logits 0.5 (<= 0.33). A binary network
  magnifies rounding: where bfloat16 moves an activation across 0 its sign
  flips and a ±1 sum moves by 2, so the student's logits differ by as much
  as a float32 run on inputs perturbed by 0.4 % (bfloat16's precision) does.
  Parameters, gradients and optimizer state stay float32.
  """
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, 4))
  out, variables = {}, None
  for dtype in ("float32", "bfloat16"):
    config = _config("ir2net_a_stage2", dtype)
    config.model = "ir2net_a"
    # The GPU's kernels (no int8), run here on the CPU.
    student = step_lib.build_model(config, NUM_CLASSES, backend="gpu")
    teacher = step_lib.build_teacher(config, NUM_CLASSES, backend="gpu")
    if variables is None:  # float32, the same for both dtypes
      variables = (models.init_variables(student, 32, 0),
                   models.init_variables(teacher, 32, 0))
    v, tv = variables
    (loss, aux), grads = jax.jit(jax.value_and_grad(
        lambda p: objective.two_pass_objective(
            p, v["batch_stats"], student, images.astype(dtype), labels,
            losses.cross_entropy), has_aux=True))(v["params"])
    teacher_logits, _ = jax.jit(lambda t: teacher.apply(t, images,
                                                        train=False))(tv)
    assert {a.dtype for a in jax.tree.leaves((variables, grads))} == {
        jnp.dtype(jnp.float32)}
    assert aux.logits_clean.dtype == teacher_logits.dtype == dtype
    assert loss.dtype == jnp.float32
    out[dtype] = (loss, aux.logits_clean, teacher_logits)

  def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()

  (l32, s32, t32), (l16, s16, t16) = out["float32"], out["bfloat16"]
  assert 0 < rel(t16, t32) <= 5e-2
  assert 0 < rel(l16, l32) <= 5e-2
  assert 0 < rel(s16, s32) <= 0.5


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_device_input_engine_step_lowers_for_accelerators(platform):
  """The device engine's step (batch drawn from the arrays on the device:
  permutation, gather, crop, flip, normalise) lowers for GPUs and TPUs, in
  bfloat16, with the data gathered on the device and no host callback."""
  from ir2net_jax.data.device import on_device  # pylint: disable=g-import-not-at-top
  config = _config("cifar_resnet20", "bfloat16")
  config.dataset = "cifar10"
  model = step_lib.build_model(config, NUM_CLASSES, parallel.AXIS,
                               backend=platform)
  mesh = parallel.data_mesh(jax.devices()[:1])
  spec = lambda tree, sharding: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      tree)
  variables = jax.eval_shape(lambda: models.init_variables(model, 32, 0))
  tx = optim.create_optimizer(config, variables["params"], model, 10)
  state = jax.eval_shape(lambda v: step_lib.create_train_state(v, tx),
                         variables)
  images = lambda n: jax.ShapeDtypeStruct((n, 32, 32, 3), jnp.uint8)
  labels = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)
  arrays = on_device.DeviceArrays(images(100), labels(100), images(20),
                                  labels(20),
                                  jax.ShapeDtypeStruct((20,), jnp.float32))
  batch_fn = functools.partial(
      on_device.train_batch, seed=0, batch_size=BATCH, steps_per_epoch=50,
      recipe_=on_device.recipe(config), sharding=parallel.batch_sharding(mesh))
  step = step_lib.sharded_train_step(model, tx, config, mesh,
                                     batch_fn=batch_fn)
  text = jax.export.export(step, platforms=[platform])(
      spec(state, parallel.replicated(mesh)),
      spec(arrays, parallel.replicated(mesh)), {}).mlir_module()
  assert "tensor<100x32x32x3xui8>" in text   # the data, as an argument
  assert "custom_call @xla_python" not in text and "callback" not in text
  convs = _ops(text, "convolution")
  assert convs and all(c[0] == ("bf16", "bf16") for c in convs), convs[:2]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_grain_windows_resized_on_accelerators(platform):
  """grain's finish with the windows on canvases (input_resize='device', as
  'auto' runs on accelerators) lowers for GPUs and TPUs: the resize's
  matrix products take bfloat16 operands (levels and 8-bit digits, exact
  there) into float32 results, whose integer sums stay exact; the images
  leave it in bfloat16; no host callback."""
  from ir2net_jax.data.grain import (  # pylint: disable=g-import-not-at-top
      grain_inputs, host_recipes, pillow_resize)
  size, batch = 224, 8
  side = host_recipes.canvas_size(size)
  taps = pillow_resize.resize_taps(side, size)
  spec = jax.ShapeDtypeStruct
  finish = jax.jit(functools.partial(grain_inputs.finish_batch,
                                     dtype=jnp.bfloat16))
  text = jax.export.export(finish, platforms=[platform])({
      "image": spec((batch, side, side, 3), jnp.uint8),
      "resize": spec((batch, 2, size, 1 + taps), jnp.int32),
      "vertical_first": spec((batch,), jnp.bool_),
      "shift": spec((batch, 3), jnp.int32),
      "flip": spec((batch,), jnp.bool_),
      "label": spec((batch,), jnp.int32)}).mlir_module()
  main = next(line for line in text.splitlines() if "@main(" in line)
  assert f"-> (tensor<{batch}x{size}x{size}x3xbf16>" in main
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) == 2, dots
  for d in dots:   # (bf16 digits, bf16 levels) -> f32
    operands, result = d.split(" : ")[1].split(" -> ")
    assert set(re.findall(r"tensor<[\dx]+x(\w+)>", operands)) == {"bf16"}, d
    assert re.findall(r"tensor<[\dx]+x(\w+)>", result) == ["f32"], d
  assert "custom_call @xla_python" not in text and "callback" not in text
