"""Elementwise bounds on how far a float32 run can be from a float64 run.

``evaluate(closed_jaxpr, args, errors)`` runs a float64 jaxpr on float64
values and, alongside every value ``v``, an array ``e`` with

    |v computed in float32 - v computed in float64| <= e     (elementwise)

for *any* float32 implementation of the same operations: any summation order,
any blocking or tiling of a convolution or matrix product, with or without
fused multiply-adds, on any CPU. ``errors`` gives the inputs' own bounds (for
an input rounded from float64 to float32: exactly ``|fl32(x) - x|``).

The rules are textbook forward error analysis (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., sections 2.2 and 3.1), with
``u = 2**-24``, float32's unit roundoff:

* an elementwise operation rounds once: ``|fl(a op b) - a op b| <= u |a op b|``
  (Higham's standard model). We allow ``2u`` (``LOCAL``): a compiler may
  rewrite one operation into two roundings (``x / n`` into ``x * (1/n)``).
  Errors of the operands propagate through the exact operation:
  ``a + b``: ``ea + eb``; ``a * b``: ``|b| ea + |a| eb + ea eb``;
  ``a / b``: ``(ea + |a/b| eb) / (|b| - eb)``; ``max``, ``min``, ``abs``,
  ``where`` on certain conditions, reshapes, slices, pads: 1-Lipschitz.
* a sum of ``n`` terms, in any order: ``|error| <= gamma_n sum |terms|``,
  ``gamma_n = n u / (1 - n u)`` (Higham, eq. 4.4 and Lemma 3.1); an inner
  product of length ``n`` (a dot or convolution output) likewise, the
  products' roundings included (Higham eq. 3.5). ``n`` is counted per output
  element by running the same convolution on ones (padding counts no term).
  Operand errors propagate as ``op(ea, |b|) + op(|a|, eb) + op(ea, eb)``.
* ``rsqrt`` and ``sqrt``: XLA may use a hardware estimate refined by a Newton
  step rather than a correctly rounded result; we allow ``RSQRT_ULPS = 4``
  roundings for it, plus the exact propagation of the operand's error
  (``rsqrt`` is monotone, so the interval's ends bound it).
* a comparison ``a > b`` is *uncertain* where ``|a - b| <= ea + eb``: the
  float32 run may take either branch. A ``where`` (select) on an uncertain
  condition gets the error of either branch plus the distance between the
  branches. This is how a binary activation's ``sign`` is handled: where the
  float64 input is within the float32 error bound of zero, the bound covers
  both signs (the output may differ by 2 there), and everything after it
  inherits that, locally. ``uncertain`` counts such elements.
* denormals may be flushed to zero: every rounding also gets an absolute
  ``TINY = 2**-126``.

The float64 run is itself rounded (``2**-53``), so the float32 bound is
compared with ``|v32 - v64|`` after a relative margin of ``1e-6`` (the float64
run's own error is the same bound scaled by ``2**-29``).
"""

import functools
from typing import Any, List, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

U = 2.0 ** -24
LOCAL = 2 * U
RSQRT_ULPS = 4
TINY = 2.0 ** -126
F64_MARGIN = 1 + 1e-6
EXACT_INT = 2.0 ** 24  # float32 holds every integer below this exactly


class Uncertain:
  """Error of a boolean: where the float32 run may compute the other value."""

  def __init__(self, unc):
    self.unc = np.asarray(unc, bool)


class Stats:
  """Counts over evaluations: comparisons made and uncertain ones."""

  def __init__(self):
    self.compared = 0
    self.uncertain = 0


def gamma(n):
  n = np.asarray(n, np.float64)
  return n * U / (1 - n * U)


def _rnd(y):
  return LOCAL * np.abs(y) + TINY


def _isint(v):
  return np.asarray(v) == np.round(v)


@functools.lru_cache(maxsize=None)
def _term_count(prim, shapes, params_key):
  """Terms per output element of a dot / convolution: the same operation on
  ones (padding adds no term)."""
  ones = [np.ones(s, np.float64) for s in shapes]
  return np.asarray(prim.bind(*ones, **dict(params_key)))


def _params_key(params):
  return tuple(sorted(params.items()))


def evaluate(closed, args: Sequence[Any], args32: Sequence[Any],
             stats: Stats = None) -> Tuple[List[Any], List[Any]]:
  """Float64 values and float32 error bounds of ``closed``'s outputs.

  Args:
    closed: a ClosedJaxpr traced with float64 inputs.
    args: its float64 inputs (flat).
    args32: the same inputs as the float32 run gets them (rounded).
    stats: optional ``Stats``, counting uncertain comparisons.

  Returns:
    ``(values, bounds)``, flat, in output order.
  """
  stats = stats if stats is not None else Stats()
  ins = []
  for a, a32 in zip(args, args32):
    a = np.asarray(a, np.float64)
    a32 = np.asarray(a32).astype(np.float64)
    # The float32 run's inputs are known exactly: so is their error, and
    # whether they are integers.
    ins.append((a, np.abs(a32 - a), _isint(a32)))
  consts = [_const(c) for c in closed.consts]
  outs = _eval(closed.jaxpr, consts, ins, stats)
  return [v for v, _, _ in outs], [e for _, e, _ in outs]


def _const(c):
  c = np.asarray(c)
  return c, np.zeros(()), _isint(c) if c.dtype.kind == "f" else None


def _read(env, var):
  if isinstance(var, jcore.Literal):
    return _const(var.val)
  return env[var]


def _eval(jaxpr, consts, args, stats):
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    outs = _rule(eqn, [_read(env, v) for v in eqn.invars], stats)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [_read(env, v) for v in jaxpr.outvars]


def _ints(v, e, ints):
  """Where the float32 value is certainly an integer."""
  if ints is not None:
    return ints
  if isinstance(e, Uncertain) or v.dtype.kind != "f":
    return np.zeros(np.shape(v), bool)
  # Where the bound is 0 the float32 value equals the float64 one.
  return _isint(v) & (e == 0)


def _pad(x, value, config):
  lo = [max(l, 0) for l, _, _ in config]
  shape = [l + h + n + max(n - 1, 0) * i
           for (l, h, i), n in zip(config, x.shape)]
  full = [max(l, 0) + max(h, 0) + n + max(n - 1, 0) * i
          for (l, h, i), n in zip(config, x.shape)]
  out = np.full(full, value, dtype=np.result_type(x, value))
  out[tuple(slice(l, l + (n - 1) * (i + 1) + 1, i + 1) if n else slice(0, 0)
            for l, (_, _, i), n in zip(lo, config, x.shape))] = x
  crop = tuple(slice(-min(l, 0), -min(l, 0) + s)
               for (l, _, _), s in zip(config, shape))
  return out[crop]


def _np(name, params, *xs):
  """numpy for the data-movement and elementwise primitives."""
  p = params
  if name == "broadcast_in_dim":
    x = xs[0]
    shape = [1] * len(p["shape"])
    for d, n in zip(p["broadcast_dimensions"], np.shape(x)):
      shape[d] = n
    return np.broadcast_to(np.reshape(x, shape), p["shape"])
  if name == "reshape":
    x = xs[0]
    if p.get("dimensions") is not None:  # transpose first, then reshape
      x = np.transpose(x, p["dimensions"])
    return np.reshape(x, p["new_sizes"])
  if name == "transpose":
    return np.transpose(xs[0], p["permutation"])
  if name == "squeeze":
    return np.squeeze(xs[0], tuple(p["dimensions"]))
  if name == "expand_dims":
    return np.expand_dims(xs[0], tuple(p["dimensions"]))
  if name == "rev":
    return np.flip(xs[0], tuple(p["dimensions"]))
  if name == "slice":
    strides = p["strides"] or (1,) * len(p["start_indices"])
    return xs[0][tuple(slice(a, b, s) for a, b, s in zip(
        p["start_indices"], p["limit_indices"], strides))]
  if name == "pad":
    return _pad(np.asarray(xs[0]), np.asarray(xs[1]), p["padding_config"])
  if name == "concatenate":
    return np.concatenate(xs, p["dimension"])
  if name == "split":
    return np.split(xs[0], np.cumsum(p["sizes"])[:-1], p["axis"])
  if name == "reduce_sum":
    return np.sum(xs[0], tuple(p["axes"]))
  if name == "reduce_max":
    return np.max(xs[0], tuple(p["axes"]))
  if name == "reduce_min":
    return np.min(xs[0], tuple(p["axes"]))
  if name == "select_n":
    pred, cases = np.asarray(xs[0]), xs[1:]
    return np.choose(pred.astype(int), np.broadcast_arrays(*cases))
  if name == "convert_element_type":
    return np.asarray(xs[0]).astype(p["new_dtype"])
  if name in ("copy", "copy_p"):
    return np.asarray(xs[0])
  ops = {"add": np.add, "add_any": np.add, "sub": np.subtract,
         "mul": np.multiply, "div": np.divide, "max": np.maximum,
         "min": np.minimum, "neg": np.negative, "abs": np.abs,
         "sqrt": np.sqrt, "rsqrt": lambda x: 1 / np.sqrt(x),
         "gt": np.greater, "ge": np.greater_equal, "lt": np.less,
         "le": np.less_equal, "eq": np.equal, "ne": np.not_equal,
         "and": np.logical_and, "or": np.logical_or, "not": np.logical_not,
         "xor": np.logical_xor, "square": np.square,
         "integer_pow": lambda x: np.asarray(x) ** p["y"]}
  if name in ops:
    return ops[name](*xs)
  raise NotImplementedError(f"no rounding rule for primitive {name!r}")


_MOVES = {"broadcast_in_dim", "reshape", "transpose", "squeeze",
          "expand_dims", "rev", "slice", "concatenate", "split", "copy",
          "copy_p"}
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}


def _rule(eqn, ins, stats):
  name, params = eqn.primitive.name, eqn.params
  vals = [v for v, _, _ in ins]
  errs = [e for _, e, _ in ins]
  np_op = lambda *xs: _np(name, params, *xs)

  if name in _CALLS:
    sub = (params.get("jaxpr") or params.get("call_jaxpr")
           or params.get("fun_jaxpr"))
    consts = []
    if isinstance(sub, jcore.ClosedJaxpr):
      consts = [_const(c) for c in sub.consts]
      sub = sub.jaxpr
    res = _eval(sub, consts, ins[len(ins) - len(sub.invars):], stats)
    return res if eqn.primitive.multiple_results else res[0]

  out_float = all(v.aval.dtype.kind == "f" for v in eqn.outvars)
  out_bool = all(v.aval.dtype == np.bool_ for v in eqn.outvars)

  if name in ("gt", "ge", "lt", "le", "eq", "ne"):
    (a, b), (ea, eb) = vals, errs
    val = np_op(a, b)
    slack = ea + eb
    unc = (np.abs(a - b) <= slack) & (slack > 0)
    stats.compared += val.size
    stats.uncertain += int(unc.sum())
    return val, Uncertain(unc), None
  if out_bool:  # and / or / not / select of booleans: either input may flip
    val = np_op(*vals)
    unc = np.zeros(np.shape(val), bool)
    for e in errs:
      if isinstance(e, Uncertain):
        unc = unc | e.unc
    return val, Uncertain(unc), None
  if not out_float:
    if any(isinstance(e, Uncertain) or np.any(e) for e in errs[-1:]):
      raise NotImplementedError(f"inexact operand of integer {name}")
    return np_op(*vals), np.zeros(()), None

  if name == "select_n":
    pred, cases = vals[0], vals[1:]
    val = np_op(*vals)
    bcast = lambda xs: np.broadcast_arrays(*[np.broadcast_to(x, val.shape)
                                             for x in xs])
    cerrs = bcast(errs[1:])
    cints = bcast([_ints(v, e, i) for v, e, i in ins[1:]])
    err = np_op(pred, *cerrs)
    ints = np_op(pred, *cints)
    if isinstance(errs[0], Uncertain):
      # Either branch may be taken where the condition is uncertain.
      worst = np.zeros(val.shape)
      for c, e in zip(bcast(cases), cerrs):
        worst = np.maximum(worst, np.abs(c - val) + e)
      unc = np.broadcast_to(errs[0].unc, val.shape)
      err = np.where(unc, worst, err)
      ints = np.where(unc, np.logical_and.reduce(cints), ints)
    return val, err, ints
  if name == "convert_element_type":
    val = np_op(vals[0])
    if isinstance(errs[0], Uncertain):  # bool -> 0 / 1: a flip moves it by 1
      return val, errs[0].unc.astype(np.float64), np.ones(val.shape, bool)
    return val, errs[0], _ints(*ins[0]) if vals[0].dtype.kind == "f" else (
        np.ones(np.shape(val), bool))

  if name in _MOVES or name in ("neg", "abs"):
    val = np_op(*vals)
    fl = [np.broadcast_to(e, np.shape(v)) for v, e in zip(vals, errs)]
    ints = [_ints(*i) for i in ins]
    if name in ("neg", "abs"):
      return val, errs[0], ints[0]
    res = (val, np_op(*fl), np_op(*ints))
    if name == "split":
      return list(zip(*res))
    return res
  if name == "pad":
    val = np_op(*vals)
    return (val, np_op(np.broadcast_to(errs[0], vals[0].shape), 0.0),
            np_op(_ints(*ins[0]), _isint(vals[1])))
  if name in ("reduce_max", "reduce_min"):
    val = np_op(vals[0])
    return val, _np("reduce_max", params,
                    np.broadcast_to(errs[0], vals[0].shape)), None
  if name in ("max", "min"):
    val = np_op(*vals)
    return val, np.maximum(errs[0], errs[1]), None
  if name in ("add", "sub", "add_any"):
    val = np_op(*vals)
    return val, errs[0] + errs[1] + _rnd(val), None
  if name == "mul":
    (a, b), (ea, eb) = vals, errs
    val = np_op(a, b)
    return val, np.abs(b) * ea + np.abs(a) * eb + ea * eb + _rnd(val), None
  if name == "div":
    (a, b), (ea, eb) = vals, errs
    val = np_op(a, b)
    margin = np.abs(b) - eb
    if np.any(margin <= 0):
      raise FloatingPointError("divisor within its error bound of zero")
    return val, (ea + np.abs(val) * eb) / margin + _rnd(val), None
  if name in ("integer_pow", "square"):
    x, e = vals[0], errs[0]
    n = params.get("y", 2)
    val = np_op(x)
    top = (np.abs(x) + e) ** n
    return val, (top - np.abs(x) ** n) + (n - 1) * LOCAL * top + TINY, None
  if name in ("rsqrt", "sqrt"):
    x, e = vals[0], errs[0]
    val = np_op(x)
    lo = x - e
    if name == "rsqrt" and np.any(lo <= 0):
      raise FloatingPointError("rsqrt operand within its error of zero")
    lo_val, hi_val = np_op(np.maximum(lo, 0)), np_op(x + e)
    # Monotone: the ends of the operand's interval bound the propagated error.
    ends = np.maximum(np.abs(lo_val - val), np.abs(hi_val - val))
    return val, ends + RSQRT_ULPS * U * np.maximum(np.abs(lo_val),
                                                   np.abs(hi_val)) + TINY, None
  if name == "reduce_sum":
    x, e = vals[0], errs[0]
    val = np_op(x)
    n = x.size / max(np.size(val), 1)
    return val, (np_op(np.broadcast_to(e, x.shape)) + gamma(n) * np_op(
        np.abs(x)) + TINY), None
  if name in ("dot_general", "conv_general_dilated"):
    (a, b), (ea, eb) = vals, errs
    ea, eb = np.broadcast_to(ea, a.shape), np.broadcast_to(eb, b.shape)
    op = lambda x, y: np.asarray(eqn.primitive.bind(
        jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64), **params))
    val = op(a, b)
    aa, ab = np.abs(a), np.abs(b)
    magnitude = op(aa, ab)
    err = np.zeros(val.shape)
    if ea.any():
      err = err + op(ea, ab)
    if eb.any():
      err = err + op(aa, eb)
      if ea.any():
        err = err + op(ea, eb)
    ints_a, ints_b = _ints(*ins[0]), _ints(*ins[1])
    if ints_a.all() and ints_b.all() and np.all(magnitude + err < EXACT_INT):
      # Integer operands (binary activations and weights): every partial
      # sum is an integer below 2**24, so float32 sums them exactly, in any
      # order; only the operands' own errors remain.
      return val, err, _isint(val) & (err == 0)
    count = _term_count(eqn.primitive, (a.shape, b.shape),
                        _params_key(params))
    g = gamma(count)
    return val, g * magnitude + (1 + g) * err + TINY, None
  raise NotImplementedError(f"no rounding rule for primitive {name!r}")
