"""The ImageNet train augmentation per decoder and worker count, on the host.

  python -m ir2net_jax.tools.benchmark.decoders [--examples=512] [--workers=1,2]
      [--shorter_side=256]
  python -m ir2net_jax.tools.benchmark.decoders --write_folder=DIR
      [--classes=1000] [--train_per_class=10] [--eval_per_class=1]

For each decoder, the ImageNet train recipe (decode, RandomResizedCrop,
lighting, flip; uint8 out, normalisation left to the device) over JPEGs with
ImageNet's spread of sizes and qualities made here (:func:`imagenet_like_jpegs`),
in images/s with 1 and 2 workers, per core, and the cores it would take to
feed 5,300 img/s (IR2Net-A stage 2 in bfloat16 at batch 256 on one H200)
and 14,000 img/s (a float ResNet-18 on an H100-class GPU):

* ``tf.data``: ``data.tf_data.recipes.imagenet_train`` in tf.data,
  TensorFlow's fused decode-and-crop (the tf.data engine's; workers = its
  private threads; float32 out, as that engine makes it). Only where
  TensorFlow is installed.
* ``pil_full``, ``pil``, ``simplejpeg``:
  ``data.grain.host_recipes.imagenet_train`` with that decoder
  (``host_recipes``: Pillow at full size; Pillow at 1/2, 1/4 or 1/8 size
  where the crop window allows it; libjpeg-turbo through simplejpeg at any
  n/8 size), uint8 out; workers = processes.
* ``simplejpeg, device finish``: the host's share of the recipe when the
  lighting and the flip are left to the device
  (``host_recipes.imagenet_train_parts``, as the grain engine runs it with
  ``input_resize='host'``).
* ``simplejpeg, device resize``: the same with the resize left to the device
  too: windows on canvases (``input_resize='device'``).
* ``grain engine`` and ``grain engine, device resize``: the whole grain
  engine (``data.grain.grain_inputs``) with ``input_resize='host'`` and
  ``'device'`` on a ``folder:`` of the same JPEGs, batches of 16 out of its
  worker processes (workers = ``config.input_workers``): reading files, the
  recipe, batching and the transfer between processes.

``--shorter_side=N`` times the same JPEGs as ``ir2net-preresize`` stores
them with shorter sides of at most N pixels.

``--write_folder=DIR`` writes such JPEGs as an ImageNet-shaped ``folder:``
tree instead (``DIR/train/<class>/``, ``DIR/val/<class>/``), on every core,
for timing a whole run (``benchmark.loop``, ``scripts/gpu_input_check.sh``).
"""

import argparse
import concurrent.futures
import contextlib
import functools
import importlib.util
import io
import json
import multiprocessing
import os
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from ir2net_jax.data import engines
from ir2net_jax.data.grain import host_recipes

__all__ = ["imagenet_like_jpegs", "write_imagenet_like_folder",
           "benchmark_decoders", "main"]

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


_DEVICE_FINISH = "simplejpeg, device finish"
_DEVICE_RESIZE = "simplejpeg, device resize"
_GRAIN = "grain engine"
_GRAIN_DEVICE_RESIZE = "grain engine, device resize"


def _write_class(root: str, index: int, counts: Dict[str, int]) -> int:
  jpegs = imagenet_like_jpegs(sum(counts.values()), seed=index)
  for split, count in counts.items():
    directory = os.path.join(root, split, f"n{index:08d}")
    os.makedirs(directory, exist_ok=True)
    for i in range(count):
      with open(os.path.join(directory, f"{i:05d}.JPEG"), "wb") as f:
        f.write(jpegs.pop())
  return sum(counts.values())


def write_imagenet_like_folder(root: str, classes: int = 1000,
                               train_per_class: int = 10,
                               eval_per_class: int = 1,
                               workers: Optional[int] = None) -> int:
  """Writes :func:`imagenet_like_jpegs` as ``root/{train,val}/<class>/``,
  class ``c``'s images from seed ``c``; returns how many."""
  counts = {"train": train_per_class, "val": eval_per_class}
  with _pool(workers) as pool:
    return sum(pool.map(functools.partial(_write_class, root,
                                          counts=counts), range(classes)))


def _chunk(jpegs: Sequence[bytes], first: int, count: int, image_size: int,
           decoder: str) -> int:
  """Augments examples ``first .. first + count - 1`` (cycling over
  ``jpegs``); returns how many (the batch is built and dropped)."""
  canvas = (host_recipes.canvas_size(image_size)
            if decoder == _DEVICE_RESIZE else None)
  side = canvas or image_size
  batch = np.empty((count, side, side, 3), np.uint8)
  for i in range(count):
    rng = np.random.default_rng([0, first + i])
    jpeg = jpegs[(first + i) % len(jpegs)]
    if decoder in (_DEVICE_FINISH, _DEVICE_RESIZE):
      batch[i] = host_recipes.imagenet_train_parts(
          jpeg, rng, image_size, canvas=canvas)["image"]
    else:
      batch[i] = host_recipes.imagenet_train(jpeg, rng, image_size,
                                             decoder=decoder)
  return count


_WORKER_JPEGS: List[bytes] = []


def _init_worker(jpegs):
  _WORKER_JPEGS[:] = jpegs


def _worker_chunk(first, count, image_size, decoder):
  return _chunk(_WORKER_JPEGS, first, count, image_size, decoder)


def _pool(workers: Optional[int], jpegs: Sequence[bytes] = ()
          ) -> concurrent.futures.ProcessPoolExecutor:
  """Worker processes started fresh ('spawn'): forking a process that runs
  JAX's threads can deadlock."""
  return concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_worker, initargs=(list(jpegs),))


def _host_images_per_s(pool, workers: int, examples: int, image_size: int,
                       decoder: str, chunk: int = 16) -> float:
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
  from ir2net_jax.data.tf_data import recipes  # pylint: disable=g-import-not-at-top
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


def _grain_images_per_s(folder: str, workers: int, examples: int,
                        image_size: int, resize: str,
                        batch: int = 16) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  from ir2net_jax.configs import default  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data.grain import grain_inputs  # pylint: disable=g-import-not-at-top
  from ir2net_jax.train import parallel  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.update(dict(dataset=f"folder:{folder}", augment="imagenet",
                     image_size=image_size, batch_size=batch,
                     input_engine="grain", input_workers=workers, flip=True,
                     input_resize=resize))
  inputs = grain_inputs.GrainInputs(
      config, parallel.data_mesh(jax.devices()[:1]), batch)
  batches = inputs.host_train_batches(0)
  for _ in range(2 * max(1, workers)):   # start-up, untimed
    next(batches)
  steps = -(-examples // batch)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  rate = steps * batch / (time.perf_counter() - start)
  del batches
  return rate


def _preresized(jpegs: Sequence[bytes], shorter_side: int) -> List[bytes]:
  """``jpegs`` through ``ir2net-preresize`` (``tools.preresize``)."""
  from ir2net_jax.tools import preresize  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    source = _write_folder(jpegs, os.path.join(tmp, "in"))
    target = os.path.join(tmp, "out")
    preresize.preresize_tree(source, target, shorter_side, workers=0)
    out = []
    for i in range(len(jpegs)):
      with open(os.path.join(target, "train", "c", f"{i:05d}.jpg"), "rb") as f:
        out.append(f.read())
  return out


def _write_folder(jpegs: Sequence[bytes], root: str) -> str:
  for split, names in (("train", range(len(jpegs))), ("test", range(2))):
    os.makedirs(os.path.join(root, split, "c"))
    for i in names:
      with open(os.path.join(root, split, "c", f"{i:05d}.jpg"), "wb") as f:
        f.write(jpegs[i])
  return root


def benchmark_decoders(examples: int = 512, workers: Sequence[int] = (1, 2),
                       image_size: int = 224, num_jpegs: int = 128,
                       shorter_side: Optional[int] = None
                       ) -> List[Dict[str, Any]]:
  """One row per decoder: img/s per worker count, per core, cores needed;
  with ``shorter_side``, on the JPEGs as ``ir2net-preresize`` writes them
  with that shorter side."""
  jpegs = imagenet_like_jpegs(num_jpegs)
  if shorter_side:
    jpegs = _preresized(jpegs, shorter_side)
  decoders = ["pil_full", "pil"]
  if importlib.util.find_spec("simplejpeg") is not None:
    decoders += ["simplejpeg", _DEVICE_FINISH, _DEVICE_RESIZE]
  if importlib.util.find_spec("grain") is not None:
    decoders += [_GRAIN, _GRAIN_DEVICE_RESIZE]
  if engines.tensorflow_installed():
    decoders.insert(0, "tf.data")
  rows = []
  with contextlib.ExitStack() as stack:
    tmp = stack.enter_context(tempfile.TemporaryDirectory())
    folder = _write_folder(jpegs, os.path.join(tmp, "jpegs"))
    pools = {n: stack.enter_context(_pool(n, jpegs)) for n in workers}
    for decoder in decoders:
      rows.append(_row(decoder, jpegs, folder, pools, examples, image_size))
  return rows


def _row(decoder, jpegs, folder, pools, examples, image_size):
  """One decoder's row (see :func:`benchmark_decoders`)."""
  row: Dict[str, Any] = {"decoder": decoder, "image_size": image_size}
  workers = list(pools)
  for n in workers:
    if decoder == "tf.data":
      rate = _tf_images_per_s(jpegs, n, examples, image_size)
    elif decoder in (_GRAIN, _GRAIN_DEVICE_RESIZE):
      rate = _grain_images_per_s(
          folder, n, examples, image_size,
          "device" if decoder == _GRAIN_DEVICE_RESIZE else "host")
    else:
      rate = _host_images_per_s(pools[n], n, examples, image_size, decoder)
    row[f"images_per_s_{n}_workers"] = rate
  per_core = max(row[f"images_per_s_{n}_workers"] / n for n in workers)
  row["images_per_s_per_core"] = per_core
  for name, target in TARGETS.items():
    row[f"cores_for_{name}"] = target / per_core
  return row


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
  parser.add_argument("--shorter_side", type=int, default=0,
                      help="time JPEGs stored with this shorter side "
                           "(ir2net-preresize) instead")
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--write_folder", default="",
                      help="write an ImageNet-shaped folder here instead")
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--train_per_class", type=int, default=10)
  parser.add_argument("--eval_per_class", type=int, default=1)
  args = parser.parse_args(argv)
  if args.write_folder:
    start = time.perf_counter()
    count = write_imagenet_like_folder(args.write_folder, args.classes,
                                       args.train_per_class,
                                       args.eval_per_class)
    print(f"wrote {count} JPEGs to {args.write_folder} in "
          f"{time.perf_counter() - start:.0f} s")
    return []
  workers = [int(w) for w in args.workers.split(",") if w.strip()]
  rows = benchmark_decoders(args.examples, workers, args.image_size,
                            shorter_side=args.shorter_side or None)
  print(json.dumps(rows, indent=1) if args.json
        else format_rows(rows, workers))
  return rows


if __name__ == "__main__":
  main()
