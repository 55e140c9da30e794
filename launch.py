"""Trains IR2Net: ``python launch.py --config=configs/X.py --workdir=DIR``.

The same program as the installed ``ir2net-train``
(``ir2net_jax/tools/train.py``): ``--config`` takes a recipe file or a
recipe's name (``digits:smoke``), ``--config.field=value`` overrides a
field, and a run stopped by SIGTERM or SIGINT saves a checkpoint of its last
step and exits with status 143 or 130; the same command resumes it.
"""

from ir2net_jax.tools import train

if __name__ == "__main__":
  train.run()
