"""An earlier run in the workdir: what may change when it resumes, and the
record of each config it ran with.

``train.loop.train_and_evaluate`` calls them around compiling::

  check_resume(workdir, config)        # before: an earlier run's config.json
  ...                                  # compile, restore, then
  record_config(workdir, config)       # config.json, never overwritten

``RESUMABLE_FIELDS`` holds the fields that may change when a run resumes.
"""

import datetime
import json
from typing import Any, Dict, List, Sequence, Tuple

from absl import logging
from flax import traverse_util
import ml_collections

from ir2net_jax.configs import ConfigError
from ir2net_jax.configs.record import FIELDS_ADDED
from ir2net_jax.data import engines
from ir2net_jax.storage import paths

__all__ = ["as_recorded", "check_resume", "record_config", "RESUMABLE_FIELDS",
           "NO_FLIP_DATASETS"]

# The fields that change no result, so they may differ when a workdir's run
# resumes: where the data lie, logging, evaluation and checkpoint cadence,
# speed options (binary_compute_dtype, remat and xla_cpu_flags are exact;
# input_workers and input_resize change how batches are made, never them),
# the diagnostics (extra outputs of the step, the same updates), the
# process layout, and the run's length. num_epochs and num_train_steps
# extend (or shorten) a run; the cosine schedule then follows the new
# length from the resumed step on. Every other field must equal the one in
# the workdir's config.json, paths that decide results included
# (teacher_checkpoint, init_from, stage1_checkpoint).
RESUMABLE_FIELDS = frozenset({
    "name", "data_dir", "manual_dir", "prefetch", "xla_cpu_flags",
    "binary_compute_dtype", "remat", "log_every_steps", "diagnostics",
    "eval_every_epochs", "eval_batch_size", "checkpoint_every_steps",
    "keep_checkpoints",
    "num_epochs", "num_train_steps", "coordinator_address", "num_processes",
    "process_id", "restriction_images", "device_data_limit",
    "input_workers", "input_resize",
})

# The data sets whose own train recipe does not flip (``flip=None`` there
# means no flip; ``data.shared.sources``' specs agree, which a test checks).
NO_FLIP_DATASETS = frozenset({"digits"})


class _Unset:
  def __repr__(self):
    return "(unset)"


_UNSET = _Unset()


def as_recorded(config) -> Dict[str, Any]:
  """The config as config.json holds it (tuples as lists, None as null)."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def _effective(recorded: Dict[str, Any]) -> Dict[str, Any]:
  """``recorded`` with ``flip=None`` and ``input_engine='auto'`` replaced by
  what they mean for the data set, so that an explicit value that does the
  same is no difference."""
  if recorded.get("flip") is None and "dataset" in recorded:
    recorded = {**recorded,
                "flip": recorded["dataset"] not in NO_FLIP_DATASETS}
  if recorded.get("input_engine") == "auto":
    recorded = {**recorded, "input_engine": engines.auto_engine(
        ml_collections.ConfigDict(recorded))}
  return recorded


def _differences(old: Dict[str, Any], new: Dict[str, Any]
                 ) -> List[Tuple[str, Any, Any]]:
  """(field, old, new) of every differing field, nested ones dotted
  (``model_kwargs.num_blocks``); a field one side lacks is ``_UNSET``."""
  old = traverse_util.flatten_dict(old, sep=".")
  new = traverse_util.flatten_dict(new, sep=".")
  return [(k, old.get(k, _UNSET), new.get(k, _UNSET))
          for k in sorted(old.keys() | new.keys())
          if old.get(k, _UNSET) != new.get(k, _UNSET)]


def check_resume(workdir: str, config) -> None:
  """Refuses to resume a run whose results this config would change.

  The workdir's ``config.json`` (written when its run started) must match
  ``config`` in every field but ``RESUMABLE_FIELDS``. A field of
  ``FIELDS_ADDED`` that the workdir's run did not record is compared with
  the value that run used; any other top-level field only one side has is
  logged, not refused.

  Raises:
    ConfigError: listing each differing field as ``old -> new``.
  """
  path = paths.join(workdir, "config.json")
  if not paths.exists(path):
    return
  old = json.loads(paths.read_text(path))
  implied = sorted(FIELDS_ADDED.keys() - old.keys())
  if implied:
    logging.info("%s records no %s: its run used %s", path,
                 ", ".join(implied), {f: FIELDS_ADDED[f] for f in implied})
  changed, unrecorded = [], []
  for field, before, after in _differences(
      _effective({**FIELDS_ADDED, **old}), _effective(as_recorded(config))):
    if field.split(".")[0] in RESUMABLE_FIELDS:
      continue
    if field in implied:
      changed.append(f"{field}: {before!r} (not recorded: its run predates "
                     f"the field; pass --config.{field}={before!r}) -> "
                     f"{after!r}")
    elif "." not in field and _UNSET in (before, after):
      unrecorded.append(field)
    else:
      changed.append(f"{field}: {before!r} -> {after!r}")
  if unrecorded:
    logging.warning("%s and this config do not both have %s; resuming anyway",
                    path, ", ".join(unrecorded))
  if changed:
    raise ConfigError(
        f"the workdir {workdir} holds a run with another config; these "
        f"fields would change its results: {'; '.join(changed)}. Pass the "
        f"values it was trained with, or use a new --workdir (only "
        f"{', '.join(sorted(RESUMABLE_FIELDS))} may change on resume)")


def _history(workdir: str) -> Sequence[str]:
  """config.json, then config.<UTC time>.json oldest first."""
  return [paths.join(workdir, "config.json")] + [
      paths.join(workdir, name) for name in paths.listdir(workdir)
      if name.startswith("config.") and name.endswith(".json")
      and name != "config.json"]


def record_config(workdir: str, config) -> None:
  """Writes the config into the workdir without overwriting any record.

  ``config.json`` is the config the run started with and is never
  rewritten. A resume that changes fields of ``RESUMABLE_FIELDS`` writes
  its config beside it as ``config.<UTC time>.json``; one that changes
  nothing writes nothing.
  """
  history = [p for p in _history(workdir) if paths.exists(p)]
  new = as_recorded(config)
  if history:
    if json.loads(paths.read_text(history[-1])) == new:
      return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%S.%fZ")
    path = paths.join(workdir, f"config.{stamp}.json")
  else:
    path = paths.join(workdir, "config.json")
  paths.write_new(path, json.dumps(new, indent=1))
