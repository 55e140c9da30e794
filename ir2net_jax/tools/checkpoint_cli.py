"""What the commands that read a checkpoint share (``ir2net-eval``,
``python -m ir2net_jax.tools.visualize``): their ``--config`` and
``--checkpoint`` flags, and their start (``run``).
"""

import atexit
import json
import os
import sys
import tempfile
from typing import Callable, List, Optional, Sequence

from absl import flags
from ml_collections import config_flags

from ir2net_jax import configs
from ir2net_jax.data.shared.specs import DataError
from ir2net_jax.deploy import load, packed
from ir2net_jax.tools import command_line
from ir2net_jax.train import evaluate, startup

__all__ = ["define", "run", "with_recorded_config", "RECORDED_RECIPE"]

# The recipe file that reads a recorded config.json (``--config`` left out).
RECORDED_RECIPE = os.path.join(os.path.dirname(os.path.abspath(
    configs.__file__)), "recorded.py")


def define(checkpoint_required: bool = True) -> None:
  """Defines ``--config`` (a recipe or a config file; default: the config
  the checkpoint's workdir recorded) and ``--checkpoint``."""
  config_flags.DEFINE_config_file(
      "config", None, "Recipe (digits:smoke, imagenet:a,stage=2) or config "
      "file; default: the config recorded in the checkpoint's workdir.",
      lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A training workdir, workdir/best, "
                      "or converted weights.")
  if checkpoint_required:
    flags.mark_flag_as_required("checkpoint")


def with_recorded_config(argv: Sequence[str]) -> List[str]:
  """``argv`` plus ``--config=<recorded.py>:<config.json>`` where no
  ``--config`` is given and the checkpoint's workdir recorded one, so that
  ``--config.field=value`` overrides work on the recorded config too."""
  argv = list(argv)
  if any(a == "--config" or a.startswith("--config=") for a in argv):
    return argv
  given = lambda flag: next((a.split("=", 1)[1] for a in argv
                             if a.startswith(f"--{flag}=")), None)
  checkpoint, packed_file = given("checkpoint"), given("packed")
  path = checkpoint and evaluate.recorded_config(checkpoint)
  if not checkpoint and packed_file:
    path = _packed_config(packed_file)
  if not path:
    return argv
  # Before any --config.field override, which needs the config parsed.
  return [argv[0], f"--config={RECORDED_RECIPE}:{path}", *argv[1:]]


def _packed_config(packed_file: str) -> Optional[str]:
  """A temporary copy of the config a packed model file records (None
  where it cannot be read: the command then says why)."""
  try:
    config = load.read_config_record(packed_file)
  except (OSError, packed.PackError):
    return None
  fd, path = tempfile.mkstemp(prefix="packed_config_", suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(config, f)
  atexit.register(os.remove, path)
  return path


def run(main: Callable[[List[str]], None],
        define_more: Callable[[], None],
        checkpoint_required: bool = True) -> None:
  """Defines the flags (``define``, then the command's own
  ``define_more``) and runs ``main`` under absl, with a recipe's name taken
  for ``--config`` (``configs.expand_config_flag``) and the recorded config
  where ``--config`` is left out (``with_recorded_config``).

  The flags are defined here, when the command runs, so that importing a
  command's module defines no absl flags in someone else's program.
  """
  startup.quiet_library_logs()   # orbax logs as the checkpoint is found
  define(checkpoint_required)
  define_more()
  command_line.run_app(_one_line_errors(main), with_recorded_config(
      configs.expand_config_flag(sys.argv)))


# What a user's input causes (a missing checkpoint, a bucket that is not
# there, no data, a model that cannot be packed): one line, no traceback
# (``command_line.exit_on_error``; ``--debug`` raises it).
_USER_ERRORS = (configs.ConfigError, DataError, evaluate.CheckpointError,
               packed.PackError)


def _one_line_errors(main: Callable[[List[str]], None]):
  def wrapped(argv):
    try:
      return main(argv)
    except _USER_ERRORS as e:
      command_line.exit_on_error(e)
  return wrapped
