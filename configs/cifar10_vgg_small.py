"""The ``cifar10_vgg_small`` recipe, kept in the package (ir2net_jax/configs/cifar10_vgg_small.py) so
that it is importable once installed; this file lets ``launch.py
--config=configs/cifar10_vgg_small.py`` run from a checkout."""

from ir2net_jax.configs.cifar10_vgg_small import get_config  # noqa: F401
