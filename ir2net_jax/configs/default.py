"""Every configuration field, with its default. Recipes start from here.

Not a recipe itself: run ``configs/digits.py``, ``configs/cifar10_*.py`` or
``configs/imagenet.py``. ``-1`` means "derive it" where noted.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "default"

  # Model: a name from ir2net_jax.models.MODELS and its attributes.
  c.model = "cifar_resnet20"
  c.model_kwargs = ml_collections.ConfigDict()   # e.g. num_blocks=(1, 1, 1)
  c.stage = 1                  # IR2Net (ImageNet) models: 1 or 2
  c.num_classes = -1           # -1: from the data set
  c.information_recovery = True
  c.information_restriction = True
  c.erase_lambda = 0.15
  c.zero_to_one = False        # binarise 0 to +1 (larq) instead of 0
  c.sync_batch_stats = True    # BatchNorm over the global batch
  # Compute dtype of every conv and dense layer, student and teacher:
  # 'float32' or 'bfloat16' (mixed precision: float32 parameters, optimizer
  # state, BatchNorm, losses and attention map). Also the images' dtype.
  c.dtype = "float32"
  # Operand dtype of the binary convolutions, exact for binary weights:
  # 'auto' (policy.binary_compute_dtype), '' (the layers'), 'int8',
  # 'bfloat16'.
  c.binary_compute_dtype = "auto"
  # Recompute each residual block in the backward pass: less memory, the
  # same numbers, about one more forward pass of compute.
  c.remat = False
  # Added to XLA_FLAGS by launch.py before JAX starts; CPU only, changes
  # speed, not results. 'auto': backend.policy.xla_cpu_flags; '': XLA's own.
  c.xla_cpu_flags = "auto"

  # Data (ir2net_jax.data).
  # 'digits' | 'cifar10' | 'imagenet2012', or any image classification
  # data: 'tfds:NAME' (a prepared tfds builder) or 'folder:PATH'
  # (PATH/train/<class>/*.jpg ...); see ir2net_jax/data/shared/custom.py.
  c.dataset = "digits"
  c.data_dir = config_dict.placeholder(str)    # tfds data dir
  c.manual_dir = config_dict.placeholder(str)  # ImageNet tars
  c.image_size = 32
  c.train_split = "train"
  c.eval_split = ""             # '': per data set ('test', else 'validation')
  # tfds: and folder: data: 'auto' | 'cifar' (pad, crop, flip) | 'imagenet'
  # (random-resized-crop, flip); 'auto' picks 'cifar' for images of one
  # size at most 64 pixels a side.
  c.augment = "auto"
  # The train recipe's random choices; None keeps the data set's own. Turn
  # the flip off for data that are not mirror-invariant (digits, text,
  # documents, many medical images). crop_padding applies to the
  # pad-and-crop recipes (digits, cifar10, augment='cifar'), crop_scale,
  # (low, high) area fractions, to RandomResizedCrop (imagenet2012,
  # augment='imagenet').
  c.flip = config_dict.placeholder(bool)
  c.crop_padding = config_dict.placeholder(int)
  c.crop_scale = config_dict.placeholder(tuple)
  c.shuffle_buffer = config_dict.placeholder(int)  # None: per data set
  c.prefetch = 2
  # 'auto' | 'device' (digits and CIFAR-10 kept on the accelerators, each
  # batch drawn inside the train step) | 'grain' (host decoding in worker
  # processes, no TensorFlow: folder:, and tfds data prepared as ArrayRecord)
  # | 'tf.data' (the host pipeline, any data set). 'auto': 'device' where it
  # can serve the data set, else 'grain' for folder: (or for everything
  # when TensorFlow is absent) where grain is installed, else 'tf.data'.
  c.input_engine = "auto"
  c.device_data_limit = 0.25   # most of a device's memory 'device' may fill
  c.input_workers = -1   # grain's decoding processes; -1: the host's cores
  # Where grain resizes RandomResizedCrop windows, to the same pixels:
  # 'host' | 'device' (the host sends them unresized, about a fifth less
  # host work per image, twice the bytes) | 'auto' ('device' on
  # accelerators, 'host' on CPUs).
  c.input_resize = "auto"
  # Image files that cannot be read (truncated, empty, not an image, a
  # FIFO, a bomb): 'skip' them (each logged once, counted in TensorBoard
  # and summary.json; the run stops past max_bad_fraction of a split) or
  # stop with an 'error' naming the file. See docs/your_data.md.
  c.bad_examples = "skip"
  c.max_bad_fraction = 0.01

  # Loss: 'cross_entropy' (labels) or 'distillation' (frozen teacher).
  c.loss = "cross_entropy"
  c.teacher_model = "teacher_resnet34"
  c.teacher_kwargs = ml_collections.ConfigDict()
  c.teacher_checkpoint = ""    # converted with `ir2net-convert`

  # Optimisation.
  c.optimizer = "sgd"          # 'sgd' | 'adam'
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.weight_decay_rule = "all"  # 'all' | 'conv_or_4d' (the ImageNet rule)
  c.schedule_unit = "epoch"    # cosine stepped per 'epoch' (reference) or 'step'
  c.warmup_epochs = 0.0
  c.batch_size = 128           # global, over all devices and hosts
  c.num_epochs = 10
  c.num_train_steps = -1       # -1: num_epochs of the training split
  c.seed = 0
  # A step whose loss, gradient or new state is not finite stops the run
  # (train.DivergenceError). True: keep the state from before such a step
  # (params, BatchNorm statistics and optimizer state, so the schedule too)
  # and count it in train_skipped_steps / summary.json instead.
  c.skip_nonfinite_updates = False

  # Initialisation.
  c.stage1_checkpoint = ""     # stage 2: stage-1 workdir (default ../stage1)
  c.init_from = ""             # converted variables to start from (either
                               # stage; stage 2 then reads no stage 1)
  # Top-level modules (comma-separated, e.g. 'fc') that start from their
  # initialisation instead of init_from: a new classifier to fine-tune on
  # data with other classes.
  c.init_from_fresh = ""

  # Evaluation, logging, checkpoints.
  c.eval_every_epochs = 1
  c.eval_batch_size = -1       # -1: batch_size
  c.log_every_steps = 50
  # BNN diagnostics in TensorBoard (ir2net_jax.nn.diagnostics): per binary
  # layer the weight flip ratio, latent |w| > 1 and activations inside the
  # estimator's clipping range, and a histogram of the kept pixels per
  # image. Computed inside the step; False compiles the step without them.
  c.diagnostics = True
  c.checkpoint_every_steps = -1  # -1: once an epoch
  c.keep_checkpoints = 2
  # Pictures of information restriction at every evaluation (the first N
  # eval images; ir2net_jax.tools.visualize): workdir/restriction/*.png and the
  # TensorBoard image 'restriction'. 0: none.
  c.restriction_images = 8

  # Multi-host (otherwise read from the cluster environment, if any).
  c.coordinator_address = ""
  c.num_processes = 1
  c.process_id = 0
  return c


def smoke(c: ml_collections.ConfigDict, *, batch_size: int,
          num_train_steps: int, num_epochs: int = 1, **fields):
  """Shrinks recipe ``c`` to a seconds-long run (the ``:smoke`` argument)."""
  c.batch_size = batch_size
  c.num_train_steps = num_train_steps
  c.num_epochs = num_epochs
  c.update(fields)
  return c
