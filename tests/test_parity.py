"""Parity with the PyTorch reference's recorded numbers.

For every fixture file in tests/fixtures/reference, the weights are rebuilt
from its spec, converted, and every array it holds is compared at the
tolerances of the fixtures' README: in float32 against the float32 arrays,
and in float64 (``jax.enable_x64``) against the ``f64/`` arrays. Nothing
about a particular fixture set is hard-coded.

The students (binary networks) are compared here in float64 only: in
float32 a binary activation whose input lies within rounding of zero can flip
on one CPU and not on another, and the flip changes everything after it
(``sign_margins.py``). Their float32 program is checked layer by layer
(``test_float32_layer_by_layer``, ``parity_layers.py``), where no flip can
cascade. The teachers (float networks) are compared in both precisions.
Nothing is skipped.

The float64 numbers compared here come from the capture that the layer by
layer check runs anyway (``parity_layers.float64_run``): one float64 program
per pass and fixture serves both, and conftest.py runs a fixture's tests one
after the other.

Set IR2NET_PARITY_REPORT=path to write the largest error of each check.
"""

import atexit
import collections
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parity_layers
import reference_fixtures as rf
from ir2net_jax.io import torch_layout
from ir2net_jax.nn import layers, losses, objective, restriction

PATHS = rf.fixture_paths()
STUDENTS = [p for p in PATHS if rf.load(p).meta["kind"] == "student"]
TEACHERS = [p for p in PATHS if rf.load(p).is_teacher]
# The fast tier (-m "not slow") keeps one model; each other fixture compiles
# its own network's training step in float64 (20-30 s on 2 cores).
FAST = "cifar_resnet20"


def _case(path, *values):
  name = rf.load(path).name
  marks = [] if name == FAST else [pytest.mark.slow]
  return pytest.param(path, *values, marks=marks,
                      id="-".join([name, *map(str, values)]))


# Every fixture in float64, the teachers also in float32.
EVAL_CASES = ([_case(p, "f64") for p in PATHS] +
              [_case(p, "f32") for p in TEACHERS])
STUDENT_CASES = [_case(p) for p in STUDENTS]
ERRORS = collections.defaultdict(dict)


def _record(fx, prec, check, err):
  key = f"{fx.name}/{prec}"
  ERRORS[key][check] = max(float(err), ERRORS[key].get(check, 0.0))


@atexit.register
def _write_report():
  path = os.environ.get("IR2NET_PARITY_REPORT")
  if path and ERRORS:
    with open(path, "w") as f:
      json.dump(ERRORS, f, indent=1, sort_keys=True)


def _ref(fx, name, prec):
  return fx.data[name if prec == "f32" else "f64/" + name]


def _tolerances(fx, prec):
  if prec == "f64":
    return dict(value=1e-9, attention=1e-9, grad_l2=1e-8, grad_sample=1e-8,
                bn=1e-9)
  grad = 1e-3 if fx.is_imagenet else 1e-4
  return dict(value=1e-4, attention=1e-4, grad_l2=grad,
              grad_sample=10 * grad, bn=1e-5)


@functools.lru_cache(maxsize=None)
def _run(path, prec, train=True, compute_dtype=None):
  """Runs the port on a fixture: eval pass and the recorded training step.

  ``compute_dtype`` selects a speed option of the binary convolutions. The
  plain float64 run is the layer by layer check's capture.
  """
  fx = rf.load(path)
  if fx.is_teacher:
    return {"eval_logits": parity_layers.teacher_logits(
        fx.name, prec, fx.data["input"].tobytes(), fx.data["input"].shape)}
  if prec == "f64" and compute_dtype is None:
    run = parity_layers.float64_run(path)
    return _arrays(fx.model(), run.eval_out, train and run.train_out)
  with jax.enable_x64(prec == "f64"):
    dtype = np.float64 if prec == "f64" else np.float32
    model = fx.model(**({"compute_dtype": compute_dtype} if compute_dtype
                        else {}))
    variables = fx.variables(dtype)
    x = jnp.asarray(fx.nhwc("input").astype(dtype))
    eval_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, x)
    if not train:
      return _arrays(model, eval_out, None)
    if fx.meta.get("teacher"):
      target = jnp.asarray(parity_layers.fixture_teacher_logits(fx, prec))
      loss_fn = losses.distribution_loss
    else:
      target = jnp.asarray(fx.data["labels"].astype(np.int32))
      loss_fn = losses.cross_entropy

    @jax.jit
    def step(params, batch_stats, x, target):
      return jax.value_and_grad(objective.two_pass_objective, has_aux=True)(
          params, batch_stats, model, x, target, loss_fn,
          fx.meta["erase_lambda"])

    (loss, aux), grads = step(variables["params"], variables["batch_stats"],
                              x, target)
    return _arrays(model, eval_out, jax.device_get(
        dict(loss=loss, aux=aux, grads=grads)))


def _arrays(model, eval_out, train_out):
  """``_run``'s arrays (torch layout for gradients and statistics) from the
  eval pass's ``(logits, feature)`` and the training step's ``{loss, aux,
  grads}`` (None: no training step)."""
  out = {"eval_logits": np.asarray(eval_out[0]),
         "eval_feature": np.asarray(eval_out[1])}
  if not train_out:
    return out
  aux = train_out["aux"]
  with jax.enable_x64(True):  # in the feature map's own precision
    attention = np.asarray(restriction.attention_map(jnp.asarray(aux.feature)))
  out.update(
      loss=np.asarray(train_out["loss"]), loss_terms=np.asarray(aux.loss_terms),
      train_logits1=np.asarray(aux.logits_clean),
      train_logits2=np.asarray(aux.logits_erased),
      train_feature1=np.asarray(aux.feature), erase_mask=np.asarray(aux.mask),
      attention=attention)
  out["grads"] = torch_layout.flax_to_torch({"params": train_out["grads"]},
                                            model)
  out["bn_after"] = torch_layout.flax_to_torch(
      {"batch_stats": aux.batch_stats}, model)
  return out


def _check_value(fx, prec, name, port, tol, transpose=False):
  ref = _ref(fx, name, prec)
  if transpose:
    ref = ref.transpose(0, 2, 3, 1)
  assert port.shape == ref.shape, (name, port.shape, ref.shape)
  err = rf.rel(port, ref)
  _record(fx, prec, name, err)
  assert err <= tol, f"{fx.name} {prec} {name}: rel {err:.3g} > {tol:g}"


def _check_feature_in_float64(fx, name, logits_name, port):
  """The port's float64 feature map against the reference's float32 one.

  The fixtures store feature maps in float32 only. Where the reference's own
  float32 pass did not diverge from its float64 pass (its float32 and
  ``f64/`` logits agree to float32 rounding, a property of the file alone),
  its float32 feature map is the float64 one to within float32 rounding, so
  the port's float64 map must match it at the float32 tolerance, on any
  machine (no float32 arithmetic of the port is involved). Where the
  reference diverged (ImageNet stage-1 training pass), there is nothing to
  compare with.
  """
  ref_diverged = rf.rel(fx.data[logits_name], fx.data["f64/" + logits_name])
  if ref_diverged > 1e-5:
    return
  ref = fx.data[name].transpose(0, 2, 3, 1)
  assert port.shape == ref.shape, (name, port.shape, ref.shape)
  err = rf.rel(port, ref)
  _record(fx, "f64", name + " vs float32 reference", err)
  tol = _tolerances(fx, "f32")["value"]
  assert err <= tol, f"{fx.name} f64 {name}: rel {err:.3g} > {tol:g}"


def _mask_mismatches(port, ref):
  return (np.asarray(port) != np.asarray(ref, port.dtype)).reshape(
      port.shape[0], -1).sum(axis=1)


@pytest.mark.parametrize("path,prec", EVAL_CASES)
def test_eval_pass(path, prec):
  fx = rf.load(path)
  tol = _tolerances(fx, prec)["value"]
  if "teacher_logits" in fx.data:  # a float network: no binary activation
    _check_value(fx, prec, "teacher_logits",
                 parity_layers.fixture_teacher_logits(fx, prec), tol)
  out = _run(path, prec, train=not fx.is_teacher)
  _check_value(fx, prec, "eval_logits", out["eval_logits"], tol)
  if prec == "f64" and "eval_feature" in fx.data:
    _check_feature_in_float64(fx, "eval_feature", "eval_logits",
                              out["eval_feature"])


@pytest.mark.parametrize("path", STUDENT_CASES)
def test_training_forward_and_loss(path):
  """The clean pass (and what it decides: attention, erase mask), then the
  erased pass and the loss."""
  prec = "f64"
  fx, tol = rf.load(path), _tolerances(rf.load(path), prec)
  out = _run(path, prec)
  _check_value(fx, prec, "train_logits1", out["train_logits1"], tol["value"])
  _check_feature_in_float64(fx, "train_feature1", "train_logits1",
                            out["train_feature1"])
  att, ref = out["attention"], _ref(fx, "attention", prec)
  err = float(np.max(np.abs(att - ref) / np.abs(ref)))
  _record(fx, prec, "attention", err)
  assert err <= tol["attention"], err
  bad = _mask_mismatches(out["erase_mask"], _ref(fx, "erase_mask", prec))
  _record(fx, prec, "erase_mask_mismatches", bad.max())
  assert np.all(bad == 0), bad
  for name in ("train_logits2", "loss", "loss_terms"):
    _check_value(fx, prec, name, out[name], tol["value"])


@pytest.mark.parametrize("path", STUDENT_CASES)
def test_gradients(path):
  prec = "f64"
  fx, out = rf.load(path), _run(path, prec)
  tol = _tolerances(fx, prec)
  keys = [k[len("grad_l2/"):] for k in fx.data if k.startswith("grad_l2/")]
  assert set(keys) == set(out["grads"]), "parameter sets differ"
  for key in keys:
    g = out["grads"][key].astype(np.float64)
    ref_l2 = float(_ref(fx, f"grad_l2/{key}", prec))
    rms = ref_l2 / np.sqrt(g.size)
    err_l2 = abs(np.linalg.norm(g) - ref_l2) / max(ref_l2, 1e-300)
    _record(fx, prec, "grad_l2", err_l2)
    assert err_l2 <= tol["grad_l2"], (key, err_l2)
    err_sum = abs(g.sum() - float(_ref(fx, f"grad_sum/{key}", prec))) / max(
        ref_l2 * np.sqrt(g.size), 1e-300)
    _record(fx, prec, "grad_sum", err_sum)
    assert err_sum <= tol["grad_l2"], (key, err_sum)
    idx = fx.data[f"grad_idx/{key}"]
    sample = g.reshape(-1)[idx]
    ref_s = _ref(fx, f"grad_sample/{key}", prec).astype(np.float64)
    err_s = np.max(np.abs(sample - ref_s) / (np.abs(ref_s) + rms + 1e-300))
    _record(fx, prec, "grad_sample", err_s)
    assert err_s <= tol["grad_sample"], (key, err_s)


@pytest.mark.parametrize("path", STUDENT_CASES)
def test_batchnorm_statistics_after_both_passes(path):
  prec = "f64"
  fx, out = rf.load(path), _run(path, prec)
  keys = [k[len("bn_after/"):] for k in fx.data if k.startswith("bn_after/")]
  assert set(keys) == set(out["bn_after"])
  for key in keys:
    err = rf.rel(out["bn_after"][key], _ref(fx, f"bn_after/{key}", prec))
    _record(fx, prec, "bn_after", err)
    assert err <= _tolerances(fx, prec)["bn"], (key, err)


@pytest.mark.parametrize("path", STUDENTS, ids=[rf.load(p).name for p in STUDENTS])
def test_erase_in_isolation(path):
  """The upsample and threshold alone, fed the reference's attention maps."""
  fx = rf.load(path)
  size = fx.data["input"].shape[2:]
  lam = fx.meta["erase_lambda"]
  for prefix, ties in (("", "mask_near_ties"), ("erase_probe/", "erase_probe/near_ties")):
    att = jnp.asarray(fx.data[prefix + "attention"])
    mask = np.asarray(restriction.erase_mask(att, size, lam))
    bad = _mask_mismatches(mask, fx.data[prefix + ("mask" if prefix else "erase_mask")])
    _record(fx, "f32", prefix + "mask_mismatches_given_attention", bad.max())
    assert np.all(bad <= fx.data[ties]), (prefix, bad)
  # The probe's attention from its stored feature map.
  feature = jnp.asarray(fx.data["erase_probe/feature"].transpose(0, 2, 3, 1))
  att = np.asarray(restriction.attention_map(feature))
  ref = fx.data["erase_probe/attention"]
  err = float(np.max(np.abs(att - ref) / np.abs(ref)))
  _record(fx, "f32", "erase_probe/attention", err)
  assert err <= 1e-4
  # And the whole restriction, erased images included.
  images = jnp.asarray(fx.nhwc("input"))
  erased, mask = restriction.information_restriction(feature, images, lam)
  bad = _mask_mismatches(np.asarray(mask), fx.data["erase_probe/mask"])
  assert np.all(bad <= fx.data["erase_probe/near_ties"])
  np.testing.assert_array_equal(np.asarray(erased),
                                np.asarray(images) * np.asarray(mask)[..., None])
  assert 0 < np.asarray(mask).mean() < 1  # the probe really erases


@pytest.mark.slow
def test_second_pass_sees_erased_images():
  """With a hand-made mask, the second forward receives ``image * mask``."""
  fx = rf.load(STUDENTS[0])
  model, variables = fx.model(), fx.variables()
  x = jnp.asarray(fx.nhwc("input"))
  h, w = x.shape[1:3]
  mask = (jnp.arange(h)[:, None] + jnp.arange(w)[None, :]) % 3 != 0
  mask = jnp.broadcast_to(mask, x.shape[:3]).astype(x.dtype)
  labels = jnp.asarray(fx.data["labels"].astype(np.int32))
  seen = {}

  def restrict(feature, images, lam):
    seen["feature_shape"] = feature.shape
    return images * mask[..., None], mask

  _, aux = objective.two_pass_objective(
      variables["params"], variables["batch_stats"], model, x, labels,
      losses.cross_entropy, restrict=restrict)
  # By hand: clean pass (updating the statistics), then the masked batch.
  _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  (expected, _), state2 = model.apply(
      {"params": variables["params"], "batch_stats": state["batch_stats"]},
      x * mask[..., None], train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(aux.logits_erased, expected, rtol=1e-5, atol=1e-5)
  assert rf.rel(aux.logits_erased, aux.logits_clean) > 1e-3
  np.testing.assert_array_equal(aux.mask, mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               aux.batch_stats, state2["batch_stats"])


def _speed_option_cases():
  """Each speed option on half of the fixtures with binary weights (where the
  low-precision paths apply), taken in turn, so that each option runs on
  CIFAR and on ImageNet networks: the options change the binary convolution
  alone, which every network calls alike."""
  binary = [p for p in STUDENTS if rf.load(p).meta["weights_binarized"]]
  cifar = [p for p in binary if not rf.load(p).is_imagenet]
  imagenet = [p for p in binary if rf.load(p).is_imagenet]
  options = ("int8", "bfloat16")
  cases = [_case(p, options[i % 2]) for i, p in enumerate(cifar)]
  # The first ImageNet stage-2 fixture with the option the last CIFAR one
  # did not get, the second with the other.
  cases += [_case(p, options[(len(cifar) + i) % 2])
            for i, p in enumerate(imagenet[:2])]
  return cases


@pytest.mark.parametrize("path,option", _speed_option_cases())
def test_speed_options_keep_parity(path, option):
  """Low-precision binary convolutions change no number.

  Run in float64, where no sign near-tie can decide the outcome: the
  ``option`` path must match the reference's float64 numbers and give the
  plain path's gradients (forward sums of +-1 are exact in int8 / bfloat16
  with int32 / float32 accumulation; the backward stays in the inputs'
  dtype).
  """
  fx = rf.load(path)
  out = _run(path, "f64", compute_dtype=option)
  tol = _tolerances(fx, "f64")
  for name in ("eval_logits", "train_logits1", "train_logits2", "loss"):
    _check_value(fx, "f64", name, out[name], tol["value"])
  plain = _run(path, "f64")
  for key, g in out["grads"].items():
    np.testing.assert_allclose(g, plain["grads"][key], rtol=1e-10,
                               atol=1e-12 * np.abs(plain["grads"][key]).max(),
                               err_msg=key)


def _layer_cases():
  """Every fixture, each pass (slow: each compiles its layers in float32)."""
  cases = []
  for p in PATHS:
    fx = rf.load(p)
    for mode in ("eval",) + (() if fx.is_teacher else ("train",)):
      cases.append(pytest.param(p, mode, id=f"{fx.name}-{mode}",
                                marks=[pytest.mark.slow]))
  return cases


@pytest.mark.parametrize("path,mode", _layer_cases())
def test_float32_layer_by_layer(path, mode):
  """Float32, one module call at a time, within its rounding bound."""
  results = parity_layers.check_fixture(path, mode == "train")
  assert results
  compared = sum(r.compared for r in results)
  uncertain = sum(r.uncertain for r in results)
  assert uncertain <= parity_layers.MAX_UNCERTAIN_FRACTION * max(compared, 1), (
      uncertain, compared)
  kinds = {r.kind for r in results}
  assert "BinaryConv" in kinds or rf.load(path).is_teacher
  assert "BatchNorm" in kinds


def test_a_wrong_float32_layer_fails():
  """The check is not vacuous: float32 layers that are slightly wrong fail,
  the right ones pass (small synthetic layers: fast)."""
  bn = layers.BatchNorm(use_running_average=False)
  bn_call = parity_layers.synthetic_call(bn, (2, 6, 6, 8), train=True)
  conv = layers.BinaryConv(8, binary_weights=False)
  conv_call = parity_layers.synthetic_call(conv, (2, 6, 6, 8), train=True, seed=1)
  for call in (bn_call, conv_call):
    assert parity_layers.check_call(call).worst <= 1
  # A BatchNorm whose float32 output is off by one part in 10^5.
  with pytest.raises(AssertionError, match="output"):
    parity_layers.check_call(bn_call, perturb=lambda out: (out[0] * (1 + 1e-5),) + out[1:])
  # A BatchNorm whose float32 running variance misses the unbiased factor.
  with pytest.raises(AssertionError, match="batch_stats after"):
    parity_layers.check_call(bn_call, perturb=lambda out: (
        out[0], jax.tree.map(lambda v: v * (1 - 1e-4), out[1]), out[2]))
  # A float32 binary conv with another estimator: ApproxSign -> plain STE.
  with pytest.raises(AssertionError, match="d input"):
    parity_layers.check_call(conv_call, module32=layers.BinaryConv(
        8, binary_weights=False, activation_estimator="ste_sign"))
  # Or with its stage-1 real weights scaled by 1 + 1e-4.
  with pytest.raises(AssertionError, match="output"):
    parity_layers.check_call(conv_call, perturb=lambda out: (out[0] * (1 + 1e-4),) + out[1:])
