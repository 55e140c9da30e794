"""Throughput of the training step, read against the hardware.

  python -m ir2net_jax.tools.benchmark                        # every recipe, table
  python -m ir2net_jax.tools.benchmark --recipes=ir2net_a_stage2,float_resnet18 \
      --per_device_batch=256 --config.dtype=bfloat16 --skip_pipeline
  python -m ir2net_jax.tools.benchmark --recipes=ir2net_a_stage2 --remat --json
  python -m ir2net_jax.tools.benchmark --from_json=a.json,b.json   # one table
  python -m ir2net_jax.tools.benchmark --recipes=cifar_resnet20 --profile=/tmp/prof

For each recipe this compiles and times the very step ``train_and_evaluate``
runs: ``train.step.make_train_step`` under ``parallel.shard_step`` on a
``('data',)`` mesh of every local device (both information-restriction
passes, the loss, the backward pass, the optimizer update, the donated
state; for the IR2Net ImageNet recipes also the ResNet-34 teacher's forward,
with randomly initialised weights so that no checkpoint is needed), on a
synthetic batch that stays on the devices. Nothing is read from disk, no
workdir is written, and neither TensorFlow nor the input pipeline is
imported unless the input pipeline is timed too (``benchmark.pipeline``;
``--skip_pipeline`` leaves it out).

Recipes (``--recipes``, comma-separated; default all; ``recipes.RECIPES``):
``cifar_resnet20``, ``cifar_vgg_small``, ``cifar_resnet18``
(``configs/cifar10_*.py``, batch 128), ``ir2net_{a,d}_stage{1,2}``
(``configs/imagenet.py:a,stage=1`` etc., batch 16, 224x224, with the
teacher), and the float baselines on the same ImageNet config, trained alone
with plain cross-entropy and one pass: ``float_resnet18`` (the real-valued
ResNet-18) and ``float_resnet34`` (the teacher's network).

Options: ``--per_device_batch`` (or the global ``--batch_size``) and
``--image_size`` replace the recipes' benchmark sizes; ``--config.FIELD=VALUE``
(ml_collections' config flags, repeatable; dotted names reach
``model_kwargs`` / ``teacher_kwargs``, tuples as ``'(1,1,1)'``) overrides a
field of every recipe's config, e.g. ``--config.dtype=bfloat16`` or
``--config.binary_compute_dtype=``; ``--remat`` is ``--config.remat=true``
(rematerialise each residual block). ``--xla_cpu_flags`` is
``config.xla_cpu_flags`` (``ir2net_jax.backend.xla_cpu``), applied before JAX
starts; recipes that want other flags run in their own processes. ``--tiny``
(tests) keeps one block per stage and 32x32 ImageNet images.
``--profile=DIR`` writes a ``jax.profiler`` trace of ``--profile_steps``
extra steps per recipe to ``DIR/RECIPE`` (``tensorboard --logdir=DIR``,
Profile tab). ``--json`` prints one JSON document (environment, rows,
pipelines) instead of the table; ``--from_json`` prints the table (or the
merged JSON) of earlier ``--json`` outputs, e.g. one per process.

Columns:

* ``compile s``: ``.lower(...).compile()`` of the train step (tracing
  included).
* ``step s``: median wall time of ``--steps`` steps after ``--warmup``
  warm-up steps, each ended with ``block_until_ready`` on the new state.
* ``img/s``: global batch / median step time.
* ``/R18``: img/s over that of the ``float_resnet18`` row with the same
  dtype, image size and remat. An IR2Net-A step costs about
  2 x 3 x 1.81 + 3.6 = 14.5 GMAC per image against 5.4 for a float ResNet-18
  step, so 0.33 is the goal for IR2Net-A on any device.
* ``infer img/s``: ``model.apply(..., train=False)`` jitted, same batch.
* ``TFLOP/s`` and ``MFU %``: model FLOPs of a train step (below) / step time,
  and that as a fraction of the devices' dense peak for the config's dtype
  (``hardware.PEAK_FLOPS``: bfloat16 tensor cores, or float32 at JAX's
  default precision, TF32 on NVIDIA GPUs; '-' where the device is not
  listed, e.g. CPUs).
* ``peak MB``: the first local device's ``peak_bytes_in_use`` (GPU, TPU) or,
  where devices keep no statistics (CPU), the process's peak RSS; both are
  high-water marks of the whole process, so they only grow from one recipe
  to the next (run one recipe per process for each one's own peak, as
  ``scripts/gpu_benchmark.sh`` does).
* ``xla MB``: XLA's memory plan of the compiled step for one device
  (arguments + outputs + temporaries - donated aliases; the JSON has each).

Model FLOPs of one train step, per global batch of B images. ``costs``
counts forward multiply-accumulates (MACs) per example: BOPs (binary
convolutions) and FLOPs (real convolutions and linear layers). Binary
convolutions run as ordinary convolutions of +-1 values here, so both count
as MACs alike, at 2 FLOPs each. Training costs about 3 forward passes
(forward, gradient w.r.t. inputs, gradient w.r.t. weights), and IR2Net
trains on two passes (clean and erased batch); the frozen teacher runs one
forward pass::

  student_macs = bops + flops                 (student, per example)
  teacher_macs = bops + flops                 (teacher, per example; 0 if none)
  flops/step   = B * (2 * 3 * passes * student_macs + 2 * teacher_macs)
  MFU          = flops/step / step_s / (peak FLOP/s per device * devices)

with ``passes = 2`` (1 with ``information_restriction=False``, as for the
float baselines). BatchNorm, activations, pooling, the attention mask and
the optimizer are not counted.

Modules: ``recipes`` (the recipes and their configs), ``step`` (compiling
and timing one recipe), ``hardware`` (peak FLOP/s, MFU, memory), ``report``
(the table), ``cli`` (the command line), ``pipeline`` (the input pipeline,
the only one that needs TensorFlow).
"""

from ir2net_jax.tools.benchmark.cli import main
from ir2net_jax.tools.benchmark.recipes import (BASELINE, RECIPES, Recipe,
                                                UsageError, apply_overrides,
                                                recipe_config)
from ir2net_jax.tools.benchmark.report import (add_baseline_ratios,
                                               format_table, format_pipelines)
from ir2net_jax.tools.benchmark.step import benchmark_recipe, train_step_flops

__all__ = ["main", "BASELINE", "RECIPES", "Recipe", "UsageError",
           "apply_overrides", "recipe_config", "add_baseline_ratios",
           "format_table", "format_pipelines", "benchmark_recipe",
           "train_step_flops"]
