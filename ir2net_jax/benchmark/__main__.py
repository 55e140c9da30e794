"""``python -m ir2net_jax.benchmark``: see the package docstring."""

import sys

from ir2net_jax.benchmark import cli

if __name__ == "__main__":
  try:
    cli.main()
  except cli.UsageError as e:
    sys.exit(f"error: {e}")
