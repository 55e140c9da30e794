"""The ImageNet train augmentation per decoder and worker count, on the host.

  python -m ir2net_jax.tools.benchmark.decoders [--examples=512] [--workers=1,2]

For each decoder, the ImageNet train recipe (decode, RandomResizedCrop,
lighting, flip; uint8 out, normalisation left to the device) over JPEGs with
ImageNet's spread of sizes and qualities made here (:func:`imagenet_like_jpegs`),
in images/s with 1 and 2 workers, per core, and the cores it would take to
feed 5,300 img/s (IR2Net-A stage 2 in bfloat16 at batch 256 on one H200)
and 14,000 img/s (a float ResNet-18 on an H100-class GPU):

* ``tf.data``: ``data.recipes.imagenet_train`` in tf.data, TensorFlow's fused
  decode-and-crop (the tf.data engine's; workers = its private threads;
  float32 out, as that engine makes it). Only where TensorFlow is installed.
* ``pil_full``, ``pil``, ``simplejpeg``: ``data.host_recipes.imagenet_train``
  with that decoder (``host_recipes``: Pillow at full size; Pillow at 1/2,
  1/4 or 1/8 size where the crop window allows it; libjpeg-turbo through
  simplejpeg at any n/8 size), uint8 out; workers = processes.
"""

import argparse
import concurrent.futures
import functools
import importlib.util
import io
import json
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from ir2net_jax.data import engines, host_recipes

__all__ = ["imagenet_like_jpegs", "benchmark_decoders", "main"]

# img/s a host must feed one GPU (module docstring).
TARGETS = {"ir2net_a_stage2": 5_300, "float_resnet18": 14_000}

# (height, width, share): ImageNet's train images are mostly 500 pixels on
# the longer side; some are small, a tail is large.
_SIZES = ((375, 500, 0.35), (500, 375, 0.15), (333, 500, 0.2),
          (250, 300, 0.15), (768, 1024, 0.1), (1500, 2000, 0.05))
_QUALITIES = (75, 85, 90, 95)


def imagenet_like_jpegs(count: int, seed: int = 0) -> List[bytes]:
  """``count`` JPEGs of smooth random images with noise, sizes drawn from
  ImageNet's spread (:data:`_SIZES`), qualities 75-95."""
  rng = np.random.default_rng(seed)
  shares = np.array([s for _, _, s in _SIZES])
  jpegs = []
  for _ in range(count):
    h, w, _ = _SIZES[rng.choice(len(_SIZES), p=shares / shares.sum())]
    coarse = rng.uniform(0, 255, (max(2, h // 25), max(2, w // 25), 3))
    image = Image.fromarray(coarse.astype(np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC)
    noisy = np.asarray(image, np.float32) + rng.normal(0, 8, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=int(rng.choice(_QUALITIES)))
    jpegs.append(buf.getvalue())
  return jpegs


def _chunk(jpegs: Sequence[bytes], first: int, count: int, image_size: int,
           decoder: str) -> int:
  """Augments examples ``first .. first + count - 1`` (cycling over
  ``jpegs``); returns how many (the batch is built and dropped)."""
  batch = np.empty((count, image_size, image_size, 3), np.uint8)
  for i in range(count):
    rng = np.random.default_rng([0, first + i])
    batch[i] = host_recipes.imagenet_train(
        jpegs[(first + i) % len(jpegs)], rng, image_size, decoder=decoder)
  return count


_WORKER_JPEGS: List[bytes] = []


def _init_worker(jpegs):
  _WORKER_JPEGS[:] = jpegs


def _worker_chunk(first, count, image_size, decoder):
  return _chunk(_WORKER_JPEGS, first, count, image_size, decoder)


def _host_images_per_s(jpegs, workers: int, examples: int, image_size: int,
                       decoder: str, chunk: int = 16) -> float:
  with concurrent.futures.ProcessPoolExecutor(
      workers, initializer=_init_worker, initargs=(jpegs,)) as pool:
    run = functools.partial(_worker_chunk, image_size=image_size,
                            decoder=decoder)
    list(pool.map(run, range(0, workers * chunk, chunk),
                  [chunk] * workers))   # start-up, untimed
    start = time.perf_counter()
    starts = range(0, examples, chunk)
    done = sum(pool.map(run, starts, [chunk] * len(starts)))
    return done / (time.perf_counter() - start)


def _tf_images_per_s(jpegs, workers: int, examples: int,
                     image_size: int) -> float:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data import recipes  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")

  def augment(index, jpeg):
    seed = tf.stack([tf.constant(0, tf.int64), index])
    return recipes.imagenet_train(jpeg, seed, image_size)

  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  options.threading.private_threadpool_size = workers
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
  ds = ds.map(augment, num_parallel_calls=workers, deterministic=True)
  batches = ds.batch(16).prefetch(2).with_options(options).as_numpy_iterator()
  for _ in range(2):
    next(batches)
  start = time.perf_counter()
  for _ in range(-(-examples // 16)):
    next(batches)
  return -(-examples // 16) * 16 / (time.perf_counter() - start)


def benchmark_decoders(examples: int = 512, workers: Sequence[int] = (1, 2),
                       image_size: int = 224, num_jpegs: int = 128
                       ) -> List[Dict[str, Any]]:
  """One row per decoder: img/s per worker count, per core, cores needed."""
  jpegs = imagenet_like_jpegs(num_jpegs)
  decoders = ["pil_full", "pil"]
  if importlib.util.find_spec("simplejpeg") is not None:
    decoders.append("simplejpeg")
  if engines.tensorflow_installed():
    decoders.insert(0, "tf.data")
  rows = []
  for decoder in decoders:
    row: Dict[str, Any] = {"decoder": decoder, "image_size": image_size}
    for n in workers:
      if decoder == "tf.data":
        rate = _tf_images_per_s(jpegs, n, examples, image_size)
      else:
        rate = _host_images_per_s(jpegs, n, examples, image_size, decoder)
      row[f"images_per_s_{n}_workers"] = rate
    per_core = max(row[f"images_per_s_{n}_workers"] / n for n in workers)
    row["images_per_s_per_core"] = per_core
    for name, target in TARGETS.items():
      row[f"cores_for_{name}"] = target / per_core
    rows.append(row)
  return rows


def format_rows(rows: Sequence[Dict[str, Any]],
                workers: Sequence[int]) -> str:
  """The rows as a Markdown table."""
  head = (["decoder"] + [f"img/s, {n} worker{'s' * (n > 1)}" for n in workers]
          + ["img/s per core"] + [f"cores for {t:,} img/s"
                                  for t in TARGETS.values()])
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in rows:
    cells = ([r["decoder"]] +
             [f"{r[f'images_per_s_{n}_workers']:.0f}" for n in workers] +
             [f"{r['images_per_s_per_core']:.0f}"] +
             [f"{r[f'cores_for_{name}']:.1f}" for name in TARGETS])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  """Times every decoder; prints a table (or JSON); returns the rows."""
  parser = argparse.ArgumentParser(
      prog="python -m ir2net_jax.tools.benchmark.decoders",
      description=__doc__.split("\n\n")[0])
  parser.add_argument("--examples", type=int, default=512,
                      help="examples timed per decoder and worker count")
  parser.add_argument("--workers", default="1,2",
                      help="comma-separated worker counts")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  workers = [int(w) for w in args.workers.split(",") if w.strip()]
  rows = benchmark_decoders(args.examples, workers, args.image_size)
  print(json.dumps(rows, indent=1) if args.json
        else format_rows(rows, workers))
  return rows


if __name__ == "__main__":
  main()
