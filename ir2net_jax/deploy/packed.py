"""A model's binary convolutions run on packed bits (``bits.conv2d``).

``pack_kernels(model, variables, image_size)`` packs the binarised kernel
of every ``layers.BinaryConv`` with binary weights, keyed by the layer's
module path; ``apply_packed(model, variables, kernels, images)`` runs the
model in evaluation mode with each of those layers' convolutions replaced
by the packed XOR-popcount one (a Flax method interceptor: the model's code
is unchanged). The integer sums equal the float convolution's exactly, so
the logits are the float model's bit for bit; the layers that stay in float
(the first convolution, the shortcuts, CIRec, the classifier) run as they
do in training.

A model with a real-weight binary convolution (ImageNet stage 1) has nothing
to pack there: ``pack_kernels`` refuses it.
"""

import contextlib
import itertools
from typing import Any, Callable, Dict, Iterator, Optional, Set, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ir2net_jax.deploy import bits, native, tracing
from ir2net_jax.deploy import fold as folding
from ir2net_jax.nn import binarize, layers

__all__ = ["CONVOLUTIONS", "PackError", "pack_kernels", "apply_packed",
           "convolution", "head_modules", "on_bits"]

# How a packed convolution is computed: "native" the C++ kernel (CPU only),
# "jax" the pure-JAX path (every platform), "auto" the kernel on CPUs where
# it is built and the pure-JAX path elsewhere (chosen when the program is
# lowered, for the platform it is lowered for).
CONVOLUTIONS = ("auto", "native", "jax")

Path = Tuple[str, ...]


class PackError(ValueError):
  """A model or its variables cannot be packed."""


def _binary_convs(model: nn.Module, variables, image_size: int
                  ) -> Dict[Path, layers.BinaryConv]:
  """``{path: layer}`` of every BinaryConv the model calls on a
  (1, S, S, 3) input, in call order (traced for shapes only)."""
  found = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, layers.BinaryConv) and (
        context.method_name == "__call__"):
      found[module.path] = module.clone(parent=None)
    return next_fun(*args, **kwargs)

  tracing.trace_eval(model, variables, image_size, record)
  return found


def head_modules(model: nn.Module, variables, image_size: int) -> Set[Path]:
  """The modules that no binary convolution's input depends on: those
  first called after the model's last binary convolution returns (traced
  for shapes only). In IR2Net, CIRec's fusion, the BatchNorms and PReLU
  after it, and the classifier. Every model here binarises inside
  ``layers.BinaryConv`` alone, so rounding these modules' variables moves
  no sign.

  Args:
    model, variables, image_size: as for ``pack_kernels``.

  Returns:
    Their module paths (none where the model ends with a binary
    convolution).
  """
  order = itertools.count(1)
  first_call: Dict[Path, int] = {}
  last_binary = [0]

  def record(next_fun, args, kwargs, context):
    first_call.setdefault(context.module.path, next(order))
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, layers.BinaryConv):
      last_binary[0] = next(order)
    return out

  tracing.trace_eval(model, variables, image_size, record)
  return {path for path, call in first_call.items() if call > last_binary[0]}


def pack_kernels(model: nn.Module, variables, image_size: int
                 ) -> Dict[Path, bits.PackedKernel]:
  """The packed ±1 kernel of every binary convolution of ``model``.

  Args:
    model: a model built of ``layers.BinaryConv`` (every IR2Net model).
    variables: ``{'params', 'batch_stats'}``.
    image_size: an input size the model takes (shapes only).

  Returns:
    ``{module path: bits.pack_kernel(sign(kernel))}``, the sign as the
    layer's forward pass computes it (``zero_to_one``).

  Raises:
    PackError: the model has no binary convolution, or one whose weights are
      real (stage 1: nothing to pack).
  """
  convs = _binary_convs(model, variables, image_size)
  if not convs:
    raise PackError(f"{type(model).__name__} has no binary convolution "
                    "(layers.BinaryConv) to pack")
  real = ["/".join(p) for p, layer in convs.items()
          if not layer.binary_weights]
  if real:
    raise PackError(
        f"{type(model).__name__}'s binary convolutions {real[:3]} have real "
        "weights (ImageNet stage 1): only binary weights pack; pack the "
        "stage-2 model")
  out = {}
  for path, layer in convs.items():
    kernel = _kernel(variables["params"], path)
    out[path] = bits.pack_kernel(binarize.sign(kernel, layer.zero_to_one))
  return out


def _result_dtype(layer: layers.BinaryConv, dtype, channels: int):
  """The dtype ``layer`` returns its sums in (``BinaryConv.__call__``):
  its operand dtype where that is 32 bits or wider, else float32."""
  operand = jnp.dtype(layer.compute_dtype or dtype)
  if operand == jnp.int8 and channels < layer.int8_min_channels:
    operand = jnp.dtype(dtype)
  return operand if operand.itemsize >= 4 else jnp.dtype(jnp.float32)


def _kernel(params, path: Path) -> jax.Array:
  for name in path:
    params = params[name]
  return params["kernel"]


def _jax_convolution(values, kernel, stride, pad, zero_to_one, fold=None):
  sums = bits.conv2d(bits.pack(binarize.sign(values, zero_to_one)), kernel,
                     stride, pad)
  return sums if fold is None else folding.normalise(sums, fold)


def _native_convolution(values, kernel, stride, pad, zero_to_one,
                        fold=None):
  return native.conv2d(
      native.pack_signs(values, zero_to_one), kernel, stride, pad,
      fold=None if fold is None else (fold.mean, fold.scale, fold.bias))


def convolution(how: str = "auto") -> Callable[..., jax.Array]:
  """``conv(values, kernel, stride, pad, zero_to_one, fold=None)``: the
  binary convolution of ``binarize.sign(values)`` (B, H, W, Cin) with a
  ``bits.PackedKernel``, as ``how`` (one of ``CONVOLUTIONS``) computes it,
  the activations' packing included: int32 sums, or with a
  ``fold.FoldedBatchNorm`` the float32 values of the BatchNorm after it.

  Raises:
    PackError: an unknown ``how``.
    native.NativeUnavailable: ``how='native'`` where the kernel cannot be
      built (its reason).
  """
  if how not in CONVOLUTIONS:
    raise PackError(f"convolution={how!r}: one of {CONVOLUTIONS}")
  if how == "jax" or (how == "auto" and not native.available()):
    return _jax_convolution
  if how == "native":
    if not native.available():
      raise native.NativeUnavailable(native.unavailable_reason())
    return _native_convolution

  def auto(values, kernel, stride, pad, zero_to_one, fold=None):
    return lax.platform_dependent(
        values, kernel, fold,
        cpu=lambda v, k, f: _native_convolution(v, k, stride, pad,
                                                zero_to_one, f),
        default=lambda v, k, f: _jax_convolution(v, k, stride, pad,
                                                 zero_to_one, f))
  return auto


@contextlib.contextmanager
def on_bits(kernels: Dict[Path, bits.PackedKernel], how: str = "auto",
            folds: Optional[Dict[Path, folding.FoldedBatchNorm]] = None
            ) -> Iterator[None]:
  """Within it, every call of a ``layers.BinaryConv`` that ``kernels`` has
  (by module path) computes on bits, whatever method of the model runs
  (``apply_packed``'s eval, ``restriction.restriction_maps``); with
  ``folds`` (``fold.fold_batch_norms``), those convolutions also compute
  the BatchNorm after them, which then passes its input on.

  Raises:
    PackError: a model calls a binary convolution ``kernels`` lacks.
  """
  conv = convolution(how)
  folds = folds or {}
  folded = {f.batch_norm for f in folds.values()}

  def packed_conv(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(module, layers.BatchNorm) and module.path in folded:
      return args[0].astype(module.dtype or args[0].dtype)
    if not isinstance(module, layers.BinaryConv):
      return next_fun(*args, **kwargs)
    if module.path not in kernels:
      raise PackError(f"no packed kernel for {'/'.join(module.path)}")
    x = args[0]
    dtype = module.dtype or jnp.result_type(x, jnp.float32)
    out = conv(x.astype(dtype), kernels[module.path], module.strides,
               module.kernel_size // 2, module.zero_to_one,
               folds.get(module.path))
    return out.astype(_result_dtype(module, dtype, x.shape[-1]))

  with nn.intercept_methods(packed_conv):
    yield


def apply_packed(model: nn.Module, variables,
                 kernels: Dict[Path, bits.PackedKernel], images: jax.Array,
                 how: str = "auto",
                 folds: Optional[Dict[Path, folding.FoldedBatchNorm]] = None
                 ) -> Any:
  """``model.apply(variables, images, train=False)`` with every packed
  binary convolution computed on bits. Jittable.

  Args:
    model: the model ``kernels`` were packed from.
    variables: its variables; the binary convolutions' kernels (and the
      folded BatchNorms' variables) are not read and may be left out.
    kernels: ``pack_kernels``'s result.
    images: (B, H, W, 3).
    how: one of ``CONVOLUTIONS``.
    folds: ``fold.fold_batch_norms``'s result, or None to run every
      BatchNorm as it is.

  Raises:
    PackError: the model calls a binary convolution ``kernels`` lacks.
  """
  with on_bits(kernels, how, folds):
    return model.apply(variables, images, train=False)
