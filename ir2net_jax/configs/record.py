"""What a run's ``config.json`` records, and reading it back as a config.

``train.resume.record_config`` writes the record; ``read_recorded_config``
reads it (``ir2net-eval`` and ``ir2net_jax.tools.visualize`` without
``--config``, through ``configs/recorded.py``).
"""

import json

import ml_collections
from absl import logging

from ir2net_jax.configs import ConfigError, default
from ir2net_jax.storage import paths

__all__ = ["FIELDS_ADDED", "LAUNCH_FIELDS", "config_from_record",
           "read_recorded_config"]

# Fields added since runs began recording config.json, with the value a run
# from before the field behaved as (from `git log -p` of configs/default.py);
# a config.json without one of them holds this value.
FIELDS_ADDED = {
    "xla_cpu_flags": "",               # 5a57b74: XLA's own flags
    "skip_nonfinite_updates": False,   # a8b8fbb: every update applied
    "remat": False,                    # 6d37473
    "restriction_images": 0,           # 746bd2d: no pictures
    "augment": "auto",                 # 4e4d7af: each data set's own
    "diagnostics": False,              # cf184ac
    "init_from_fresh": "",             # f059f53: every module from init_from
    "flip": None,                      # 2fa9048: each data set's own
    "crop_padding": None,              # 2fa9048
    "crop_scale": None,                # 2fa9048
    "input_engine": "tf.data",         # the only engine there was
    "device_data_limit": 0.25,
    "input_workers": -1,
    "input_resize": "host",            # the windows were resized on the host
    "bad_examples": "error",           # a bad file stopped the run
    "max_bad_fraction": 0.01,
}

# How a run's processes were started: a recorded config's describe that run,
# not another program (ir2net-eval) reading it.
LAUNCH_FIELDS = ("coordinator_address", "num_processes", "process_id")

def read_recorded_config(path: str):
  """The config a run recorded in ``path`` (its ``config.json``).

  Built on ``configs/default.py``, so fields keep their types (and
  ``--config.field=`` overrides work); a field of ``FIELDS_ADDED`` it lacks
  takes the value its run used. A recorded field the project no longer has
  is logged and left out, and so are ``LAUNCH_FIELDS``: the config keeps
  the default, one process.

  Raises:
    ConfigError: ``path`` is missing or is not a recorded config.
  """
  try:
    recorded = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read the recorded config {path}: {e}; pass "
                      "--config=<the recipe it was trained with>") from None
  return config_from_record(recorded, path)


def config_from_record(recorded, source: str = "the record"):
  """A config from a recorded config's parsed JSON (``read_recorded_config``
  without the reading; a packed model file holds one too).

  Raises:
    ConfigError: ``recorded`` is not a recorded config.
  """
  if not isinstance(recorded, dict) or "model" not in recorded:
    raise ConfigError(f"{source} is not a config that a run recorded; pass "
                      "--config=<the recipe it was trained with>")
  tuples = lambda v: (tuple(tuples(x) for x in v) if isinstance(v, list)
                      else {k: tuples(x) for k, x in v.items()}
                      if isinstance(v, dict) else v)
  config = default.get_config()
  unknown = []
  for field, value in {**FIELDS_ADDED, **recorded}.items():
    if field in LAUNCH_FIELDS:
      continue
    if field not in config:
      unknown.append(field)
    elif isinstance(value, dict):
      config[field] = ml_collections.ConfigDict(tuples(value))
    else:
      config[field] = tuples(value)
  if unknown:
    logging.warning("%s records fields this version does not have: %s; "
                    "left out", source, ", ".join(unknown))
  return config
