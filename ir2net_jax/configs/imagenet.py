"""IR2Net-A/B/C/D on ImageNet, two stages of 256 epochs (SPEC §5).

  # stage 1: binary activations, real weights, Adam 1e-3, wd 1e-5
  python launch.py --config=configs/imagenet.py:a,stage=1 \
      --workdir=runs/ir2net_a/stage1 --config.manual_dir=/data/imagenet \
      --config.teacher_checkpoint=weights/resnet34
  # stage 2: both binary, starts from stage 1's last checkpoint, wd 0
  python launch.py --config=configs/imagenet.py:a,stage=2 \
      --workdir=runs/ir2net_a/stage2 --config.manual_dir=/data/imagenet \
      --config.teacher_checkpoint=weights/resnet34

The argument is ``variant[,stage=N][,depth=34][,smoke]``; the default is
IR2Net-A stage 1. Stage 2 reads the stage-1 workdir from
``--config.stage1_checkpoint`` (default: ``stage1`` beside the workdir),
unless it starts from converted weights (``--config.init_from``, e.g. a
released checkpoint) or resumes its own checkpoint.
The teacher is torchvision's ResNet-34 converted once with
``ir2net-convert --model=teacher_resnet34 --input=resnet34.pth
--output=weights/resnet34``.

Meant for a TPU v3-32 / v4-32 pod slice or 8 A100/H100 GPUs, global batch
512: roughly 2-3 days per stage on 8 A100s. Reported top-1 / top-5:
A 68.2 / 88.0, B 67.0 / 87.1, C 66.6 / 87.0, D 63.8 / 85.5.
"""

from ir2net_jax.configs import default

VARIANTS = "abcd"


def _parse(arg: str):
  opts = {"variant": "a", "stage": 1, "depth": 18, "smoke": False}
  for part in filter(None, (p.strip() for p in arg.split(","))):
    if part in VARIANTS:
      opts["variant"] = part
    elif part == "smoke":
      opts["smoke"] = True
    elif "=" in part and part.split("=")[0] in ("stage", "depth", "variant"):
      k, v = part.split("=", 1)
      opts[k] = v if k == "variant" else int(v)
    else:
      raise ValueError(
          f"configs/imagenet.py: bad argument {part!r}; use "
          "'variant[,stage=1|2][,depth=18|34][,smoke]', e.g. 'c,stage=2'")
  if opts["variant"] not in VARIANTS or opts["stage"] not in (1, 2):
    raise ValueError(f"configs/imagenet.py: variant must be one of a-d and "
                     f"stage 1 or 2, got {opts}")
  return opts


def get_config(arg: str = ""):
  o = _parse(arg)
  c = default.get_config()
  suffix = "" if o["depth"] == 18 else "_resnet34"
  c.name = f"imagenet_ir2net_{o['variant']}{suffix}_stage{o['stage']}"
  c.model = f"ir2net_{o['variant']}{suffix}"
  c.stage = o["stage"]
  c.dataset = "imagenet2012"
  c.image_size = 224
  c.eval_split = "validation"
  c.loss = "distillation"
  c.teacher_model = "teacher_resnet34"
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.weight_decay = 1e-5 if o["stage"] == 1 else 0.0
  c.weight_decay_rule = "conv_or_4d"
  c.batch_size = 512
  c.num_epochs = 256
  c.schedule_unit = "epoch"
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  if o["smoke"]:
    default.smoke(c, batch_size=8, num_train_steps=2, image_size=64)
  return c
