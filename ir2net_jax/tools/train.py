"""Trains IR2Net: ``ir2net-train --config=RECIPE --workdir=DIR``.

``RECIPE`` is a recipe's name with its argument (``digits:smoke``,
``imagenet:c,stage=2``; see ``ir2net_jax.configs``) or a recipe file
(``--config=configs/digits.py`` in a checkout, where ``python launch.py``
runs the same program). Override any field with ``--config.field=value``;
unknown fields are an error.

Kept short on purpose: it parses flags, applies ``config.xla_cpu_flags``
(before JAX starts), calls ``ir2net_jax.train.loop.train_and_evaluate`` and,
in a multi-host run, leaves it cleanly.

A run stopped by SIGTERM or SIGINT saves a checkpoint of its last step
(nothing, if it had not trained one yet) and exits with status 128 + the
signal's number (143, 130), as if the signal had ended it; the same command
resumes it. A diverged run exits with status 1, and so does a run refused
for its config, workdir or data, with one line that names the problem and
the fix (no traceback; ``--debug`` shows it). A typo in ``--config`` or a
``--config.field`` gets one line too, with the nearest names
(``command_line``).
"""

import sys
from typing import List

from absl import app, flags, logging
from ml_collections import config_flags

from ir2net_jax import configs
from ir2net_jax.backend import policy
from ir2net_jax.data import DataError
from ir2net_jax.tools import command_line
from ir2net_jax.train import loop, parallel
from ir2net_jax.train.preemption import Preempted

__all__ = ["main", "run"]

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Recipe name (digits:smoke, imagenet:c,stage=2, ...) or "
    "file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def _header(config, workdir: str) -> List[str]:
  """The run in a few lines: recipe, model, data, workdir (the loop's next
  line adds the steps, devices and input engine)."""
  recipe = next((a.split("=", 1)[1] for a in sys.argv
                 if a.startswith("--config=")), "?")
  # Only IR2Net's ImageNet models have stages (1: real weights in the
  # binary convolutions); CIFAR models binarise both from the start.
  stage = (f" stage {config.stage}" if config.model.startswith("ir2net")
           else "")
  lines = [f"{recipe}: {config.model}{stage} on {config.dataset}, "
           f"batch {config.batch_size}"]
  if config.data_dir:
    lines.append(f"data_dir: {config.data_dir}")
  return lines + [f"workdir: {workdir}"]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for line in _header(FLAGS.config, FLAGS.workdir):
    logging.info("%s", line)
  if FLAGS.verbose:
    logging.info("config:\n%s", FLAGS.config)
  else:
    logging.info("the whole config: config.json in the workdir, or "
                 "--verbose")
  added = policy.apply_xla_cpu_flags(FLAGS.config)
  if added:
    logging.info("XLA_FLAGS += %s", added)
  status = 0
  try:
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                            verbose=FLAGS.verbose)
  except Preempted as e:
    logging.warning("%s", e)
    status = 128 + e.signum
  except (configs.ConfigError, DataError) as e:
    parallel.shutdown_distributed()
    command_line.exit_on_error(e)
  # Before exiting: leaving JAX's coordinator to exit's teardown aborted
  # processes (status -6) instead of exiting with the signal's status.
  parallel.shutdown_distributed()
  if status:
    sys.exit(status)


def run():
  """The ``ir2net-train`` console script (and ``python launch.py``)."""
  # absl's --help describes the main module: the script that called this.
  main_module = sys.modules["__main__"]
  if not main_module.__doc__:
    main_module.__doc__ = __doc__
  for name in ("config", "workdir"):
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
  command_line.run_app(main, configs.expand_config_flag(sys.argv))


if __name__ == "__main__":
  run()
