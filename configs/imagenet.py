"""The ``imagenet`` recipe, kept in the package (ir2net_jax/configs/imagenet.py) so
that it is importable once installed; this file lets ``launch.py
--config=configs/imagenet.py`` run from a checkout."""

from ir2net_jax.configs.imagenet import get_config  # noqa: F401
