"""Trains IR2Net: ``python launch.py --config=configs/X.py --workdir=DIR``.

Kept short on purpose: it parses flags, applies ``config.xla_cpu_flags``
(before JAX starts), calls ``ir2net_jax.train.train_and_evaluate`` and, in a
multi-host run, leaves it cleanly. Override any field with
``--config.field=value``; unknown fields are an error.

A run stopped by SIGTERM or SIGINT saves a checkpoint and exits with status
128 + the signal's number (143, 130), as if the signal had ended it; the same
command resumes it. A diverged run exits with status 1.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ir2net_jax import parallel, train, xla_cpu

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.info("config:\n%s", FLAGS.config)
  added = xla_cpu.apply_flags(xla_cpu.resolve(FLAGS.config))
  if added:
    logging.info("XLA_FLAGS += %s", " ".join(added))
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(128 + e.signum)
  parallel.shutdown_distributed()


if __name__ == "__main__":
  app.run(main)
