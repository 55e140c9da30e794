"""The offline default: IR2Net ResNet-20 1W1A on scikit-learn's 8x8 digits.

  python launch.py --config=configs/digits.py --workdir=/tmp/ir2net_digits

Needs no network: the 1,797 digits that scikit-learn ships (1,437 train /
360 test, a fixed split), upsampled to 32x32 and kept on the devices as
numpy arrays (the device engine; the tf.data engine reads them through a
local tfds dataset). Binary weights and activations, information
restriction and recovery on, as in the CIFAR recipe. On a 2-core CPU it
takes 2-7 minutes and reaches 93-96% test top-1 (about 95% at the best
epoch), depending on the CPU's rounding.
``configs/digits.py:smoke`` runs a few steps in well under a minute: a check
that everything works, not a model (its top-1 is near chance, 10%).
"""

from ir2net_jax.configs import default


def get_config(arg: str = ""):
  c = default.get_config()
  c.name = "digits_resnet20"
  c.model = "cifar_resnet20"
  c.dataset = "digits"
  c.image_size = 32
  c.eval_split = "test"
  c.flip = False  # Digits are not mirror-invariant, whatever data it reads.
  c.optimizer = "sgd"
  c.learning_rate = 0.1
  c.weight_decay = 1e-4
  c.batch_size = 64
  c.num_epochs = 15
  c.schedule_unit = "step"
  c.log_every_steps = 50
  if arg == "smoke":  # seconds: a 1-block-per-stage ResNet-20, a few steps
    c.model_kwargs.num_blocks = (1, 1, 1)
    default.smoke(c, batch_size=16, num_train_steps=6, num_epochs=2,
                  eval_batch_size=40, log_every_steps=2,
                  checkpoint_every_steps=2)
  elif arg:
    raise ValueError(f"configs/digits.py takes '' or 'smoke', not {arg!r}")
  return c
