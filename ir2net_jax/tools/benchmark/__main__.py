"""``python -m ir2net_jax.tools.benchmark``: see the package docstring."""

from ir2net_jax.tools.benchmark import cli

if __name__ == "__main__":
  cli.run()
