"""Float32 parity layer by layer, so that no sign near-tie can cascade; and
the float64 run of a fixture that ``test_parity.py`` checks whole.

A whole-network float32 comparison with the reference is skipped where a
binary activation's input lies within float32 rounding of zero
(``sign_margins.py``): a flipped sign changes everything after it. Here the
float32 port is checked one layer at a time instead, for every fixture:

1. The port runs in float64 (which matches the reference's ``f64/`` numbers,
   ``test_parity.py``) and records, for every module call (every binary
   conv, real conv, dense layer, BatchNorm, PReLU and hardtanh module, and
   every composite: residual block, CIRec and its conv-BN-activation parts),
   the call's input, the module's variables and its output, in the eval pass
   and in both passes of the training step; in the training step also the
   cotangent of the call's output (of the recorded loss, through the rest of
   the float64 network).
2. Each call is then run alone in float32, on its float64 input rounded to
   float32: the forward output, in the training step the updated BatchNorm
   statistics, and the VJP (input and parameter gradients) of the float64
   cotangent rounded to float32. Each is compared elementwise with the same
   call in float64, against a bound on float32 rounding of that very call
   derived by ``rounding_bounds`` from the call's own operations and
   values: ``gamma_K sum |w||x|`` for a convolution's outputs, a few ``u``
   of the operands for BatchNorm, and so on, for any summation order and on
   any CPU; nothing is fitted to this machine.

Since every call starts from the float64 run's input, a sign flip cannot
cascade. A binary activation fed its input rounded to float32 keeps every
sign (rounding never changes a sign), and inside a composite module the
bound covers both signs of every input within its float32 error bound of
zero (``rounding_bounds``: uncertain comparisons); their fraction is asserted
to be tiny, so a bound never grows into a skip.

Nothing about a fixture is hard-coded: the modules are whatever the model
calls.

The float64 capture is also the port's float64 run of the fixture
(``float64_run``): its eval pass, and the training step's loss, outputs and
parameter gradients (the VJP of the same loss, taken with respect to the
parameters and the call outputs at once), which ``test_parity.py`` compares
with the reference's ``f64/`` numbers. One float64 program per pass serves
both checks. The tests are in ``test_parity.py``.
"""

import dataclasses
import functools
import hashlib
import os
from typing import Any, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import reference_fixtures as rf
import rounding_bounds
from ir2net_jax.nn import losses, objective

# The fraction of comparisons (signs, estimator windows, hardtanh) that may be
# uncertain, i.e. whose float64 operand lies within the float32 bound of its
# threshold. Outside composite modules there are none (a rounded input keeps
# its sign). Inside a block, the worst-case bound of a training-mode
# BatchNorm's batch mean (gamma_n, n = B h w terms) makes a few in 10^4 signs
# uncertain, and the outputs they feed inherit wide bounds; 1% keeps every
# check about as tight as its layer's rounding allows.
MAX_UNCERTAIN_FRACTION = 1e-2


@dataclasses.dataclass
class Call:
  """One module call of the float64 run."""
  path: Tuple[str, ...]
  kind: str
  module: nn.Module          # unbound clone: same fields, no parent
  static: Tuple[Any, ...]    # non-array positional arguments (``train``)
  variables: Dict[str, Any]  # the module's variables at the call (float64)
  x: Any                     # input (float64)
  y: Any                     # output (float64)
  ct: Any = None             # output cotangent (float64); training step only
  train: bool = False


def _is_checked(context, out) -> bool:
  return (context.method_name == "__call__" and context.module.parent
          is not None and isinstance(out, jax.Array))


def _capture(apply_fn):
  """Wraps ``apply_fn(variables, x)`` in an interceptor that records every
  checked call.

  Returns ``(metadata, run)``: ``run(variables, x, perturbs)`` returns
  ``(result, records)``, where each call's output has ``perturbs[i]`` added
  (zeros: a handle for the output's cotangent; None: nothing added).
  """
  meta = []

  def run(variables, x, perturbs):
    records = []
    meta.clear()

    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if not _is_checked(context, out):
        return out
      i = len(records)
      mod = context.module
      assert not kwargs, kwargs
      meta.append((mod.path, type(mod).__name__,
                   mod.clone(parent=None, name=None), tuple(args[1:])))
      if perturbs is not None:
        out = out + perturbs[i]
      records.append((args[0], dict(mod.variables), out))
      return out

    with nn.intercept_methods(intercept):
      result = apply_fn(variables, x)
    return result, records

  return meta, run


@functools.lru_cache(maxsize=None)
def teacher_logits(teacher_name, prec, input_bytes, shape):
  """A teacher fixture's network in ``prec`` ('f32' or 'f64') on an NCHW
  float32 input given as bytes (cached per teacher, precision and input)."""
  teacher = rf.load(os.path.join(rf.FIXTURE_DIR, teacher_name + ".npz"))
  with jax.enable_x64(prec == "f64"):
    dtype = np.float64 if prec == "f64" else np.float32
    model = teacher.model()
    variables = teacher.variables(dtype)
    x = np.frombuffer(input_bytes, np.float32).reshape(shape)
    x = jnp.asarray(x.transpose(0, 2, 3, 1).astype(dtype))
    logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, x)
    return np.asarray(logits)


def fixture_teacher_logits(fx, prec):
  """The port's teacher logits on ``fx``'s input."""
  return teacher_logits(fx.teacher().name, prec, fx.data["input"].tobytes(),
                        fx.data["input"].shape)


def _recorded_calls(meta, records, cts=None) -> List[Call]:
  """``Call``s from a capture's metadata and records (and, in the training
  step, the outputs' cotangents)."""
  train = cts is not None
  return [Call(p, k, m, s, jax.device_get(v), np.asarray(xi), np.asarray(y),
               np.asarray(ct) if train else None, train)
          for (p, k, m, s), (xi, v, y), ct in zip(
              meta, records, cts if train else [None] * len(records))]


@dataclasses.dataclass
class Float64Run:
  """A fixture's float64 run: every module call of its eval pass and of its
  training step, and what the passes return."""
  eval_calls: List[Call]
  train_calls: List[Call]
  eval_out: Tuple[np.ndarray, np.ndarray]    # (logits, feature map)
  # loss, aux (objective.two_pass_objective's) and grads (params tree);
  # None for a teacher.
  train_out: Any = None


# One fixture at a time (its tests run one after the other, conftest.py): a
# fixture's records hold every layer's float64 input, output and cotangent,
# hundreds of MB for an ImageNet model.
@functools.lru_cache(maxsize=1)
def float64_run(path) -> Float64Run:
  """The float64 eval pass and training step of a fixture, captured."""
  fx = rf.load(path)
  with jax.enable_x64(True):
    model, variables = fx.model(), fx.variables(np.float64)
    x = jnp.asarray(fx.nhwc("input").astype(np.float64))

    meta, run = _capture(lambda v, x: model.apply(v, x, train=False))
    result, records = jax.jit(lambda v, x: run(v, x, None))(variables, x)
    eval_calls = _recorded_calls(meta, records)
    eval_out = tuple(np.asarray(r) for r in result)
    if fx.is_teacher:
      return Float64Run(eval_calls, [], eval_out)

    if fx.meta.get("teacher"):
      target = jnp.asarray(fixture_teacher_logits(fx, "f64"))
      loss_fn = losses.distribution_loss
    else:
      target = jnp.asarray(fx.data["labels"].astype(np.int32))
      loss_fn = losses.cross_entropy

    def loss(v, x):
      return objective.two_pass_objective(
          v["params"], v["batch_stats"], model, x, target, loss_fn,
          fx.meta["erase_lambda"])

    meta, run = _capture(loss)
    shapes = jax.eval_shape(lambda v, x: run(v, x, None), variables, x)[1]
    zeros = [jnp.zeros(y.shape, y.dtype) for _, _, y in shapes]

    @jax.jit
    def step(variables, x, perturbs):
      def f(params, perturbs):
        (value, aux), records = run(dict(variables, params=params), x,
                                    perturbs)
        return value, (aux, records)
      value, vjp_fn, (aux, records) = jax.vjp(
          f, variables["params"], perturbs, has_aux=True)
      grads, cts = vjp_fn(jnp.ones((), value.dtype))
      return value, aux, records, grads, cts

    value, aux, records, grads, cts = step(variables, x, zeros)
    train_calls = _recorded_calls(meta, records, cts)
    train_out = dict(loss=np.asarray(value), aux=jax.device_get(aux),
                     grads=jax.device_get(grads))
  return Float64Run(eval_calls, train_calls, eval_out, train_out)


def _dedupe(calls: List[Call]) -> List[Call]:
  """Drops a call identical to an earlier one of the same module (the
  erased pass equals the clean one where the erase mask is all ones); the
  same input, cotangent and parameters give the same check."""
  def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
      a = np.ascontiguousarray(a)
      h.update(repr((a.dtype, a.shape)).encode())
      h.update(memoryview(a).cast("B"))
    return h.hexdigest()

  seen, out = set(), []
  for c in calls:
    params = jax.tree.leaves(c.variables.get("params", {}))
    key = (c.path, digest(c.x), None if c.ct is None else digest(c.ct),
           repr(jax.tree.structure(c.variables.get("params", {}))),
           digest(*params))
    if key in seen:
      continue
    seen.add(key)
    out.append(c)
  return out


def _layer_fn(module, static, train, has_stats):
  """``g(variables, x, ct)``: the call's output; in training also its updated
  statistics and the VJP ``(d params, d x)`` of ``ct``."""

  def g(variables, x, ct):
    others = {k: v for k, v in variables.items() if k != "params"}
    params = variables.get("params", {})
    if not train:
      return module.apply(variables, x, *static)

    def fwd(params, x):
      if has_stats:
        return module.apply({"params": params, **others}, x, *static,
                            mutable=["batch_stats"])
      return module.apply({"params": params, **others}, x, *static), {}

    y, vjp_fn, state = jax.vjp(fwd, params, x, has_aux=True)
    return y, state, vjp_fn(ct)

  return g


_FNS = {}


def _compiled(call: Call):
  """The float32 jitted layer function and the float64 jaxpr of ``call``,
  shared by every call of the same module configuration and shapes."""
  has_stats = "batch_stats" in call.variables
  key = (call.kind, repr(call.module), call.static, call.train, call.x.shape,
         jax.tree.map(np.shape, call.variables).__repr__())
  if key not in _FNS:
    g = _layer_fn(call.module, call.static, call.train, has_stats)
    with jax.enable_x64(True):
      jaxpr = jax.make_jaxpr(g)(call.variables, call.x,
                                call.y if call.ct is None else call.ct)
    _FNS[key] = (jax.jit(g), jaxpr)
  return _FNS[key]


def _f32(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


@dataclasses.dataclass
class Result:
  kind: str
  path: Tuple[str, ...]
  worst: float        # max |f32 - f64| / bound over all outputs
  compared: int
  uncertain: int
  consistency: float  # the standalone float64 call against the recorded one


def check_call(call: Call, perturb=None, module32=None) -> Result:
  """Compares one call in float32 with its float64 run, elementwise, against
  the float32 rounding bound of that call.

  Args:
    call: a recorded call.
    perturb: optional ``fn(float32 outputs pytree) -> pytree`` (tests of
      this test: a wrong layer must fail).
    module32: optional other module for the float32 run (likewise).

  Returns:
    A ``Result``; raises AssertionError when a bound is exceeded.
  """
  g32, jaxpr = _compiled(call)
  ct = call.ct if call.train else np.zeros_like(call.y)
  args64 = (call.variables, call.x, ct)
  args32 = _f32(args64)
  stats = rounding_bounds.Stats()
  with jax.enable_x64(True):
    vals, bounds = rounding_bounds.evaluate(
        jaxpr, jax.tree.leaves(args64), jax.tree.leaves(args32), stats)
    vals = [np.asarray(v) for v in vals]
    bounds = [np.broadcast_to(np.asarray(b), v.shape)
              for v, b in zip(vals, bounds)]
  if module32 is not None:
    g32 = jax.jit(_layer_fn(module32, call.static, call.train,
                            "batch_stats" in call.variables))
  out32 = g32(*args32)
  if perturb is not None:
    out32 = perturb(out32)
  out32 = [np.asarray(o, np.float64) for o in jax.tree.leaves(out32)]
  assert len(out32) == len(vals)
  y64 = vals[0]
  consistency = rf.rel(y64, call.y)
  assert consistency <= 1e-12, (call.path, consistency)
  names = _output_names(call)
  worst = 0.0
  for name, o, v, b in zip(names, out32, vals, bounds):
    err = np.abs(o - v)
    bound = b * rounding_bounds.F64_MARGIN
    bad = err > bound
    ratio = float(np.max(err / np.maximum(bound, 1e-300))) if err.size else 0.
    worst = max(worst, ratio)
    if np.any(bad):
      i = np.unravel_index(np.argmax(err - bound), err.shape)
      raise AssertionError(
          f"{'/'.join(call.path)} ({call.kind}, "
          f"{'train' if call.train else 'eval'}) {name}: {int(bad.sum())} of "
          f"{err.size} elements beyond float32 rounding, worst at {i}: "
          f"float32 {o[i]!r}, float64 {v[i]!r}, bound {bound[i]:.3g}")
  return Result(call.kind, call.path, worst, stats.compared, stats.uncertain,
                consistency)


def _output_names(call: Call):
  if not call.train:
    return ["output"]
  shapes = jax.eval_shape(_layer_fn(call.module, call.static, True,
                                    "batch_stats" in call.variables),
                          call.variables, call.x, call.ct)
  paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
  labels = []
  for p, _ in paths:
    s = jax.tree_util.keystr(p)
    s = s.replace("[0]", "output", 1) if s.startswith("[0]") else s
    s = s.replace("[1]", "batch_stats after", 1) if s.startswith("[1]") else s
    s = s.replace("[2][0]", "d params", 1).replace("[2][1]", "d input", 1)
    labels.append(s)
  return labels


# Checks already made in this session, by module configuration, input and
# variables: IR2Net-A/B/C/D share their backbone (same weights, same input),
# so their backbone calls are the same check; the cotangent differs with the
# head, but the layer's VJP code and its forward values are the same.
_CHECKED: Dict[Any, Result] = {}


def _content_key(call: Call):
  digest = hashlib.sha1(call.x.tobytes())
  for leaf in jax.tree.leaves(call.variables):
    digest.update(np.asarray(leaf).tobytes())
  return (call.kind, repr(call.module), call.static, call.train,
          call.x.shape, digest.hexdigest())


def check_fixture(path, train: bool, perturb=None) -> List[Result]:
  """Checks every call of a fixture's eval pass or training step."""
  run = float64_run(path)
  calls = _dedupe(run.train_calls) if train else run.eval_calls
  results = []
  for c in calls:
    key = _content_key(c)
    if perturb is None and key in _CHECKED:
      results.append(_CHECKED[key])
      continue
    results.append(check_call(c, perturb))
    if perturb is None:
      _CHECKED[key] = results[-1]
  return results


def synthetic_call(module, x_shape, train, seed=0):
  """A call of ``module`` on a random float64 input (what a capture gives)."""
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    x = rng.standard_normal(x_shape)
    variables = jax.tree.map(
        lambda a: np.asarray(a, np.float32).astype(np.float64),
        module.init(jax.random.key(seed), jnp.asarray(x, jnp.float32)))
    variables = jax.tree.map(
        lambda a: (a + np.float32(0.1) * rng.standard_normal(a.shape).astype(
            np.float32)).astype(np.float64), variables)
    y = module.apply(variables, x, mutable=["batch_stats"])[0]
    ct = rng.standard_normal(y.shape) if train else None
  return Call((type(module).__name__,), type(module).__name__, module, (),
              jax.device_get(variables), x, np.asarray(y), ct, train)
