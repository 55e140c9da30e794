"""IR2Net ResNet-18 1W1A on CIFAR-10 (SPEC §5): SGD lr 0.08, 600 epochs.

  python launch.py --config=configs/cifar10_resnet18.py --workdir=runs/c10_r18

Meant for one GPU; batch 128, cosine to 0, weight decay 1e-4. The paper
reports 92.5% top-1 (best epoch).
"""

from ir2net_jax.configs.cifar10_common import cifar10_config


def get_config(arg: str = ""):
  return cifar10_config("cifar10_resnet18", "cifar_resnet18", 0.08, 600, arg)
