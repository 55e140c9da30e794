"""BNN diagnostics (ir2net_jax.nn.diagnostics): each value against a direct
computation from the same step's inputs and outputs, the switch, and the
TensorBoard events of a digits run.

The step runs in float64 on 2 devices (see sign_margins.py: the direct
computations are other programs, and in float64 no binary activation near
zero flips between them).
"""

import functools

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

import train_utils
from ir2net_jax.train import loop, optim, parallel, step as step_lib
from ir2net_jax import models
from ir2net_jax.nn import binarize, diagnostics, layers, losses, objective
from ir2net_jax.configs import imagenet as imagenet_config

DEVICES = 2
BATCH = 8


def _config(**fields):
  """A tiny IR2Net-A stage 2 (binary weights, PReLU: activations outside
  [-1, 1]) with a learning rate that flips many weights in one step."""
  c = imagenet_config.get_config("a,stage=2")
  c.model_kwargs.num_blocks = (1, 1, 1, 1)
  c.image_size = 64      # a 2x2 last feature map: an attention map
  c.num_classes = 10
  c.batch_size = BATCH
  c.loss = "cross_entropy"
  c.learning_rate = 0.3
  c.erase_lambda = 1.0   # erases a good part of every image
  c.remat = True         # the layers sow from inside nn.remat
  c.update(fields)
  return c


def _binary_convs(model, variables, images, abstract=False):
  """``{path: (input x, binary_weights)}`` of every ``BinaryConv`` in the
  clean training pass, intercepted (under jit: the inputs come out as
  outputs); with ``abstract`` the inputs' shapes only, nothing computed."""
  flags = {}

  def run(variables, images):
    inputs = {}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if (isinstance(module, layers.BinaryConv)
          and context.method_name == "__call__"):
        path = "/".join(module.path)
        inputs[path], flags[path] = args[0], module.binary_weights
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      model.apply(variables, images, train=True, mutable=["batch_stats"])
    return inputs

  inputs = (jax.eval_shape(run, variables, images) if abstract
            else jax.device_get(jax.jit(run)(variables, images)))
  return {p: (x, flags[p]) for p, x in inputs.items()}


def _with_kernels(params, paths, rng):
  """``params`` with N(0, 1) latent kernels at ``paths``: a good part of
  them beyond |w| = 1, the rest small enough to flip."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  for path in paths:
    flat[f"{path}/kernel"] = rng.normal(size=flat[f"{path}/kernel"].shape)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _one_step(config, variables, batch):
  """One sharded float64 step: ``(params after, metrics)`` on the host."""
  model = step_lib.build_model(config, 10, parallel.AXIS)
  tx = optim.create_optimizer(config, variables["params"], model, 10)
  mesh = parallel.data_mesh(jax.devices()[:DEVICES])
  state = parallel.replicate(step_lib.create_train_state(variables, tx), mesh)
  step = step_lib.sharded_train_step(model, tx, config, mesh)
  state, metrics = step(state, jax.device_put(
      batch, parallel.batch_sharding(mesh)), {})
  return jax.device_get((state.params, metrics))


@pytest.fixture(scope="module")
def stepped():
  """The diagnostics step, its inputs and the direct computations."""
  with jax.enable_x64(True):
    config = _config()
    # The global batch at once; not rematerialised, so the layers' inputs
    # are concrete values the interceptor can read.
    plain = step_lib.build_model(_config(remat=False), 10, None)
    variables = train_utils.float64_variables(plain, config.image_size)
    batch = train_utils.float64_batch(
        train_utils.random_batch(0, BATCH, config.image_size))
    paths = _binary_convs(plain, variables, batch["image"], abstract=True)
    variables = dict(variables, params=_with_kernels(
        variables["params"], paths, np.random.default_rng(1)))
    convs = _binary_convs(plain, variables, batch["image"])
    _, aux = jax.jit(functools.partial(
        objective.two_pass_objective, model=plain,
        loss_fn=losses.cross_entropy, lam=config.erase_lambda))(
            variables["params"], variables["batch_stats"],
            images=batch["image"], target=batch["label"])
    after, metrics = _one_step(config, variables, batch)
    return dict(config=config, variables=variables, batch=batch, convs=convs,
                mask=np.asarray(aux.mask), after=after, metrics=metrics)


def _per_layer(metrics, name):
  prefix = f"diag/{name}/"
  return {k[len(prefix):]: float(v) for k, v in metrics.items()
          if k.startswith(prefix) and k != prefix + "mean"}


def _kernel(params, path):
  return np.asarray(flax.traverse_util.flatten_dict(params, sep="/")[
      f"{path}/kernel"])


@pytest.mark.slow
def test_flip_ratio_is_the_fraction_of_changed_signs(stepped):
  before, after = stepped["variables"]["params"], stepped["after"]
  flips = _per_layer(stepped["metrics"], "flip_ratio")
  assert set(flips) == set(stepped["convs"])
  expected = {p: np.mean(np.sign(_kernel(before, p))
                         != np.sign(_kernel(after, p))) for p in flips}
  for path, value in flips.items():
    np.testing.assert_allclose(value, expected[path], rtol=1e-6, err_msg=path)
  assert 0 < np.mean(list(expected.values())) < 1
  np.testing.assert_allclose(stepped["metrics"]["diag/flip_ratio/mean"],
                             np.mean(list(expected.values())), rtol=1e-6)


def test_latent_gt1_counts_the_step_input_weights(stepped):
  before = stepped["variables"]["params"]
  gt1 = _per_layer(stepped["metrics"], "latent_gt1")
  assert set(gt1) == set(stepped["convs"])
  for path, value in gt1.items():
    expected = np.count_nonzero(np.abs(_kernel(before, path)) > 1) / \
        _kernel(before, path).size
    assert 0 < expected < 1
    np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=path)


def test_act_in_clip_of_the_intercepted_clean_pass_inputs(stepped):
  in_clip = _per_layer(stepped["metrics"], "act_in_clip")
  assert set(in_clip) == set(stepped["convs"])
  # The leading act_sample_size examples of each device's batch.
  local = BATCH // DEVICES
  sample = np.concatenate([
      np.arange(d * local, d * local + diagnostics.act_sample_size(local))
      for d in range(DEVICES)])
  expected = {p: np.mean(np.abs(x[sample])
                         <= binarize.clipping_range("approx_sign"))
              for p, (x, _) in stepped["convs"].items()}
  for path, value in in_clip.items():
    np.testing.assert_allclose(value, expected[path], rtol=1e-6, err_msg=path)
  assert 0 < min(expected.values()) and min(expected.values()) < 1
  np.testing.assert_allclose(stepped["metrics"]["diag/act_in_clip/mean"],
                             np.mean(list(expected.values())), rtol=1e-6)


def test_kept_pixels_per_image_are_the_mask_means(stepped):
  kept = stepped["metrics"]["kept_pixels_per_image"]
  expected = stepped["mask"].mean(axis=(1, 2))
  assert kept.shape == (BATCH,)
  assert np.ptp(expected) > 0 and expected.min() < 1
  np.testing.assert_allclose(kept, expected, rtol=1e-6)
  np.testing.assert_allclose(stepped["metrics"]["kept_pixels"],
                             expected.mean(), rtol=1e-6)


@pytest.mark.slow
def test_switched_off_the_step_is_the_same_without_diagnostics(stepped):
  with jax.enable_x64(True):
    after, metrics = _one_step(_config(diagnostics=False),
                               stepped["variables"], stepped["batch"])
  assert set(metrics) == {"loss", "loss_clean", "loss_erased", "top1",
                          "kept_pixels", "grad_norm", "finite"}
  on = stepped["metrics"]
  assert set(on) - set(metrics) == {
      k for k in on if k.startswith("diag/")} | {"kept_pixels_per_image"}
  np.testing.assert_allclose(metrics["loss"], on["loss"], rtol=1e-12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10,
                                                       atol=1e-12),
               after, stepped["after"])


def test_stage1_reports_activations_only():
  config = _config(stage=1, remat=False)
  model = step_lib.build_model(config, 10, None)
  variables = jax.eval_shape(lambda: models.init_variables(model, 32, 0))
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)
  _, state = jax.eval_shape(functools.partial(
      model.apply, train=True,
      mutable=["batch_stats", diagnostics.COLLECTION]), variables, images)
  sown = flax.traverse_util.flatten_dict(state[diagnostics.COLLECTION],
                                         sep="/")
  convs = _binary_convs(model, variables, images, abstract=True)
  assert not any(binary for _, binary in convs.values())
  assert set(sown) == {f"{p}/act_in_clip" for p in convs}


@pytest.mark.parametrize("estimator", ["approx_sign", "clipped_ste",
                                       "ste_sign", "swish_sign"])
def test_clipping_range_is_where_the_gradient_can_be_nonzero(estimator):
  x = np.linspace(-3, 3, 601, dtype=np.float32)
  grad = np.asarray(jax.vmap(jax.grad(binarize.get_estimator(estimator)))(x))
  c = binarize.clipping_range(estimator)
  if c is None:
    assert np.all(grad != 0)
  else:
    assert np.all(grad[np.abs(x) > c] == 0)
    assert np.all(grad[np.abs(x) < c] != 0)


def test_estimator_without_clipping_sows_no_act_in_clip():
  conv = layers.BinaryConv(4, activation_estimator="ste_sign")
  x = np.ones((1, 4, 4, 3), np.float32)
  variables = conv.init(jax.random.key(0), x)
  assert set(variables) == {"params"}   # init sows nothing
  _, state = conv.apply(variables, x, mutable=[diagnostics.COLLECTION])
  assert set(state[diagnostics.COLLECTION]) == {"latent_gt1"}


@pytest.mark.slow
def test_digits_run_writes_diagnostics_to_tensorboard(tmp_path, digits_dir):
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  config = train_utils.tiny_digits_config(digits_dir, log_every_steps=3)
  loop.train_and_evaluate(config, str(tmp_path))
  events = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  tags = set(events.Tags()["tensors"])
  for name in ("flip_ratio", "latent_gt1", "act_in_clip"):
    assert f"train_diag/{name}/mean" in tags
    assert f"train_diag/{name}/layer1_0/conv1" in tags
  histograms = events.Tensors("train_kept_pixels_per_image")
  assert [h.step for h in histograms] == [3, 6]
  for h in histograms:  # (buckets, [left, right, count]): every image
    buckets = tensor_util.make_ndarray(h.tensor_proto)
    assert buckets[:, 2].sum() == 3 * config.batch_size
    assert 0 <= buckets[:, 0].min() and buckets[:, 1].max() <= 1
