"""Draws a run's curves into a PNG: ``ir2net-curves``.

  ir2net-curves --workdir=runs/digits
  ir2net-curves --workdir=gs://bucket/run1 --output=/tmp/run1.png

Reads the TensorBoard event files in the workdir (no TensorBoard server, no
TensorFlow) while the run goes on or after it, and writes
``<workdir>/curves.png`` (or ``--output``): loss, top-1, learning rate, the
BNN diagnostics and the speed (``ir2net_jax.train.curves``). Every run
writes it once at its end too.
"""

import argparse
import sys
from typing import Optional, Sequence

from ir2net_jax.storage import paths
from ir2net_jax.train import curves

__all__ = ["main", "run"]


def main(argv: Optional[Sequence[str]] = None) -> None:
  """``python -m ir2net_jax.tools.curves --workdir=RUN [--output=PNG]``."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="the run's workdir (local or gs://...)")
  parser.add_argument("--output", default=None,
                      help=f"the PNG to write (default: <workdir>/"
                           f"{curves.FILE_NAME})")
  args = parser.parse_args(argv)
  try:
    written = curves.plot(args.workdir, args.output)
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")
  except ImportError:
    sys.exit("error: drawing the curves needs matplotlib: pip install "
             "matplotlib")
  except OSError as e:
    sys.exit(f"error: {paths.first_line(e)}")
  print(f"wrote {written}")


def run() -> None:
  """The ``ir2net-curves`` console script: ``main`` on ``sys.argv``."""
  main()


if __name__ == "__main__":
  run()
