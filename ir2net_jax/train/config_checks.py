"""Checks of a config's values, made before anything is compiled or written.

``train.startup.prepare`` calls them for training and evaluation::

  validate_config(config)              # every field's value; compiles nothing
  info = data.dataset_info(config)
  check_num_classes(config, info)      # the model's classes cover the labels

and ``train.resume`` then checks the config against an earlier run in the
workdir. Each failure is a :class:`ConfigError` that names the field and
what to set instead. ``_FIELDS`` holds one rule for every field of
``ir2net_jax/configs/default.py``.
"""

import dataclasses
import math
import numbers
from typing import Any, Dict, Optional, Tuple

import jax

from ir2net_jax import models
from ir2net_jax.configs import ConfigError
from ir2net_jax.storage import paths

__all__ = ["ConfigError", "validate_config", "validate_eval_config",
           "check_num_classes", "eval_batch_size"]


@dataclasses.dataclass(frozen=True)
class _Number:
  """An int (``kind=int``) or a finite number in [low, high] (or [low, high)
  with ``high_open``), or one of ``special`` (value -> meaning)."""
  kind: type
  low: Optional[float] = None
  high: Optional[float] = None
  high_open: bool = False
  low_open: bool = False
  special: Tuple[Tuple[Any, str], ...] = ()
  optional: bool = False   # None means "the default" (placeholder fields)

  def accepts(self, value) -> bool:
    if value is None:
      return self.optional
    if isinstance(value, bool) or not isinstance(
        value, numbers.Integral if self.kind is int else numbers.Real):
      return False
    if any(value == v for v, _ in self.special):
      return True
    if not math.isfinite(value):
      return False
    if self.low is not None and (value < self.low
                                 or (self.low_open and value == self.low)):
      return False
    return self.high is None or not (
        value > self.high or (self.high_open and value == self.high))

  def describe(self) -> str:
    what = "an integer" if self.kind is int else "a number"
    if self.low is not None and self.high is not None:
      what += (f" in {'(' if self.low_open else '['}{self.low}, "
               f"{self.high}{')' if self.high_open else ']'}")
    elif self.low is not None:
      what += f" {'>' if self.low_open else '>='} {self.low}"
    extras = [f"{v!r} ({meaning})" for v, meaning in self.special]
    if self.optional:
      extras.append("None (the default)")
    return what + "".join(f" or {e}" for e in extras)


@dataclasses.dataclass(frozen=True)
class _OneOf:
  """One of ``choices``."""
  choices: Tuple[Any, ...]

  def accepts(self, value) -> bool:
    return any(type(value) is type(c) and value == c for c in self.choices)

  def describe(self) -> str:
    return "one of " + ", ".join(repr(c) for c in self.choices)


@dataclasses.dataclass(frozen=True)
class _Text:
  """A string (paths, names, split expressions, flags); checked where used."""
  optional: bool = False   # None allowed (placeholder fields)

  def accepts(self, value) -> bool:
    return isinstance(value, str) or (self.optional and value is None)

  def describe(self) -> str:
    return "a string" + (" or None" if self.optional else "")


@dataclasses.dataclass(frozen=True)
class _DatasetName:
  """A registered data set name, 'tfds:NAME' or 'folder:PATH' (the format
  only: ``data.dataset_info`` checks that the data exist)."""
  prefixes: Tuple[str, ...] = ("tfds:", "folder:")

  def accepts(self, value) -> bool:
    if not isinstance(value, str) or not value:
      return False
    if ":" not in value:
      return True
    prefix, rest = value.split(":", 1)
    return prefix + ":" in self.prefixes and bool(rest)

  def describe(self) -> str:
    return ("a data set name ('digits', 'cifar10', 'imagenet2012'), "
            "'tfds:NAME' or 'folder:PATH'")


@dataclasses.dataclass(frozen=True)
class _Fractions:
  """None (the recipe's own) or (low, high) with 0 < low <= high <= 1."""

  def accepts(self, value) -> bool:
    if value is None:
      return True
    unit = _Number(float, 0, 1, low_open=True)
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(unit.accepts(v) for v in value) and value[0] <= value[1])

  def describe(self) -> str:
    return "None (the recipe's own) or (low, high) with 0 < low <= high <= 1"


@dataclasses.dataclass(frozen=True)
class _Mapping:
  """Keyword arguments (a ConfigDict); the model checks their names."""

  def accepts(self, value) -> bool:
    return hasattr(value, "keys") and all(isinstance(k, str) for k in value)

  def describe(self) -> str:
    return "a ConfigDict of keyword arguments"


_BOOL = _OneOf((True, False))
_POSITIVE_INT = _Number(int, 1)
_RATE = _Number(float, 0, low_open=True)

# One rule for every field of ir2net_jax/configs/default.py, with why where
# the rule is not obvious. Choices that depend on other fields (model names,
# dtypes, the devices) are checked in validate_config after this table.
_FIELDS: Dict[str, Tuple[Any, str]] = {
    "name": (_Text(), ""),
    "model": (_Text(), ""),
    "model_kwargs": (_Mapping(), ""),
    "stage": (_OneOf((1, 2)), "IR2Net has stages 1 and 2 (other models "
              "ignore it)"),
    "num_classes": (_Number(int, 1, special=((-1, "from the data set"),)),
                    ""),
    "information_recovery": (_BOOL, ""),
    "information_restriction": (_BOOL, ""),
    # SPEC §3: pixels whose attention is not above erase_lambda x its mean
    # are erased. Below 0 nothing is ever erased; above 1 the erased copy
    # keeps less than the above-average regions the method means to keep.
    "erase_lambda": (_Number(float, 0, 1), "the erase threshold is "
                     "erase_lambda x the mean attention (paper: 0.15)"),
    "zero_to_one": (_BOOL, ""),
    "sync_batch_stats": (_BOOL, ""),
    # Binary convolutions sum ±1 products in float32 (float operands) or
    # int32 (int8 operands), exactly; an unsigned dtype makes -1 a 255.
    "binary_compute_dtype": (_OneOf(("auto", "", None, "float32", "bfloat16",
                                     "float16", "int8")),
                             "the binary convolutions' operand dtype, one in "
                             "which their ±1 products sum exactly"),
    "xla_cpu_flags": (_Text(), ""),
    "dataset": (_DatasetName(), ""),
    "data_dir": (_Text(optional=True), ""),
    "manual_dir": (_Text(optional=True), ""),
    "image_size": (_POSITIVE_INT, ""),
    "train_split": (_Text(), ""),
    "eval_split": (_Text(), "'' picks the data set's test split, else its "
                   "validation split"),
    "augment": (_OneOf(("auto", "cifar", "imagenet")), "the augmentation "
                "of tfds: and folder: data sets"),
    "flip": (_OneOf((None, True, False)), "mirror train images left-right; "
             "None: the data set's recipe (no flip for digits)"),
    "crop_padding": (_Number(int, 0, optional=True), "zero padding of the "
                     "pad-and-crop recipes (digits, cifar10, augment='cifar')"),
    "crop_scale": (_Fractions(), "area range of RandomResizedCrop "
                   "(imagenet2012, augment='imagenet')"),
    "shuffle_buffer": (_Number(int, 1, optional=True), ""),
    "dtype": (_OneOf(("float32", "bfloat16")), "the conv / dense compute "
              "dtype (mixed precision: parameters stay float32)"),
    "remat": (_BOOL, "recompute each residual block in the backward pass"),
    "input_engine": (_OneOf(("auto", "tf.data", "grain", "device")),
                     "where batches are made: 'device' keeps digits and "
                     "CIFAR-10 on the accelerators, 'grain' decodes on the "
                     "host without TensorFlow"),
    "input_workers": (_Number(int, -1), "grain's decoding processes; 0 "
                      "decodes in threads of the training process, -1 one "
                      "process per core"),
    "input_resize": (_OneOf(("auto", "host", "device")), "where the grain "
                     "engine resizes RandomResizedCrop windows (the same "
                     "pixels either way); 'auto': 'device' on "
                     "accelerators, 'host' on CPUs"),
    "bad_examples": (_OneOf(("skip", "error")), "what a run does with an "
                     "image file that cannot be read: 'skip' it (logged, "
                     "counted) or stop with an 'error' naming it"),
    "max_bad_fraction": (_Number(float, 0, 1), "the share of a split's "
                         "files that may be bad before a 'skip' run stops"),
    "device_data_limit": (_Number(float, 0, 1, low_open=True), "the largest "
                          "fraction of a device's memory the device engine "
                          "fills with data"),
    "prefetch": (_Number(int, 0), "batches placed on the devices ahead of "
                 "the step; 0 places each when it is needed"),
    "loss": (_OneOf(("cross_entropy", "distillation")), ""),
    "teacher_model": (_Text(), ""),
    "teacher_kwargs": (_Mapping(), ""),
    "teacher_checkpoint": (_Text(), ""),
    "optimizer": (_OneOf(("sgd", "adam")), ""),
    "learning_rate": (_RATE, ""),
    "momentum": (_Number(float, 0, 1, high_open=True), "SGD's momentum "
                 "decay; at 1 or above past gradients never fade"),
    "weight_decay": (_Number(float, 0), ""),
    "weight_decay_rule": (_OneOf(("all", "conv_or_4d")), ""),
    "schedule_unit": (_OneOf(("epoch", "step")), ""),
    "warmup_epochs": (_Number(float, 0), ""),
    "batch_size": (_POSITIVE_INT, ""),
    "num_epochs": (_POSITIVE_INT, "the cosine schedule's length"),
    "num_train_steps": (_Number(int, 1, special=((-1, "num_epochs of the "
                                                  "training split"),)), ""),
    # numpy's SeedSequence takes no negative seed, jax.random.key no seed
    # beyond int64.
    "seed": (_Number(int, 0, 2**63 - 1), ""),
    "stage1_checkpoint": (_Text(), ""),
    "init_from": (_Text(), ""),
    "init_from_fresh": (_Text(), "top-level modules, comma-separated"),
    "eval_every_epochs": (_POSITIVE_INT, "evaluate every N epochs"),
    "eval_batch_size": (_Number(int, 1, special=((-1, "batch_size"),)), ""),
    "log_every_steps": (_POSITIVE_INT, "write training metrics every N "
                        "steps"),
    "diagnostics": (_BOOL, "BNN diagnostics in TensorBoard, computed in the "
                    "train step"),
    "checkpoint_every_steps": (_Number(int, 1, special=((-1, "once an "
                                                         "epoch"),)), ""),
    "skip_nonfinite_updates": (_BOOL, "skip a step whose loss or gradient "
                               "is not finite instead of stopping"),
    "restriction_images": (_Number(int, 0), "eval images drawn in the "
                           "restriction pictures at every evaluation; 0: "
                           "none"),
    "keep_checkpoints": (_POSITIVE_INT, "how many of the latest checkpoints "
                         "to keep; resuming needs at least one"),
    "coordinator_address": (_Text(), ""),
    "num_processes": (_POSITIVE_INT, ""),
    "process_id": (_Number(int, 0), ""),
}

_MODEL_NAMES = f"choose one of {sorted(models.MODELS)}"


def _fail(field: str, value: Any, problem: str, fix: str) -> ConfigError:
  return ConfigError(f"config.{field}={value!r} {problem}; {fix}")


def _check_fields(config) -> None:
  for field, (rule, why) in _FIELDS.items():
    if field not in config:
      continue  # a config built without ir2net_jax/configs/default.py
    value = config[field]
    if not rule.accepts(value):
      raise _fail(field, value, f"is not {rule.describe()}" +
                  (f" ({why})" if why else ""),
                  f"pass --config.{field}=<{rule.describe()}>")


def eval_batch_size(config) -> int:
  """``config.eval_batch_size``, or ``batch_size`` where it is -1."""
  return (config.eval_batch_size if config.eval_batch_size > 0
          else config.batch_size)


def validate_config(config) -> None:
  """Raises ConfigError for values that cannot work.

  Cheap: reads the config, the file system and ``jax.device_count()``;
  compiles nothing.
  """
  _check_fields(config)
  if config.model not in models.MODELS:
    raise ConfigError(f"config.model={config.model!r} is not a model; "
                      f"{_MODEL_NAMES}")
  if config.loss == "distillation":
    if config.teacher_model not in models.MODELS:
      raise ConfigError(f"config.teacher_model={config.teacher_model!r} is "
                        f"not a model; {_MODEL_NAMES}")
    if not config.teacher_checkpoint:
      raise ConfigError(
          "config.loss='distillation' needs a teacher: convert torchvision's "
          "ResNet-34 once with `python -m ir2net_jax.tools.convert "
          "--model=teacher_resnet34 --input=resnet34.pth --output=DIR` and "
          "pass --config.teacher_checkpoint=DIR")
    if not paths.isdir(config.teacher_checkpoint):
      raise ConfigError(f"no teacher checkpoint at config.teacher_checkpoint="
                        f"{config.teacher_checkpoint!r}")
  if config.init_from and not paths.isdir(config.init_from):
    raise ConfigError(f"config.init_from={config.init_from!r} does not exist")
  if config.get("init_from_fresh") and not config.init_from:
    raise ConfigError(
        f"config.init_from_fresh={config.init_from_fresh!r} names modules to "
        "start fresh instead of from config.init_from, which is not set: set "
        "init_from or unset init_from_fresh")
  if config.init_from and config.stage1_checkpoint:
    raise ConfigError(
        f"config.init_from={config.init_from!r} and config.stage1_checkpoint="
        f"{config.stage1_checkpoint!r} both name where the run starts; a run "
        "with init_from reads no stage-1 checkpoint: unset one of them")
  if config.process_id >= config.num_processes:
    raise _fail("process_id", config.process_id,
                f"is not below config.num_processes={config.num_processes}",
                "number the processes 0 .. num_processes - 1")
  n = jax.device_count()
  for name, bs in (("batch_size", config.batch_size),
                   ("eval_batch_size", eval_batch_size(config))):
    if bs % n:
      raise ConfigError(f"config.{name}={bs} is not divisible by the {n} "
                        "devices; choose a multiple")


def validate_eval_config(config) -> None:
  """``validate_config``'s checks that evaluating a checkpoint needs.

  Every field's value, the model, and an eval batch the devices divide;
  not the teacher, the starting point or the training batch, which
  evaluation does not use. Compiles nothing.
  """
  _check_fields(config)
  if config.model not in models.MODELS:
    raise ConfigError(f"config.model={config.model!r} is not a model; "
                      f"{_MODEL_NAMES}")
  n = jax.device_count()
  if eval_batch_size(config) % n:
    raise ConfigError(f"config.eval_batch_size={eval_batch_size(config)} is "
                      f"not divisible by the {n} devices; choose a multiple")


def check_num_classes(config, info) -> None:
  """Refuses a model with fewer classes than the data set has labels.

  Args:
    config: the run's config.
    info: ``data.DatasetInfo`` of the configured data set.
  """
  if 0 < config.num_classes < info.num_classes:
    raise _fail("num_classes", config.num_classes,
                f"is smaller than the {info.num_classes} classes of "
                f"{config.dataset} (labels 0..{info.num_classes - 1})",
                f"pass --config.num_classes=-1 (from the data set) or a "
                f"number >= {info.num_classes}")
