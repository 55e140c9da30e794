"""Small models, configs, data and launcher runs for the training tests."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds

from ir2net_jax import models
from ir2net_jax.train import step as step_lib
from ir2net_jax.configs import digits as digits_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_digits_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """``configs/digits.py:smoke``: a 1-block ResNet-20, a few steps."""
  c = digits_config.get_config("smoke")
  c.data_dir = data_dir
  c.update(overrides)
  return c


# The tests of the loop's machinery (processes, preemption, storage, input
# engines, runs without TensorFlow) train a lighter network than the smoke
# recipe: one residual block in all, information restriction on, recovery
# (CIRec) off. The method is the business of test_parity, test_claims and
# test_train. On a 2-core AMD EPYC, without a compilation cache, a smoke
# launch took 37-45 CPU-s and a light one 17, most of it compiling the
# train step; an IR2Net-A stage 1 of one block 16 against 28 for (1,1,1,1).
LIGHT_BLOCKS = {"cifar_resnet20": (1, 0, 0), "ir2net_a": (1, 0, 0, 0)}
# ``launch.py``'s overrides for the light digits run.
LIGHT = ("--config.model_kwargs.num_blocks="
         + str(LIGHT_BLOCKS["cifar_resnet20"]).replace(" ", ""),
         "--config.information_recovery=False")


def light_config(config: ml_collections.ConfigDict
                 ) -> ml_collections.ConfigDict:
  """``config`` (its model one of ``LIGHT_BLOCKS``) made light, in place."""
  config.model_kwargs.num_blocks = LIGHT_BLOCKS[config.model]
  config.information_recovery = False
  return config


def light_digits_config(data_dir: str, **overrides
                        ) -> ml_collections.ConfigDict:
  """``tiny_digits_config(data_dir, **overrides)`` made light (its model,
  after ``overrides``, one of ``LIGHT_BLOCKS``)."""
  return light_config(tiny_digits_config(data_dir, **overrides))


def mock_data_dir(path: str) -> str:
  """A data_dir with cifar10's and imagenet2012's metadata, for mock_data."""
  for name in ("cifar10", "imagenet2012"):
    builder = tfds.builder(name, data_dir=path)
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
  return path


def random_batch(seed: int, batch: int, size: int = 32, classes: int = 10):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, classes, batch).astype(np.int32)}


def launch(workdir, *overrides, devices: int = 1,
           config: str = "configs/digits.py:smoke", cwd: str = ROOT,
           **popen_kwargs):
  """Starts ``launch.py`` on ``devices`` fake CPU devices, output piped;
  from ``cwd``, which is also its TMPDIR where it is not the checkout (a
  host that shares no local path with another)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if cwd != ROOT:
    env["TMPDIR"] = str(cwd)
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "launch.py"),
       f"--config={os.path.join(ROOT, config)}", f"--workdir={workdir}",
       *overrides], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      env=env, **popen_kwargs)


def final_state(workdir):
  """``(step, {path: array})`` of the latest checkpoint's params, BatchNorm
  statistics and optimizer state in ``workdir``, restored on this process's
  first device whatever devices and processes saved it."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    step = m.latest_step()
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.metadata(path).item_metadata.tree
    state = ckptr.restore(path, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        saved))
  leaves = jax.tree_util.tree_flatten_with_path(
      {"params": state["params"], "batch_stats": state["batch_stats"],
       "opt_state": state["opt_state"]})[0]
  return step, {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def flat_variables(variables):
  """``{path: array}`` of ``{'params', 'batch_stats'}``, keyed as
  ``final_state`` keys them."""
  leaves = jax.tree_util.tree_flatten_with_path(
      {"params": variables["params"],
       "batch_stats": variables["batch_stats"]})[0]
  return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def truncate_files(directory) -> None:
  """Cuts every file under ``directory`` to half its size: a checkpoint that
  no number of reads can decode."""
  for d, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(d, f)
      os.truncate(path, os.path.getsize(path) // 2)


def tiny_state(value: float):
  """A run's state in miniature, every parameter ``value``: what
  ``checkpoints.Checkpoints`` saves and restores, without a model."""
  return {"step": jnp.int32(value),
          "params": {"w": jnp.full((3,), value, jnp.float32)},
          "batch_stats": {"mean": jnp.zeros((2,), jnp.float32)}}


def tiny_run(workdir, steps=(2, 4, 6), best_at=()):
  """Saves ``tiny_state(step)`` at each of ``steps`` in ``workdir`` as the
  train loop does: ``meta['best']`` is the best so far, and the steps in
  ``best_at`` are new bests (top-1 ``step / 10``), saved in ``best/`` too.
  Returns ``workdir``."""
  from ir2net_jax.io import checkpoints  # pylint: disable=g-import-not-at-top
  best = {"eval_top1": -1.0, "eval_top5": -1.0}   # train.py's before any eval
  ckpts = checkpoints.Checkpoints(str(workdir))
  for step in steps:
    if step in best_at:
      best = {"eval_top1": step / 10, "eval_top5": 1.0, "step": step}
    ckpts.save(step, tiny_state(step), {"best": best}, best=step in best_at)
  ckpts.wait()
  ckpts.close()
  return workdir


def stage1_run(workdir, model, image_size: int, seed: int, step: int = 5,
               name: str = "ir2net_a"):
  """Saves a stage-1 run of ``model`` (``name``) at ``step`` in ``workdir``
  as the train loop saves one, from ``models.init_variables(model,
  image_size, seed)``: what a stage 2 starts from, without training it."""
  import optax  # pylint: disable=g-import-not-at-top
  from ir2net_jax.io import checkpoints  # pylint: disable=g-import-not-at-top
  variables = jax.device_get(models.init_variables(model, image_size, seed))
  ckpts = checkpoints.Checkpoints(str(workdir))
  ckpts.save(step, step_lib.create_train_state(variables, optax.sgd(0.1)),
             {"model": name, "stage": 1, "name": "stage 1"})
  ckpts.wait()
  ckpts.close()


def free_port() -> int:
  """A free TCP port on the loopback interface, for a local coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def float64_variables(model, image_size: int = 32, seed: int = 0):
  """``models.init_variables`` in float64 (call under ``jax.enable_x64``).

  Tests that compare two programs of the same training step (other devices,
  a hand-written step) run in float64: in float32 their different rounding
  could flip a binary activation that sits near zero (see sign_margins.py).
  """
  return jax.tree.map(lambda a: np.asarray(a, np.float64),
                      models.init_variables(model, image_size, seed))


def float64_batch(batch):
  """``batch`` with float64 images (call under ``jax.enable_x64``)."""
  return dict(batch, image=np.asarray(batch["image"], np.float64))


def float64_steps(config, devices, batches):
  """The sharded train step of ``config``'s model in float64 on ``devices``,
  from the seed-0 state, once per batch of ``batches``.

  Returns:
    ``({'params', 'batch_stats'}, metrics of the last step)``, on the host.
  """
  from ir2net_jax.train import optim, parallel  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    model = step_lib.build_model(config, 10, parallel.AXIS)
    variables = float64_variables(model)
    tx = optim.create_optimizer(config, variables["params"], model, 10)
    mesh = parallel.data_mesh(devices)
    state = parallel.replicate(step_lib.create_train_state(variables, tx), mesh)
    step = step_lib.sharded_train_step(model, tx, config, mesh)
    for batch in batches:
      state, metrics = step(state, jax.device_put(
          float64_batch(batch), parallel.batch_sharding(mesh)), {})
    assert jax.tree.leaves(state.params)[0].dtype == np.float64
    return jax.device_get(({"params": state.params,
                            "batch_stats": state.batch_stats}, metrics))


def preempt_after_step(procs, step: int = 1):
  """Sends SIGTERM to process 1 once process 0 logged the progress line of
  ``step`` (or a later one), and waits for both. Returns their logs; each
  must have exited 128 + SIGTERM."""
  logs, stepping = [[], []], threading.Event()

  def read(i):
    for line in procs[i].stdout:
      logs[i].append(line.decode() if isinstance(line, bytes) else line)
      logged = re.search(r"step (\d+)/\d+: loss ", logs[i][-1])
      if i == 0 and logged and int(logged.group(1)) >= step:
        stepping.set()
  readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
  for r in readers:
    r.start()
  try:
    assert stepping.wait(timeout=300), "".join(logs[0])[-3000:]
    procs[1].send_signal(signal.SIGTERM)   # process 0 hears it from JAX
    for p, r in zip(procs, readers):
      p.wait(timeout=300)
      r.join()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outs = ["".join(log) for log in logs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 128 + signal.SIGTERM, (
        f"process {i} exited {p.returncode}:\n{out[-3000:]}")
  return outs


# Imported first in every process of the run (sitecustomize): TensorFlow and
# tensorflow_datasets are then absent as on a GPU image (``find_spec`` finds
# nothing, an import raises ModuleNotFoundError), not broken.
_NO_TENSORFLOW = r"""
from importlib.machinery import PathFinder

_find_spec = PathFinder.find_spec.__func__


def _without_tensorflow(cls, name, path=None, target=None):
  if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
    return None
  return _find_spec(cls, name, path, target)


PathFinder.find_spec = classmethod(_without_tensorflow)
"""


def site_without_tensorflow(directory) -> str:
  """``directory`` made to hold a ``sitecustomize`` that hides TensorFlow;
  put it first on a process's PYTHONPATH."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
    f.write(_NO_TENSORFLOW)
  return str(directory)
