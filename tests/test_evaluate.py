"""Evaluating without training (``ir2net_jax.tools.eval``), released PyTorch
checkpoints (convert, evaluate, fine-tune with ``init_from``) and stage 2
without its stage-1 run."""

import json
import os
import shutil
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sign_margins
import torch_zip
import train_utils
from ir2net_jax.io import checkpoints, pth, torch_layout
from ir2net_jax.tools import convert as convert_tool
from ir2net_jax.train import config_checks, evaluate, loop, parallel
from ir2net_jax.train import step as step_lib
from ir2net_jax import data, models
from ir2net_jax.nn import layers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import make_pth_fixture  # noqa: E402

TINY = (1, 1, 1, 1)   # IR2Net blocks per stage
NUM_EVAL = 360        # digits' test split
# Training runs that check where they start: a small split, one pass.
FEW = dict(train_split="train[:32]", eval_split="test[:40]", eval_batch_size=40,
           information_restriction=False, binary_compute_dtype="")


def _ir2net_config(digits_dir, **overrides):
  """The digits smoke config with a tiny IR2Net-A stage 2 (1000 classes,
  like the released ImageNet checkpoints)."""
  c = train_utils.tiny_digits_config(digits_dir, model="ir2net_a", stage=2,
                                     num_classes=1000)
  c.model_kwargs = ml_collections.ConfigDict({"num_blocks": TINY})
  c.update(overrides)
  return c


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


# --- a released checkpoint, written without torch ---------------------------


def test_writer_matches_a_file_torch_wrote(tmp_path):
  """``torch_zip.save`` of the fixture's content writes the records torch
  wrote, pickled byte for byte the same, and reads back the same."""
  expected = make_pth_fixture.expected_state_dict()
  state = {"module." + k: torch_zip.Tensor(v) for k, v in expected.items()}
  state["module.linear.weight"] = torch_zip.Tensor(expected["linear.weight"],
                                                   transposed=True)
  state["module.bn1.num_batches_tracked"] = torch_zip.Tensor(
      np.array(7, np.int64))
  mine = str(tmp_path / "tiny_resnet20.pth")
  torch_zip.save({"epoch": 3, "state_dict": state}, mine)

  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(make_pth_fixture.PATH) as a, zipfile.ZipFile(mine) as b:
    names = lambda z: sorted(n for n in z.namelist()
                             if not n.endswith("serialization_id"))
    assert names(a) == names(b)
    for n in names(a):
      assert a.read(n) == b.read(n), n
  real, written = (pth.read_torch_zip(p)
                   for p in (make_pth_fixture.PATH, mine))
  assert real.keys() == written.keys() and real["epoch"] == written["epoch"]
  assert real["state_dict"].keys() == written["state_dict"].keys()
  for k, v in real["state_dict"].items():
    np.testing.assert_array_equal(written["state_dict"][k], v, err_msg=k)
    assert written["state_dict"][k].dtype == v.dtype, k


def _released_weights(model, images, seed=12):
  """Seeded weights of ``model`` as PyTorch names them, like a trained
  network's: BatchNorm statistics are those of ``images`` (so activations
  have about unit variance), and classes 10.. never win (zero weights, bias
  -1000), so top-1 and top-5 over the 1000 outputs are decided among the
  digits."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    noise = 0.1 * rng.standard_normal(s.shape).astype(np.float32)
    if name == "kernel":
      return (rng.standard_normal(s.shape)
              / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    if name in ("scale", "var"):
      return 1.0 + np.abs(noise)
    if name == "negative_slope":
      return 0.25 + noise
    return noise  # biases, means

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  # One train-mode pass from mean 0 / var 1: running = 0.9 old + 0.1 batch.
  start = {"params": variables["params"],
           "batch_stats": jax.tree_util.tree_map_with_path(
               lambda p, s: np.full(s.shape, float(p[-1].key == "var"),
                                    np.float32), shapes["batch_stats"])}
  _, updated = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"]))(start, images)
  variables["batch_stats"] = jax.tree_util.tree_map_with_path(
      lambda p, new: np.asarray(
          (new - 0.9 * (p[-1].key == "var")) / 0.1, np.float32),
      updated["batch_stats"])
  fc = variables["params"]["fc"]
  fc["kernel"][:, 10:] = 0.0
  fc["bias"][10:] = -1000.0
  return torch_layout.flax_to_torch(variables, model)


def _write_released(path, state_dict):
  """A ``model_best.pth.tar`` as the reference's trainer saves it: the
  DataParallel state_dict beside the epoch, best accuracy (a CUDA tensor)
  and Adam's state."""
  tensors = {f"module.{k}": torch_zip.Tensor(v) for k, v in state_dict.items()}
  for k in state_dict:
    if k.endswith("running_var"):
      tensors[f"module.{k[:-len('running_var')]}num_batches_tracked"] = (
          torch_zip.Tensor(np.array(1000, np.int64)))
  first = next(iter(state_dict.values()))
  torch_zip.save({
      "epoch": 256,
      "state_dict": tensors,
      "best_top1_acc": torch_zip.Tensor(np.array(68.2, np.float32),
                                        location="cuda:0"),
      "optimizer": {
          "state": {0: {"step": torch_zip.Tensor(np.array(5.0, np.float32)),
                        "exp_avg": torch_zip.Tensor(np.zeros_like(first)),
                        "exp_avg_sq": torch_zip.Tensor(np.ones_like(first))}},
          "param_groups": [{"lr": 0.0, "betas": (0.9, 0.999), "eps": 1e-8,
                            "weight_decay": 0, "amsgrad": False,
                            "params": [0]}]},
  }, path)


@pytest.fixture(scope="module")
def released(tmp_path_factory, digits_dir):
  """A released-layout IR2Net-A stage-2 ``model_best.pth.tar`` converted by
  the command: ``{'pth', 'state_dict', 'converted', 'variables'}``."""
  tmp = tmp_path_factory.mktemp("released")
  model = models.create_model("ir2net_a", stage=2, num_blocks=TINY)
  images = next(data.eval_iterator(
      _ir2net_config(digits_dir, eval_split="train[:64]"),
      global_batch_size=64, process_index=0, process_count=1))["image"]
  state_dict = _released_weights(model, images)
  pth = str(tmp / "model_best.pth.tar")
  _write_released(pth, state_dict)
  out = str(tmp / "ir2net_a")
  convert_tool.main(["--model=ir2net_a", "--stage=2", "--num_blocks=1,1,1,1",
                "--image_size=32", f"--input={pth}", f"--output={out}"])
  return {"pth": pth, "state_dict": state_dict, "converted": out,
          "variables": torch_layout.torch_to_flax(state_dict, model, 32)}


def test_released_layout_is_unwrapped_and_anything_else_refused(
    tmp_path, released):
  loaded = torch_layout.load_state_dict(released["pth"])
  state_dict = released["state_dict"]
  assert {k for k in loaded if not k.endswith("num_batches_tracked")} == {
      f"module.{k}" for k in state_dict}
  for k, v in state_dict.items():
    np.testing.assert_array_equal(loaded[f"module.{k}"], v, err_msg=k)
  for obj, message in [
      ({"epoch": 1, "model": {"w": torch_zip.Tensor(np.zeros(2))}},
       r"holds \{'epoch': 'int', 'model': 'dict'\}.*no 'state_dict'"),
      ({"state_dict": [1, 2]}, "its 'state_dict' is a list"),
      ({"state_dict": {"a.weight": torch_zip.Tensor(np.zeros(2)),
                       "note": "x"}}, r"\['note'\] are not tensors"),
      ([torch_zip.Tensor(np.zeros(2))], "holds a list")]:
    path = str(tmp_path / "other.pth")
    torch_zip.save(obj, path)
    with pytest.raises(torch_layout.ConversionError, match=message):
      torch_layout.load_state_dict(path)


def _direct_hits(model, variables, config, unit_roundoff):
  """Top-1 / top-5 hits per example over the eval split from ``model.apply``
  in float64 (one unpadded batch), and which examples are *in doubt*: a
  binary activation's input or a top-1 / top-5 logit gap within the
  rounding of a run with ``unit_roundoff`` (``sign_margins``' bound)."""
  batch = next(data.eval_iterator(config, global_batch_size=NUM_EVAL,
                                  process_index=0, process_count=1))
  assert batch["mask"].all()
  c = sign_margins.SAFETY

  def run(v, x):
    ok = []

    def intercept(next_fun, args, kwargs, context):
      if (isinstance(context.module, layers.BinaryConv)
          and context.method_name == "__call__"):
        # Per example: in eval mode each example's sums are its own.
        a = jnp.abs(args[0]).reshape(args[0].shape[0], -1)
        k = args[0].shape[-1] * context.module.kernel_size ** 2
        ok.append(a.min(-1) > c * unit_roundoff * jnp.sqrt(k) * a.max(-1))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
      logits, _ = model.apply(v, x, train=False)
    return logits, jnp.all(jnp.stack(ok), axis=0)

  with jax.enable_x64(True):
    logits, ok = jax.jit(run)(_float64(variables),
                              np.asarray(batch["image"], np.float64))
    logits, ok = np.array(logits), np.array(ok)
  assert logits.dtype == np.float64
  top = -np.sort(-logits, axis=-1)
  tol = c * unit_roundoff * np.sqrt(1024) * np.abs(logits).max(axis=-1)
  ok &= (top[:, 0] - top[:, 1] > tol) & (top[:, 4] - top[:, 5] > tol)
  labels = batch["label"]
  top1 = np.argmax(logits, -1) == labels
  top5 = np.any(np.argsort(-logits, -1)[:, :5] == labels[:, None], -1)
  return top1, top5, ~ok


def _float64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _within(hits, top, in_doubt):
  """Whether ``hits`` is what ``top`` (per example) gives, up to the
  examples in doubt, which may go either way."""
  sure = int(np.sum(top & ~in_doubt))
  return sure <= hits <= sure + int(np.sum(in_doubt))


@pytest.mark.slow
def test_evaluate_a_released_checkpoint(released, digits_dir):
  """``evaluate`` on the converted weights counts the hits that
  ``model.apply`` on the same data does: exactly, where float64 rounding
  cannot decide (the trainer's eval in float64), and up to the examples
  that float32's rounding can flip (``evaluate`` itself, float32)."""
  out, variables = released["converted"], released["variables"]
  config = _ir2net_config(digits_dir)
  result = evaluate.evaluate(config, out)
  assert result["count"] == NUM_EVAL and result["step"] is None
  assert result["checkpoint"] == out
  assert (result["dataset"], result["split"]) == ("digits", "test")

  model = step_lib.build_model(config, 1000, parallel.AXIS)
  top1, top5, doubt64 = _direct_hits(model, variables, config, 2.0 ** -53)
  assert not doubt64.any()
  with jax.enable_x64(True):
    mesh = parallel.data_mesh()
    sums = evaluate.evaluate_split(step_lib.sharded_eval_step(model, mesh),
                                parallel.replicate(_float64(variables), mesh),
                                config, mesh)
  assert sums["eval_count"] == NUM_EVAL
  assert round(sums["eval_top1"] * NUM_EVAL) == top1.sum()
  assert round(sums["eval_top5"] * NUM_EVAL) == top5.sum()
  assert 0 < top1.sum() < top5.sum() < NUM_EVAL   # not trivial numbers

  _, _, doubt32 = _direct_hits(model, variables, config,
                               sign_margins.UNIT_ROUNDOFF_F32)
  print(f"{top1.sum()} / {top5.sum()} hits, {doubt32.sum()} examples in "
        f"doubt in float32; evaluate: {result}")
  assert doubt32.sum() <= NUM_EVAL // 2
  assert _within(round(result["top1"] * NUM_EVAL), top1, doubt32)
  assert _within(round(result["top5"] * NUM_EVAL), top5, doubt32)


def test_a_checkpoint_of_another_shape_is_refused_before_compiling(
    released, digits_dir, no_compile):
  out = released["converted"]
  config = _ir2net_config(digits_dir, num_classes=-1)   # 10 classes
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"ir2net_a \(10 classes.*\(512, 1000\) in the "
                           r"checkpoint, \(512, 10\) in the model"):
    evaluate.evaluate(config, out)
  with pytest.raises(checkpoints.CheckpointError, match=out):
    evaluate.evaluate(config, out)


@pytest.mark.slow
def test_fine_tune_a_released_checkpoint_without_stage1(tmp_path, released,
                                                        digits_dir):
  """Stage 2 with ``init_from``: no stage-1 run anywhere; with a vanishing
  learning rate the first step's parameters are the converted ones."""
  out, variables = released["converted"], released["variables"]
  config = _ir2net_config(digits_dir, init_from=out, num_train_steps=1,
                          learning_rate=1e-30, weight_decay=0.0,
                          log_every_steps=1, **FEW)
  workdir = tmp_path / "ir2net_a" / "stage2"
  summary = loop.train_and_evaluate(config, str(workdir))
  assert summary["stage"] == 2 and summary["steps"] == 1
  assert not (tmp_path / "ir2net_a" / "stage1").exists()
  step, got = train_utils.final_state(str(workdir))
  want = _flat(variables["params"])
  assert step == 1
  for k, v in want.items():
    np.testing.assert_allclose(got[f"['params']{_keystr(k)}"], v, atol=1e-9,
                               err_msg=k)


@pytest.mark.slow
def test_fine_tune_on_other_classes_with_a_fresh_classifier(tmp_path,
                                                            released,
                                                            digits_dir):
  """1000-class released weights on the 10 digits: refused, naming the
  module to start fresh; with ``init_from_fresh=fc`` every other parameter
  starts from the converted ones and ``fc`` from its initialisation."""
  out, variables = released["converted"], released["variables"]
  config = _ir2net_config(digits_dir, num_classes=-1, init_from=out,
                          num_train_steps=1, learning_rate=1e-30,
                          weight_decay=0.0, log_every_steps=1, **FEW)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"--config.init_from_fresh=fc$"):
    loop.train_and_evaluate(config, str(tmp_path / "refused"))
  assert not (tmp_path / "refused").exists()
  config.init_from_fresh = "head"
  with pytest.raises(checkpoints.CheckpointError, match=r"\['head'\].*'fc'"):
    loop.train_and_evaluate(config, str(tmp_path / "refused"))
  config.init_from_fresh = "fc"
  summary = loop.train_and_evaluate(config, str(tmp_path / "finetune"))
  assert summary["steps"] == 1
  _, got = train_utils.final_state(str(tmp_path / "finetune"))
  fresh = models.init_variables(step_lib.build_model(config, 10), 32, config.seed)
  want = {**{k: v for k, v in _flat(variables["params"]).items()
             if not k.startswith("fc/")},
          **{f"fc/{k}": v for k, v in _flat(fresh["params"]["fc"]).items()}}
  assert got["['params']['fc']['kernel']"].shape == (512, 10)
  for k, v in want.items():
    np.testing.assert_allclose(got[f"['params']{_keystr(k)}"], v, atol=1e-9,
                               err_msg=k)


def _keystr(flat_key):
  return "".join(f"['{p}']" for p in flat_key.split("/"))
# --- stage 2 resumes without stage 1; ir2net-eval on its workdir -----------


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory, digits_dir):
  """A digits smoke run of IR2Net-A stage 2 from a stage-1 checkpoint (one
  step), then resumed (two more steps, evaluated at steps 1 and 3) after
  the stage-1 workdir was deleted: ``(runs dir, config, summaries)``."""
  runs = tmp_path_factory.mktemp("stage2") / "runs"
  c1 = _ir2net_config(digits_dir, stage=1)
  train_utils.stage1_run(runs / "stage1", step_lib.build_model(c1, 1000), 32,
                         3)
  c2 = _ir2net_config(digits_dir, num_train_steps=1, num_epochs=2,
                      log_every_steps=1, checkpoint_every_steps=1, **FEW)
  first = loop.train_and_evaluate(c2, str(runs / "stage2"))
  shutil.rmtree(runs / "stage1")
  c2.num_train_steps = 3
  return runs, c2, (first, loop.train_and_evaluate(c2, str(runs / "stage2")))


@pytest.mark.slow
def test_stage2_resumes_after_stage1_is_gone(stage2_run):
  runs, config, (first, resumed) = stage2_run
  assert first["steps"] == 1 and resumed["steps"] == 3
  assert not (runs / "stage1").exists()
  assert train_utils.final_state(str(runs / "stage2"))[0] == 3
  # A new stage-2 run still needs its stage 1, and says where it looked.
  with pytest.raises(checkpoints.CheckpointError,
                     match=str(runs / "stage1")):
    loop.train_and_evaluate(config, str(runs / "stage2b"))
  assert not (runs / "stage2b").exists()


def test_init_from_and_stage1_checkpoint_together_are_refused(tmp_path,
                                                              digits_dir):
  c = _ir2net_config(digits_dir, init_from=str(tmp_path),
                     stage1_checkpoint=str(tmp_path))
  with pytest.raises(config_checks.ConfigError,
                     match="init_from.*stage1_checkpoint.*unset one"):
    config_checks.validate_config(c)


# --- ir2net-eval on a training run -------------------------------------------


@pytest.mark.slow
def test_cli_on_a_workdir_and_its_best(stage2_run, tmp_path):
  """``python -m ir2net_jax.tools.eval`` without --config (it reads the
  recorded one, and takes overrides) reproduces the run's final and best
  eval numbers."""
  workdir = stage2_run[0] / "stage2"
  summary = json.loads((workdir / "summary.json").read_text())
  out = tmp_path / "best.json"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "ir2net_jax.tools.eval", f"--checkpoint={ckpt}",
       *extra], cwd=train_utils.ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
      for ckpt, extra in ((workdir, ["--config.prefetch=1"]),  # an override
                          (workdir / "best", [f"--output={out}"]))]
  for p in procs:
    log = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, log[-3000:]
    assert "top-1" in log and "(40 examples)" in log
  final = json.loads((workdir / "eval_digits_test_40.json").read_text())
  best = json.loads(out.read_text())
  assert final["step"] == 3 and final["count"] == best["count"] == 40
  assert final["checkpoint"] == str(workdir / "checkpoints" / "3")
  assert best["checkpoint"] == str(workdir / "best" / str(best["step"]))
  for key in ("top1", "top5"):
    assert final[key] == pytest.approx(summary[f"final_eval_{key}"], abs=1e-12)
    assert best[key] == pytest.approx(summary[f"best_eval_{key}"], abs=1e-12)
  # The eval file in best/ does not disturb the run's checkpoints.
  assert checkpoints.latest_step(str(workdir / "best")) == best["step"]


@pytest.mark.slow
def test_a_multi_host_runs_workdir_is_evaluated_in_one_process(stage2_run,
                                                               tmp_path):
  """Launch settings recorded in config.json are not the evaluation's."""
  workdir = tmp_path / "multi"
  shutil.copytree(stage2_run[0] / "stage2", workdir)
  before = evaluate.evaluate(None, str(workdir))
  recorded = json.loads((workdir / "config.json").read_text())
  recorded.update(num_processes=2, process_id=0, coordinator_address=
                  f"127.0.0.1:{train_utils.free_port()}")
  (workdir / "config.json").write_text(json.dumps(recorded))
  assert evaluate.evaluate(None, str(workdir)) == before
  out = tmp_path / "eval.json"
  p = subprocess.run(
      [sys.executable, "-m", "ir2net_jax.tools.eval", f"--checkpoint={workdir}",
       f"--output={out}"], cwd=train_utils.ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      timeout=300, check=False)
  assert p.returncode == 0, p.stdout.decode()[-3000:]
  assert json.loads(out.read_text()) == before


def test_errors_come_before_compiling(tmp_path, workdir, stage2_run,
                                      released, digits_dir, no_compile):
  runs, config, _ = stage2_run
  run = str(runs / "stage2")
  with pytest.raises(checkpoints.CheckpointError, match="no such directory"):
    evaluate.evaluate(config, str(tmp_path / "missing"))
  with pytest.raises(checkpoints.CheckpointError, match="holds no checkpoint"):
    evaluate.evaluate(config, str(workdir))
  (workdir / "checkpoints").mkdir()
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint yet"):
    evaluate.evaluate(config, str(workdir))
  with pytest.raises(config_checks.ConfigError, match="no recorded config"):
    evaluate.evaluate(None, released["converted"])   # converted: no config
  other = _ir2net_config(digits_dir)
  other.model_kwargs.num_blocks = (2, 1, 1, 1)
  with pytest.raises(checkpoints.CheckpointError,
                     match=rf"{run}/checkpoints \(step 3\) does not fit "
                           r"ir2net_a.*layer1_1.* only in the model"):
    evaluate.evaluate(other, run)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"is of model 'ir2net_a' stage 2, but the config's "
                           r"model is 'ir2net_b' stage 2"):
    evaluate.evaluate(_ir2net_config(digits_dir, model="ir2net_b"), run)
  stage1 = _ir2net_config(digits_dir, stage=1)   # the same shapes
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"is of model 'ir2net_a' stage 2, but the config's "
                           r"model is 'ir2net_a' stage 1"):
    evaluate.evaluate(stage1, run)
  nodata = _ir2net_config(str(tmp_path / "empty"), dataset="cifar10")
  with pytest.raises(data.DataError, match="tfds build cifar10"):
    evaluate.evaluate(nodata, run)
  assert sorted(os.listdir(workdir)) == ["checkpoints", "notes.txt"]
