"""IR2Net ResNet-20 1W1A on CIFAR-10 (SPEC §5): SGD lr 0.11, 500 epochs.

  python launch.py --config=configs/cifar10_resnet20.py --workdir=runs/c10_r20

Meant for one GPU (the reference used one RTX 2070, about a day); batch 128,
cosine to 0, weight decay 1e-4 on every parameter. The paper reports 87.2%
top-1 (best epoch). Needs CIFAR-10 prepared by tfds beforehand: nothing here
downloads it (`tfds build cifar10 --data_dir=DIR` on a machine with network,
then --config.data_dir=DIR).
"""

from ir2net_jax.configs.cifar10_common import cifar10_config


def get_config(arg: str = ""):
  return cifar10_config("cifar10_resnet20", "cifar_resnet20", 0.11, 500, arg)
