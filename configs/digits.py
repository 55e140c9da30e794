"""The ``digits`` recipe, kept in the package (ir2net_jax/configs/digits.py) so
that it is importable once installed; this file lets ``launch.py
--config=configs/digits.py`` run from a checkout."""

from ir2net_jax.configs.digits import get_config  # noqa: F401
