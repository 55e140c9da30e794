"""Parameter, memory and operation counts of the IR2Net models, as BNN papers
count them (presented like larq's ``models.summary``).

* BOPs: multiply-accumulates (MACs) of binary convolutions (``BinaryConv``).
* FLOPs: MACs of real-valued convolutions (``nn.Conv``) and linear layers
  (``nn.Dense``).
* OPs = BOPs / 64 + FLOPs. BatchNorm, activations and pooling are ignored.

A layer's MACs are per example: ``out_H * out_W * out_C * kH * kW * in_C /
groups`` for a convolution, ``in * out`` for a linear layer.

``BinaryConv`` kernels count as 1-bit parameters (the deployed binary model,
also for a stage-1 model, whose weights are binarised in stage 2); every other
trainable parameter is 32-bit. BatchNorm running statistics (``batch_stats``)
are not parameters. Model size = 1-bit params / 8 + 32-bit params * 4 bytes.

The shapes come from one forward pass traced with ``jax.eval_shape``, so
nothing is computed and no weights are allocated::

  >>> print_summary(create_model("ir2net_c", stage=2), (1, 224, 224, 3))

or ``ir2net-costs --model=ir2net_c --stage=2`` (``ir2net_jax.tools.costs``).
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from ir2net_jax.nn import layers

__all__ = ["LayerCost", "CostSummary", "summarize", "format_summary",
           "print_summary", "main", "run"]

# Layers whose MACs are counted, and under which total.
_MAC_KINDS = {"binary_conv": "bops", "conv": "flops", "dense": "flops"}
_CONV_KINDS = ("binary_conv", "conv")
# Submodule whose conv weights are the "fusion params".
_FUSION = "fusion"


def _kind(module: nn.Module) -> str:
  """The cost category of a module (checked most specific first)."""
  for cls, kind in ((layers.BinaryConv, "binary_conv"), (nn.Conv, "conv"),
                    (nn.Dense, "dense"),
                    ((layers.BatchNorm, nn.BatchNorm), "batch_norm"),
                    (layers.PReLU, "prelu")):
    if isinstance(module, cls):
      return kind
  return "other"


@dataclasses.dataclass
class LayerCost:
  """Costs of one parameterised layer (one module owning parameters).

  Attributes:
    path: module path, e.g. ``('layer1_0', 'binary_conv')``.
    kind: ``'binary_conv'``, ``'conv'``, ``'dense'``, ``'batch_norm'``,
      ``'prelu'`` or ``'other'``.
    output_shape: output shape of the (last) call, batch included, e.g.
      ``(1, 56, 56, 64)``; None when the output is not a single array.
    params_1bit: 1-bit parameters (``BinaryConv`` kernels).
    params_32bit: 32-bit parameters.
    bops: binary MACs per example.
    flops: real-valued MACs per example.
  """
  path: Tuple[str, ...]
  kind: str
  output_shape: Optional[Tuple[int, ...]]
  params_1bit: int = 0
  params_32bit: int = 0
  bops: int = 0
  flops: int = 0

  @property
  def name(self) -> str:
    """``'/'``-joined path, e.g. ``'layer1_0/binary_conv'``."""
    return "/".join(self.path)

  @property
  def params(self) -> int:
    return self.params_1bit + self.params_32bit

  @property
  def memory_bytes(self) -> float:
    """Parameter storage: 1 bit per binary weight, 4 bytes per real one."""
    return self.params_1bit / 8 + self.params_32bit * 4



def _layer_sum(field: str) -> property:
  """A property: ``field`` summed over ``self.layers``."""
  return property(lambda self: sum(getattr(l, field) for l in self.layers),
                  doc=f"``{field}`` summed over the layers.")

@dataclasses.dataclass
class CostSummary:
  """Per-layer costs of a model and their totals (properties).

  Attributes:
    name: model name shown in the table title.
    input_shape: traced input shape, e.g. ``(1, 224, 224, 3)``.
    layers: parameterised layers in call order.
  """
  name: str
  input_shape: Tuple[int, ...]
  layers: List[LayerCost]

  bops = _layer_sum("bops")
  flops = _layer_sum("flops")
  params_1bit = _layer_sum("params_1bit")
  params_32bit = _layer_sum("params_32bit")

  @property
  def ops(self) -> float:
    """``bops / 64 + flops``."""
    return self.bops / 64 + self.flops

  @property
  def params(self) -> int:
    """All trainable parameters."""
    return self.params_1bit + self.params_32bit

  @property
  def size_bytes(self) -> float:
    """Model size: ``params_1bit / 8 + params_32bit * 4`` bytes."""
    return sum(l.memory_bytes for l in self.layers)

  @property
  def fusion_params(self) -> int:
    """Conv weights inside the submodule named ``fusion`` (BN/PReLU not)."""
    return sum(l.params for l in self.layers
               if l.kind in _CONV_KINDS and _FUSION in l.path)

  def layer(self, name: str) -> LayerCost:
    """The layer whose ``name`` is ``name`` (e.g. ``'conv1'``)."""
    for l in self.layers:
      if l.name == name:
        return l
    raise KeyError(name)


def _trace(model: nn.Module, x: jax.ShapeDtypeStruct, apply_kwargs: Dict
           ) -> Tuple[Dict, Dict[Tuple[str, ...], Tuple[str, Any]]]:
  """Abstractly initialises ``model`` on ``x`` and records every module call.

  Returns:
    ``(params, calls)``: the ``'params'`` collection as ShapeDtypeStructs,
    and ``{path: (kind, [output shapes of each call])}`` in first-call order.
  """
  calls = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      module = context.module
      shape = tuple(out.shape) if hasattr(out, "shape") else None
      calls.setdefault(tuple(module.path), (_kind(module), []))[1].append(shape)
    return out

  def init(key, inputs):
    return model.init(key, inputs, **apply_kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(init, jax.random.key(0), x)
  return variables.get("params", {}), calls


def summarize(model: nn.Module,
              input_shape: Sequence[int] = (1, 224, 224, 3),
              dtype: Any = jnp.float32,
              name: Optional[str] = None,
              **apply_kwargs: Any) -> CostSummary:
  """Counts the parameters and operations of ``model`` on one input shape.

  Args:
    model: an (unbound) flax.linen module, e.g. ``create_model('ir2net_a')``.
    input_shape: NHWC input shape, e.g. ``(1, 224, 224, 3)``; MACs are
      reported per example whatever the batch size.
    dtype: input dtype.
    name: table title; defaults to the model's class name.
    **apply_kwargs: passed to the model call; defaults to ``train=False``.

  Returns:
    A CostSummary with one row per module that owns parameters, in call order
    (modules that own parameters but were never seen called come last).
  """
  apply_kwargs = apply_kwargs or {"train": False}
  input_shape = tuple(input_shape)
  batch = input_shape[0]
  params, calls = _trace(model, jax.ShapeDtypeStruct(input_shape, dtype),
                         apply_kwargs)

  # Group parameter shapes by owning module path.
  owned: Dict[Tuple[str, ...], Dict[str, Tuple[int, ...]]] = {}
  for key, leaf in traverse_util.flatten_dict(params).items():
    owned.setdefault(key[:-1], {})[key[-1]] = tuple(leaf.shape)

  rows = []
  order = [p for p in calls if p in owned]
  order += [p for p in owned if p not in calls]
  for path in order:
    kind, shapes = calls.get(path, ("other", [None]))
    row = LayerCost(path, kind, shapes[-1])
    for pname, shape in owned[path].items():
      n = math.prod(shape)
      if kind == "binary_conv" and pname == "kernel":
        row.params_1bit += n
      else:
        row.params_32bit += n
    if kind in _MAC_KINDS:
      # HWIO conv kernels hold in_C / groups; Dense kernels are (in, out).
      kernel = owned[path]["kernel"]
      fan_in = math.prod(kernel[:-1])
      macs = sum(math.prod(s) // batch * fan_in for s in shapes)
      setattr(row, _MAC_KINDS[kind], macs)
    rows.append(row)
  return CostSummary(name or type(model).__name__, input_shape, rows)


def _si(x: float, unit: str = "") -> str:
  """``1.234 M`` style rounding for the totals."""
  for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= factor:
      return f"{x / factor:.2f} {prefix}{unit}"
  return f"{x:.2f} {unit}".rstrip()


def format_summary(summary: CostSummary) -> str:
  """A fixed-width table like larq's: per-layer rows, then the totals.

  Per-layer memory is in kB (1000 bytes); BOPs and FLOPs are MACs per example.
  """
  header = ("Layer", "Kind", "Outputs", "# 1-bit", "# 32-bit", "Memory (kB)",
            "BOPs", "FLOPs")

  def shape_str(s):
    return "-" if s is None else str((-1,) + tuple(s[1:]))

  body = [(l.name, l.kind, shape_str(l.output_shape), f"{l.params_1bit:,}",
           f"{l.params_32bit:,}", f"{l.memory_bytes / 1e3:,.2f}",
           f"{l.bops:,}", f"{l.flops:,}") for l in summary.layers]
  body.append(("Total", "", "", f"{summary.params_1bit:,}",
               f"{summary.params_32bit:,}", f"{summary.size_bytes / 1e3:,.2f}",
               f"{summary.bops:,}", f"{summary.flops:,}"))
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

  def line(cells):
    left = [c.ljust(w) for c, w in zip(cells[:2], widths)]
    right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:])]
    return "| " + "  ".join(left + right) + " |"

  width = len(line(header))

  def rule(title=""):
    return "+" + title + "-" * (width - 2 - len(title)) + "+"

  table = [rule(f"{summary.name} stats (input {summary.input_shape})"),
           line(header), rule()]
  table += [line(r) for r in body[:-1]] + [rule(), line(body[-1]), rule()]

  totals = [
      ("Total params", f"{summary.params:,}"),
      ("1-bit params", f"{summary.params_1bit:,}"),
      ("32-bit params", f"{summary.params_32bit:,}"),
      ("Fusion params", f"{summary.fusion_params:,}"),
      ("Model size", f"{summary.size_bytes / 1e6:.2f} MB "
                     f"({summary.size_bytes / 1e3:,.2f} kB)"),
      ("1-bit weights size", f"{summary.params_1bit / 8e6:.2f} MB"),
      ("BOPs", f"{summary.bops:.3e}  ({_si(summary.bops)})"),
      ("FLOPs", f"{summary.flops:.3e}  ({_si(summary.flops)})"),
      ("OPs = BOPs / 64 + FLOPs", f"{summary.ops:.3e}  ({_si(summary.ops)})"),
  ]
  kw = max(len(k) for k, _ in totals)
  vw = max(len(v) for _, v in totals)
  tot = [f"| {k.ljust(kw)}  {v.rjust(vw)} |" for k, v in totals]
  title = f"{summary.name} summary"
  return "\n".join(
      table + ["", "+" + title + "-" * (len(tot[0]) - 2 - len(title)) + "+"]
      + tot + ["+" + "-" * (len(tot[0]) - 2) + "+"])


def print_summary(model: nn.Module,
                  input_shape: Sequence[int] = (1, 224, 224, 3),
                  **kwargs: Any) -> CostSummary:
  """Prints ``format_summary(summarize(model, input_shape, **kwargs))``.

  Returns:
    The summary.
  """
  summary = summarize(model, input_shape, **kwargs)
  print(format_summary(summary))
  return summary
