"""The ``cifar10_resnet20`` recipe, kept in the package (ir2net_jax/configs/cifar10_resnet20.py) so
that it is importable once installed; this file lets ``launch.py
--config=configs/cifar10_resnet20.py`` run from a checkout."""

from ir2net_jax.configs.cifar10_resnet20 import get_config  # noqa: F401
