"""Shared by the CIFAR-10 recipes (SPEC §5); not a recipe itself."""

from ir2net_jax.configs import default


def cifar10_config(name: str, model: str, learning_rate: float,
                   num_epochs: int, arg: str):
  c = default.get_config()
  c.name = name
  c.model = model
  c.dataset = "cifar10"
  c.image_size = 32
  c.eval_split = "test"
  c.loss = "cross_entropy"
  c.optimizer = "sgd"
  c.learning_rate = learning_rate
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.weight_decay_rule = "all"
  c.batch_size = 128
  c.num_epochs = num_epochs
  c.schedule_unit = "epoch"
  if arg == "smoke":
    default.smoke(c, batch_size=16, num_train_steps=3)
  elif arg:
    raise ValueError(f"CIFAR-10 configs take '' or 'smoke', not {arg!r}")
  return c
