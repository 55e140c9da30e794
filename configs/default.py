"""The ``default`` recipe, kept in the package (ir2net_jax/configs/default.py) so
that it is importable once installed; this file lets ``launch.py
--config=configs/default.py`` run from a checkout."""

from ir2net_jax.configs.default import get_config  # noqa: F401
