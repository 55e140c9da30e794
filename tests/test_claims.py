"""What the README, the docs and the configs claim: the best checkpoint,
``init_from`` (from a ``.pth`` converted without torch), an eval that counts
every example once, per-device BatchNorm, the no-restriction ablation and the
warm-up."""

import glob
import math
import os
import pickle
import subprocess
import sys
import zipfile

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

import train_utils
from ir2net_jax.train import loop, optim, step as step_lib
from ir2net_jax.io import pth, torch_layout
from ir2net_jax import data, models
from ir2net_jax.nn import losses, objective

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import make_pth_fixture  # noqa: E402

NUM_EVAL = 360  # digits' test split


def _scalars(workdir, tag):
  """``{step: value}`` of a scalar the run wrote to its TensorBoard files."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = float(tf.make_ndarray(v.tensor))
  return out


def _restore(directory):
  """``(step, variables, meta)`` of the latest checkpoint in ``directory``."""
  with ocp.CheckpointManager(directory) as m:
    step = m.latest_step()
    r = m.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return step, {"params": r.state["params"],
                "batch_stats": r.state["batch_stats"]}, r.meta


def _top1_on_one_device(config, variables):
  """Top-1 over the whole eval split as one unpadded batch on one device."""
  batch = next(data.eval_iterator(config, global_batch_size=NUM_EVAL,
                                  process_index=0, process_count=1))
  assert batch["mask"].all()
  model = step_lib.build_model(config, 10)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, batch["image"])
  return float(np.mean(np.argmax(logits, -1) == batch["label"]))


@pytest.mark.slow
def test_best_checkpoint_and_eval_count(tmp_path, digits_dir):
  """Three evals on 8 devices with an eval batch that does not divide 360:
  each counts 360 examples; workdir/best holds the best one's state."""
  config = train_utils.tiny_digits_config(
      digits_dir, train_split="train[:64]", num_train_steps=12, num_epochs=3,
      eval_batch_size=48, checkpoint_every_steps=4, log_every_steps=4)
  assert jax.device_count() == 8 and NUM_EVAL % config.eval_batch_size
  workdir = str(tmp_path / "run")
  summary = loop.train_and_evaluate(config, workdir)

  assert _scalars(workdir, "eval_count") == {4: NUM_EVAL, 8: NUM_EVAL,
                                             12: NUM_EVAL}
  top1 = _scalars(workdir, "eval_top1")
  best_step = max(top1, key=lambda s: (top1[s], -s))  # the first best
  assert summary["best_eval_top1"] == pytest.approx(top1[best_step])
  assert summary["final_eval_top1"] == pytest.approx(top1[12])

  step, best_vars, meta = _restore(os.path.join(workdir, "best"))
  assert step == best_step and meta["best"]["step"] == best_step
  # Padded, 8-device eval = a plain pass over the split (one example may flip
  # on a float near-tie between the two kernels).
  tie = 1 / NUM_EVAL + 1e-9
  assert abs(_top1_on_one_device(config, best_vars)
             - summary["best_eval_top1"]) <= tie
  _, final_vars, _ = _restore(os.path.join(workdir, "checkpoints"))
  assert abs(_top1_on_one_device(config, final_vars)
             - summary["final_eval_top1"]) <= tie


def _fixture_model():
  return models.create_model(make_pth_fixture.MODEL,
                             num_blocks=make_pth_fixture.NUM_BLOCKS)


def test_pth_is_read_without_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  loaded = torch_layout.load_state_dict(make_pth_fixture.PATH)
  expected = make_pth_fixture.expected_state_dict()
  assert set(loaded) == {"module." + k for k in expected} | {
      "module.bn1.num_batches_tracked"}
  for k, v in expected.items():
    assert loaded["module." + k].dtype == np.float32
    np.testing.assert_array_equal(loaded["module." + k], v, err_msg=k)
  assert loaded["module.bn1.num_batches_tracked"] == 7
  got = torch_layout.torch_to_flax(loaded, _fixture_model(), 32)
  want = torch_layout.torch_to_flax(expected, _fixture_model(), 32)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_pth_reader_refuses_anything_but_tensors(tmp_path):
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"x": os.getcwd}))
  with pytest.raises(pth.ConversionError, match="posix.getcwd is not allowed"):
    pth.read_torch_zip(str(path))
  (tmp_path / "legacy.pth").write_bytes(pickle.dumps({}))
  with pytest.raises(pth.ConversionError, match="not in torch's zip format"):
    pth.read_torch_zip(str(tmp_path / "legacy.pth"))


@pytest.mark.slow
def test_init_from_a_converted_pth(tmp_path, digits_dir):
  """``python -m ir2net_jax.tools.convert`` on the .pth, then ``init_from``: with a
  vanishing learning rate the first step's parameters are the file's."""
  out = tmp_path / "converted"
  subprocess.run(
      [sys.executable, "-m", "ir2net_jax.tools.convert",
       f"--model={make_pth_fixture.MODEL}", "--num_blocks=1,1,1",
       f"--input={make_pth_fixture.PATH}", f"--output={out}"],
      check=True, cwd=train_utils.ROOT, capture_output=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  config = train_utils.tiny_digits_config(
      digits_dir, init_from=str(out), num_train_steps=1, learning_rate=1e-30,
      weight_decay=0.0, log_every_steps=1)
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(config, workdir)
  step, variables, _ = _restore(os.path.join(workdir, "checkpoints"))
  assert step == 1
  want = torch_layout.torch_to_flax(make_pth_fixture.expected_state_dict(),
                               _fixture_model(), 32)["params"]
  got = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  want = flax.traverse_util.flatten_dict(want, sep="/")
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-9, err_msg=k)


def _one_step(config, devices, batch):
  """One sharded float64 train step from the seed-0 state."""
  return train_utils.float64_steps(config, devices, [batch])[0]


def _by_hand(config, halves, **objective_kwargs):
  """The same step computed per batch slice: per-slice gradients and
  BatchNorm statistics, both averaged (what each device would do alone)."""
  model = step_lib.build_model(config, 10)  # no cross-device BatchNorm
  variables = train_utils.float64_variables(model)
  halves = [train_utils.float64_batch(h) for h in halves]
  tx = optim.create_optimizer(config, variables["params"], model, 10)

  def loss(params, half):
    return objective.two_pass_objective(
        params, variables["batch_stats"], model, half["image"], half["label"],
        losses.cross_entropy, config.erase_lambda, **objective_kwargs)

  grads, stats = [], []
  loss_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  for half in halves:
    (_, aux), g = loss_and_grad(variables["params"], half)
    grads.append(g)
    stats.append(aux.batch_stats)
  mean = lambda trees: jax.tree.map(lambda *x: np.mean(x, axis=0), *trees)
  updates, _ = tx.update(mean(grads), tx.init(variables["params"]),
                         variables["params"])
  return jax.device_get({"params": optax.apply_updates(variables["params"],
                                                       updates),
                         "batch_stats": mean(stats)})


def _assert_close(a, b, tol=1e-10):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol,
                                                       atol=tol), a, b)


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.mark.slow
@jax.enable_x64(True)
def test_sync_batch_stats_false_is_per_device_batchnorm():
  # The light network (train_utils.LIGHT): the claim holds for any network.
  config = train_utils.light_digits_config(None, sync_batch_stats=False)
  batch = train_utils.random_batch(0, 8)
  halves = [{k: v[:4] for k, v in batch.items()},
            {k: v[4:] for k, v in batch.items()}]
  got = _one_step(config, jax.devices()[:2], batch)
  _assert_close(got, _by_hand(config, halves))
  # Not what synchronised statistics give.
  synced = _one_step(train_utils.light_digits_config(None),
                     jax.devices()[:2], batch)
  assert _max_diff(got, synced) > 1e-3


@pytest.mark.slow
@jax.enable_x64(True)
def test_information_restriction_false_trains_the_clean_pass_alone():
  """The ablation: one clean forward pass, L(f(x)), BatchNorm updated once
  (the light network of train_utils.LIGHT: it holds for any network)."""
  config = train_utils.light_digits_config(None,
                                           information_restriction=False)
  batch = train_utils.random_batch(1, 4)
  got = _one_step(config, jax.devices()[:1], batch)
  model = step_lib.build_model(config, 10)
  variables = train_utils.float64_variables(model)
  batch = train_utils.float64_batch(batch)
  tx = optim.create_optimizer(config, variables["params"], model, 10)

  def clean_loss(params):
    (logits, _), new = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        batch["image"], train=True, mutable=["batch_stats"])
    return losses.cross_entropy(logits, batch["label"]), new["batch_stats"]

  (_, stats), grads = jax.jit(jax.value_and_grad(clean_loss, has_aux=True))(
      variables["params"])
  updates, _ = tx.update(grads, tx.init(variables["params"]),
                         variables["params"])
  _assert_close(got, jax.device_get({
      "params": optax.apply_updates(variables["params"], updates),
      "batch_stats": stats}))
  # Not what the two-pass objective gives.
  two_pass = _one_step(train_utils.light_digits_config(None),
                       jax.devices()[:1], batch)
  assert _max_diff(got, two_pass) > 1e-3


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_warmup_schedule_and_first_update(unit):
  """Linear warm-up from lr / warmup_steps to the cosine value."""
  lr, steps_per_epoch, epochs, warmup_epochs = 0.1, 10, 4, 2
  config = train_utils.tiny_digits_config(
      None, learning_rate=lr, num_epochs=epochs, warmup_epochs=warmup_epochs,
      schedule_unit=unit, momentum=0.0, weight_decay=0.0)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch)
  warmup, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
  for step in (0, 1, 9, 10, 19, 20, 25, 39):
    progress = (step / total if unit == "step"
                else (step // steps_per_epoch) / epochs)
    expected = lr * (1 + math.cos(math.pi * progress)) / 2
    expected *= min(1.0, (step + 1) / warmup)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5,
                               atol=1e-8, err_msg=f"step {step}")
  # The optimizer applies it: plain SGD's first update is -lr / warmup * g.
  params = {"w": np.ones(3, np.float32)}
  tx = optim.create_optimizer(config, params, models.create_model(
      "cifar_resnet20"), steps_per_epoch)
  updates, _ = tx.update({"w": np.full(3, 2.0, np.float32)}, tx.init(params),
                         params)
  np.testing.assert_allclose(updates["w"], -lr / warmup * 2.0, rtol=1e-6)
