"""The start of a run, the same for training and evaluation.

``connect(config)`` before anything touches JAX's backends (orbax does, when
it lists a checkpoint directory): multi-host JAX, quiet library logs.
``prepare(config, training)`` then checks the config's values and finds
the data set; everything that can be wrong with the config or the data is
reported there, before anything is compiled. ``student(config,
num_classes)`` is the model both run, on the ``('data',)`` mesh.
"""

import logging as pylogging
from typing import Any, NamedTuple, Tuple

import flax.linen as nn
import jax
from absl import logging

from ir2net_jax import data
from ir2net_jax.train import config_checks, parallel, step

__all__ = ["Prepared", "connect", "prepare", "num_classes", "student",
           "quiet_library_logs"]


class Prepared(NamedTuple):
  """What ``prepare`` found and built.

  Attributes:
    info: ``data.DatasetInfo`` of the configured data set.
    num_classes: the student's classifier outputs.
  """
  info: Any
  num_classes: int


class _DropLibraryInfo(pylogging.Filter):
  """Keeps INFO lines of orbax / tfds (several per checkpoint) out of the
  log, orbax's warnings about what we do on purpose (a read-only manager
  for a restore, a step saved before orbax wrote its metadata file), and
  every other warning of theirs after its first time."""
  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/xla_bridge")
  _MEANT = ("CheckpointManagerOptions.read_only=True",
            "Given directory is read only",
            "Metadata file does not exist")

  def __init__(self):
    super().__init__()
    self._warned = set()

  def filter(self, record):
    if not any(p in record.pathname for p in self._NOISY):
      return True
    if (record.levelno < pylogging.WARNING
        or str(record.msg).startswith(self._MEANT)):
      return False
    key = (record.pathname, record.lineno, record.getMessage())
    if key in self._warned:
      return False
    self._warned.add(key)
    return True


def quiet_library_logs() -> None:
  """Adds ``_DropLibraryInfo`` (once) to absl's logger, which orbax and
  tfds log through, whichever handler is attached yet, and to JAX's backend
  logger ("Unable to initialize backend 'tpu'" on every CPU start)."""
  for logger in (logging.get_absl_logger(),
                 pylogging.getLogger("jax._src.xla_bridge")):
    if not any(isinstance(f, _DropLibraryInfo) for f in logger.filters):
      logger.addFilter(_DropLibraryInfo())


def connect(config) -> None:
  """Joins multi-host JAX (``parallel.init_distributed``; a config of None
  reads the cluster environment only) and keeps library INFO lines out of
  the log. Call before anything starts JAX's backends."""
  quiet_library_logs()
  parallel.init_distributed(config)


def num_classes(config, info) -> int:
  """``config.num_classes``, or the data set's where it is -1."""
  return config.num_classes if config.num_classes > 0 else info.num_classes


def prepare(config, training: bool) -> Prepared:
  """Checks ``config`` and its data.

  Args:
    config: the run's config.
    training: True checks every field training uses
      (``config_checks.validate_config``); False only what evaluating a
      checkpoint needs (``validate_eval_config``).

  Raises:
    ConfigError: a config value that cannot work.
    DataError: the data set is missing.
  """
  if training:
    config_checks.validate_config(config)
  else:
    config_checks.validate_eval_config(config)
  info = data.dataset_info(config)            # DataError if missing
  config_checks.check_num_classes(config, info)
  return Prepared(info, num_classes(config, info))


def student(config, classes: int) -> Tuple[nn.Module, jax.sharding.Mesh]:
  """The student, its BatchNorm synchronised over ``'data'`` where the
  config says so, and the ``('data',)`` mesh of every device of every host
  it runs on."""
  return (step.build_model(config, classes, parallel.AXIS),
          parallel.data_mesh())
