"""Input engines: which one serves a run, and one interface to both.

``config.input_engine``:

* ``'device'`` (``device.on_device``): digits and CIFAR-10 live on the
  devices and the train step draws its own batch; no host pipeline, no
  TensorFlow for digits.
* ``'grain'`` (``grain.grain_inputs``): host decoding in worker processes
  with numpy recipes, no TensorFlow; ``folder:`` trees and tfds data
  prepared as ArrayRecord (ImageNet, CIFAR-10, ``tfds:``).
* ``'tf.data'`` (``tf_data.pipeline``): the host pipeline of tfds +
  tf.data, for every data set (ImageNet, ``tfds:``, ``folder:``); needs
  TensorFlow.
* ``'auto'``: ``'device'`` where it can serve the config (and the data fit
  in ``config.device_data_limit`` of a device's memory); else ``'grain'``
  where grain is installed, for ``folder:`` data, and for every data set
  when TensorFlow is absent; else ``'tf.data'``. With TensorFlow, tfds data
  sets stay on tf.data under 'auto' because ``tfds build`` writes TFRecord
  unless told otherwise (name 'grain' for data prepared as ArrayRecord).
  The choice is logged.

Every engine keeps one contract: the batch at step ``s`` depends on
``(seed, s)`` only, so a resumed run is bit-identical to one that never
stopped; each engine draws its own stream, so a run resumes with the engine
it started with (``train.resume`` checks the resolved engine).

:func:`open_inputs` returns an object with ``engine``, ``info``,
``batch_fn()`` (None for host engines: the step takes a batch),
``train_batches(start_step)``, ``eval_batches()`` and
``first_eval_images(count)``.
"""

from typing import Iterator, Optional

from absl import logging
import jax
import numpy as np

from ir2net_jax.data.device import on_device
from ir2net_jax.data.device.on_device import tensorflow_installed
from ir2net_jax.data.shared import folders, sources
from ir2net_jax.data.shared.specs import DataError, DatasetInfo

__all__ = ["ENGINES", "auto_engine", "train_resize", "resolve_engine",
           "tensorflow_installed", "dataset_info", "open_inputs", "HostInputs"]

ENGINES = ("auto", "tf.data", "grain", "device")


def _grain():
  # Imported when a host engine is chosen: it imports tfds, which a run on
  # the device engine never needs.
  from ir2net_jax.data.grain import grain_inputs  # pylint: disable=g-import-not-at-top
  return grain_inputs


def _host_engine(config) -> str:
  """'grain' or 'tf.data': the host engine 'auto' takes (see above)."""
  dataset = config.get("dataset") or ""
  if _grain().grain_installed() and dataset != "digits" and (
      dataset.startswith(folders.FOLDER_PREFIX) or not tensorflow_installed()):
    return "grain"
  return "tf.data"


def auto_engine(config) -> str:
  """What ``input_engine='auto'`` means for ``config`` (a pure function of
  the config and the installed packages; ``train.resume`` compares runs
  through it)."""
  return "device" if on_device.can_serve(config) else _host_engine(config)


def train_resize(config) -> str:
  """Where ``config``'s train windows are resized, 'host' or 'device': the
  grain engine's ``input_resize`` for RandomResizedCrop recipes, else
  'host' (``train.resume`` compares runs through it)."""
  name = config.get("input_engine") or "auto"
  if (auto_engine(config) if name == "auto" else name) != "grain":
    return "host"
  grain_inputs = _grain()
  try:
    kind = grain_inputs.recipe_kind(grain_inputs.check_config(config))
  except DataError:   # the data are not here: where it would resize them
    kind = "large"
  try:
    return grain_inputs.resolve_resize(config) if kind == "large" else "host"
  except DataError:
    return config.get("input_resize")


def resolve_engine(config, log: bool = False) -> str:
  """The engine that serves ``config``: 'tf.data', 'grain' or 'device'.

  Decided from the config and what is installed, never from the data, so
  that every process of a run (and its resumption) decides alike.

  Raises:
    DataError: an unknown engine, or one that cannot serve the config here
      (the message names the fix).
  """
  name = config.get("input_engine") or "auto"
  if name not in ENGINES:
    raise DataError(f"input_engine={name!r} is not one of {ENGINES} "
                    "(--config.input_engine=auto).")
  if name == "auto":
    name = auto_engine(config)
  if name == "device":
    on_device.check_config(config)
  elif name == "grain":
    _grain().check_config(config)
  else:
    if not tensorflow_installed():
      raise DataError(
          f"{config.get('dataset')!r} is read by the tf.data engine, which "
          "needs TensorFlow: `pip install tensorflow-cpu tensorflow-datasets` "
          f"(digits and CIFAR-10 need none with input_engine='device'; "
          "folder: data and ArrayRecord tfds data none with 'grain').")
  if log:
    logging.info("input engine: %s (config.input_engine=%r)", name,
                 config.get("input_engine") or "auto")
  return name


def dataset_info(config) -> DatasetInfo:
  """Split sizes, classes and image size, from the engine that serves it.

  Prepares digits for tf.data (and ImageNet from ``manual_dir``) if needed;
  in a multi-host run every process must call it (see
  ``pipeline.dataset_info``).

  Raises:
    DataError: no engine can serve the config; the data are missing.
  """
  engine = resolve_engine(config)
  if engine == "device":
    return on_device.dataset_info(config)
  if engine == "grain":
    return _grain().dataset_info(config)
  from ir2net_jax.data.tf_data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.dataset_info(config)


class HostInputs:
  """The tf.data engine behind the :func:`open_inputs` interface: host
  batches, placed on the devices ``config.prefetch`` steps ahead."""

  engine = "tf.data"

  def __init__(self, config, mesh, eval_batch_size: int,
               num_classes: Optional[int] = None):
    from ir2net_jax.data.tf_data import pipeline  # pylint: disable=g-import-not-at-top
    self._pipeline = pipeline
    self._config = config
    self._eval_batch_size = eval_batch_size
    self._num_classes = num_classes
    self._sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    self.info = pipeline.dataset_info(config)
    self.bad_files = sources.bad_file_tally(sources.read_settings(config))

  def batch_fn(self):
    return None

  def _placed(self, iterator):
    from ir2net_jax.data.shared.prefetch import prefetch_to_device  # pylint: disable=g-import-not-at-top
    return prefetch_to_device(iterator, self._config.prefetch, self._sharding)

  def train_batches(self, start_step: int = 0) -> Iterator:
    return self._placed(self._pipeline.train_iterator(
        self._config, global_batch_size=self._config.batch_size,
        seed=self._config.seed, start_step=start_step,
        num_classes=self._num_classes, bad_files=self.bad_files))

  def eval_batches(self) -> Iterator:
    return self._placed(self._pipeline.eval_iterator(
        self._config, global_batch_size=self._eval_batch_size,
        bad_files=self.bad_files))

  def first_eval_images(self, count: int) -> np.ndarray:
    batch = next(self._pipeline.eval_iterator(
        self._config, global_batch_size=count, process_index=0,
        process_count=1))
    return batch["image"][batch["mask"] > 0]


def open_inputs(config, mesh, eval_batch_size: int,
                num_classes: Optional[int] = None):
  """The run's input engine, ready to serve (``on_device.DeviceInputs``,
  ``grain_inputs.GrainInputs`` or :class:`HostInputs`).

  With ``input_engine='auto'`` data that would take more than
  ``config.device_data_limit`` of a device's memory go to the host engine
  'auto' would take without the device (grain or tf.data) instead.

  Raises:
    DataError: see :func:`resolve_engine`; missing data; labels outside
      [0, num_classes).
  """
  engine = resolve_engine(config, log=True)
  if engine == "device":
    try:
      return on_device.DeviceInputs(config, mesh, eval_batch_size,
                                    num_classes)
    except on_device.TooLarge as e:
      engine = _host_engine(config)
      if ((config.get("input_engine") or "auto") != "auto" or (
          engine == "tf.data" and not tensorflow_installed())):
        raise
      logging.warning("%s; input engine: %s instead", e, engine)
  if engine == "grain":
    return _grain().GrainInputs(config, mesh, eval_batch_size, num_classes)
  return HostInputs(config, mesh, eval_batch_size, num_classes)
