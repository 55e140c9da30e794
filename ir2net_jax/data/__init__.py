"""Input engines for digits, CIFAR-10, ImageNet, and any image
classification data (a tfds builder or a folder of images).

Three engines (``engines``; ``config.input_engine``), a subpackage each:
``'device'`` keeps digits and CIFAR-10 on the accelerators and draws each
batch inside the train step (``device``, no TensorFlow needed for digits);
``'grain'`` decodes ``folder:`` trees and ArrayRecord tfds data on the host
in worker processes with numpy recipes (``grain``, no TensorFlow);
``'tf.data'`` is the host pipeline of tfds + tf.data (``tf_data``), for
every data set. What they all read (the data set registry, config checks,
specs, folder listings, the image reader) is ``shared``, which imports no
engine; an engine imports ``shared`` and itself only. ``'auto'`` (the
default) picks device, else grain (folders, or anything without
TensorFlow), else tf.data; see ``engines``. The modules' flat names of
before (``from ir2net_jax.data import pipeline``) still import.

Public API::

  info = dataset_info(config)                    # DatasetInfo, any engine
  inputs = open_inputs(config, mesh, eval_batch_size)   # the run's engine

The tf.data engine's own iterators (importing them imports TensorFlow)::

  it = train_iterator(config, global_batch_size=..., seed=..., start_step=...)
  it = eval_iterator(config, global_batch_size=...)
  it = prefetch_to_device(it, size=2, sharding=NamedSharding(mesh, P('data')))

The tf.data engine's batches are dicts of host-local numpy arrays,
B = global_batch_size // process_count: ``image`` (B, S, S, 3) normalised,
``label`` int32 (B,), and for eval ``mask`` float32 (B,) (0 marks padding).
Training batches are an infinite, deterministic function of (seed, host,
step); eval counts every example once over all hosts and batches. (The
grain engine's host batches are uint8, finished on the devices by its
``batch_fn``; the device engine's are drawn inside the step.)

Config fields read (``ml_collections.ConfigDict``; a missing or None field
takes the default shown):

* ``dataset``: 'digits' | 'cifar10' | 'imagenet2012' | 'tfds:NAME' |
  'folder:PATH' (see ``custom``). Required.
* ``data_dir``: tfds data directory; None = the tfds default
  (``~/tensorflow_datasets``, or ``$TFDS_DATA_DIR``).
* ``manual_dir``: directory with ILSVRC2012_img_train.tar and
  ILSVRC2012_img_val.tar, used once to prepare imagenet2012 into
  ``data_dir``; None.
* ``image_size``: model input size S: 32 for digits and cifar10 (the only
  size they serve), 224 for imagenet2012 (any size); any size for tfds: and
  folder: data (images are resized).
* ``train_split``: 'train'. Any tfds split expression, e.g. 'train[:90%]'.
* ``eval_split``: '' = the data set's: 'test' for digits and cifar10,
  'validation' for imagenet2012; for tfds: and folder: data 'test', else
  'validation', else 'val'.
* ``augment``: 'auto' | 'cifar' | 'imagenet', the recipe of tfds: and
  folder: data (see ``custom``); registered data sets take 'auto' only.
* ``shuffle_buffer``: examples in the shuffle buffer; 1437 for digits and
  50000 for cifar10 (the whole split), 16384 for imagenet2012; for tfds:
  and folder: data the whole split if cached, else 16384.
* ``dtype``: 'float32' | 'bfloat16', dtype of ``image``; 'float32'.
* ``input_engine``: 'auto' | 'tf.data' | 'grain' | 'device'; 'auto'.
* ``input_workers``: grain's decoding processes; -1 = one per core (none,
  only threads, below 4 cores).
* ``input_resize``: 'auto' | 'host' | 'device', where grain resizes the
  RandomResizedCrop windows (``window_resize``), to the same pixels;
  'auto' = 'device' on accelerators, 'host' on CPUs.
* ``device_data_limit``: the largest fraction of one device's memory the
  device engine fills with data; 0.25.

Data sets: ``digits`` is scikit-learn's 8x8 digits, built locally as the tfds
dataset ``ir2net_digits`` on first use (1437 train / 360 test, no network);
``cifar10`` must be prepared beforehand (``tfds build cifar10
--data_dir=DIR``); ``imagenet2012`` is prepared from ``manual_dir`` on first
use; ``tfds:NAME`` must be prepared beforehand (``tfds build NAME``);
``folder:PATH`` is read from its files. Nothing here downloads.
Augmentation recipes: see ``recipes``.

Everything wrong with a config (unknown data set, missing data, image size,
batch size not divisible by the number of hosts) raises :class:`DataError`
before any data is read.
"""

import importlib

from ir2net_jax.data.engines import dataset_info
from ir2net_jax.data.engines import open_inputs
from ir2net_jax.data.engines import resolve_engine, train_resize
from ir2net_jax.data.shared.prefetch import prefetch_to_device
from ir2net_jax.data.shared.specs import DataError
from ir2net_jax.data.shared.specs import DatasetInfo

__all__ = [
    "DataError", "DatasetInfo", "dataset_info", "open_inputs",
    "resolve_engine", "train_resize", "train_iterator", "eval_iterator",
    "prefetch_to_device",
]

_TF_DATA = ("train_iterator", "eval_iterator")

# The modules' names before the engines had subpackages, which notebooks
# import: name -> its subpackage, imported on first use.
_MOVED = {
    **dict.fromkeys(("bad_data", "constants", "custom", "digits", "folders",
                     "image_files", "prefetch", "sources", "specs",
                     "tf_recipes"), "shared"),
    "on_device": "device",
    **dict.fromkeys(("grain_inputs", "host_recipes", "pillow_resize",
                     "window_resize"), "grain"),
    **dict.fromkeys(("augment", "digits_tfds", "pipeline", "recipes"),
                    "tf_data"),
}


def __getattr__(name):
  if name in _TF_DATA:  # imported on use: they import TensorFlow
    from ir2net_jax.data.tf_data import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  if name in _MOVED:
    return importlib.import_module(f"{__name__}.{_MOVED[name]}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
