"""Throughput of the input pipelines alone, on the host's CPUs.

  python -m ir2net_jax.tools.benchmark.pipeline [--image_size=224] [--examples=512]

Two pipelines, each as the training loop reads it, in images/s:

* ``imagenet_train``: the ImageNet train augmentation (fused JPEG decode +
  RandomResizedCrop, lighting, flip, normalise;
  ``data.tf_data.recipes.imagenet_train``) mapped in parallel over 500x375
  JPEGs made here, repeated and batched.
* ``digits_train``: ``data.train_iterator`` of the digits recipe on a digits
  data set built in a temporary directory, after one epoch (which fills the
  cache).
* ``digits_device``: the on-device engine's batches of the same recipe
  (``data.device.on_device``), drawn by a jitted function on JAX's default
  device, as the train step draws them.

This is the only benchmark module that needs TensorFlow; ``python -m
ir2net_jax.tools.benchmark`` runs it after the train steps unless
``--skip_pipeline``.
"""

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from ir2net_jax import data
from ir2net_jax.data.tf_data import pipeline as data_pipeline, recipes
from ir2net_jax.tools.benchmark import report

__all__ = ["imagenet_pipeline_images_per_s", "digits_pipeline_images_per_s",
           "device_digits_images_per_s", "benchmark_pipelines", "main"]


def _synthetic_jpegs(count: int, height: int = 375, width: int = 500,
                     seed: int = 0) -> List[bytes]:
  """JPEGs of smooth random images with some noise (natural-ish sizes)."""
  rng = np.random.default_rng(seed)
  jpegs = []
  for _ in range(count):
    coarse = rng.uniform(0, 255, size=(1, height // 25, width // 25, 3))
    image = tf.image.resize(coarse, [height, width], method="bicubic")[0]
    image = image + rng.normal(0, 8, size=(height, width, 3))
    image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
    jpegs.append(tf.io.encode_jpeg(image, quality=90).numpy())
  return jpegs


def _examples_per_second(batches: Iterable[Any], batch_size: int,
                         examples: int, warmup_batches: int = 2) -> float:
  """Examples/s of an iterator of batches, after a few untimed batches."""
  iterator = iter(batches)
  for _ in range(warmup_batches):
    next(iterator)
  num_batches = max(1, -(-examples // batch_size))
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * batch_size / (time.perf_counter() - start)


def imagenet_pipeline_images_per_s(image_size: int = 224,
                                   examples: int = 512,
                                   batch_size: int = 32,
                                   num_jpegs: int = 64) -> float:
  """ImageNet train augmentation alone, examples/s on this host's CPUs.

  ``data.tf_data.recipes.imagenet_train`` mapped in parallel over ``num_jpegs``
  500x375 JPEGs, repeated, batched, as the training pipeline maps it.
  """

  def augment(index, jpeg):
    seed = tf.stack([tf.constant(0, tf.int64), index])
    return tf.cast(recipes.imagenet_train(jpeg, seed, image_size), tf.float32)

  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  ds = tf.data.Dataset.from_tensor_slices(_synthetic_jpegs(num_jpegs))
  ds = ds.repeat().enumerate().map(augment, num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  batches = ds.with_options(options).as_numpy_iterator()
  return _examples_per_second(batches, batch_size, examples)


def digits_pipeline_images_per_s(examples: int = 2048,
                                 batch_size: int = 64) -> float:
  """``data.train_iterator`` of the digits recipe, examples/s, after one
  epoch (which fills the cache); builds digits in a temporary directory."""
  from ir2net_jax.configs import digits  # pylint: disable=g-import-not-at-top
  data_dir = tempfile.mkdtemp(prefix="ir2net_bench_digits_")
  try:
    config = digits.get_config()
    config.data_dir = data_dir
    batches = data.train_iterator(config, global_batch_size=batch_size,
                                  seed=0, process_index=0, process_count=1)
    epoch = -(-data.dataset_info(config).num_train // batch_size)
    return _examples_per_second(batches, batch_size, examples,
                                warmup_batches=epoch)
  finally:
    shutil.rmtree(data_dir, ignore_errors=True)


def device_digits_images_per_s(examples: int = 2048,
                               batch_size: int = 64) -> float:
  """The on-device engine's digits batches, examples/s on JAX's default
  device (each waited for, as a step would use it)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ir2net_jax.configs import digits  # pylint: disable=g-import-not-at-top
  from ir2net_jax.train import parallel  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.batch_size = batch_size
  inputs = data.open_inputs(config, parallel.data_mesh(jax.devices()[:1]),
                            eval_batch_size=batch_size)
  draw = jax.jit(inputs.batch_fn())
  steps = iter(range(10**9))
  batches = (jax.block_until_ready(draw(inputs.arrays, next(steps)))
             for _ in iter(int, 1))
  return _examples_per_second(batches, batch_size, examples)


def benchmark_pipelines(image_size: int = 224, examples: int = 512
                        ) -> List[Dict[str, Any]]:
  """Every input pipeline; one dict per pipeline."""
  data_pipeline._hide_accelerators_from_tf()  # pylint: disable=protected-access
  imagenet = imagenet_pipeline_images_per_s(image_size, examples)
  with contextlib.redirect_stdout(sys.stderr):  # tfds prints as it builds.
    digits = digits_pipeline_images_per_s(max(examples, 64))
  on_device = device_digits_images_per_s(max(examples, 64))
  return [
      {"pipeline": "imagenet_train", "image_size": image_size,
       "images_per_s": imagenet},
      {"pipeline": "digits_train", "image_size": 32, "images_per_s": digits},
      {"pipeline": "digits_device", "image_size": 32,
       "images_per_s": on_device},
  ]


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  """Times both pipelines; prints one line (or JSON); returns the rows."""
  parser = argparse.ArgumentParser(
      prog="python -m ir2net_jax.tools.benchmark.pipeline",
      description=__doc__.split("\n\n")[0])
  parser.add_argument("--image_size", type=int, default=224,
                      help="ImageNet crop size")
  parser.add_argument("--examples", type=int, default=512,
                      help="examples timed per pipeline")
  parser.add_argument("--json", action="store_true",
                      help="print a JSON list instead of the line")
  args = parser.parse_args(argv)
  rows = benchmark_pipelines(args.image_size, args.examples)
  print(json.dumps(rows, indent=1) if args.json
        else report.format_pipelines(rows))
  return rows


if __name__ == "__main__":
  main()
