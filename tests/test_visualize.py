"""Pictures of information restriction (ir2net_jax.tools.visualize).

The maps against the training objective's own mask and a numpy derivation of
the attention (float64: both are downstream of sign activations, see
sign_margins.py); the grid's layout pixel by pixel; a smoke training run's
PNGs and TensorBoard images; the three checkpoint kinds the loader reads;
the command line.
"""

import glob
import io
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import train_utils
from ir2net_jax.configs.record import read_recorded_config
from ir2net_jax.io import weights
from ir2net_jax.nn import losses, objective, restriction
from ir2net_jax.tools import visualize
from ir2net_jax.train import evaluate, grid as grid_lib, loop, step as step_lib

LAM = 1.0  # erases about half of a random image: both mask values occur
SCALE = 3  # 32 x 32 digits are drawn 96 x 96


def _model_and_variables():
  config = train_utils.tiny_digits_config("unused")
  model = step_lib.build_model(config, 10)
  return model, train_utils.float64_variables(model)


def _numpy_attention(feature: np.ndarray, size) -> np.ndarray:
  """SPEC section 3, steps 1-3, written out: mean_c(F^2), each column
  normalised along H, bilinear upsampling with align_corners=True."""
  a = np.mean(feature ** 2, axis=-1)
  a = a / np.maximum(np.sqrt(np.sum(a ** 2, axis=1, keepdims=True)), 1e-12)
  def taps(n_in, n_out):
    src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), src - i0
  h0, h1, hw = taps(a.shape[1], size[0])
  w0, w1, ww = taps(a.shape[2], size[1])
  rows = (1 - hw)[None, :, None] * a[:, h0] + hw[None, :, None] * a[:, h1]
  return (1 - ww) * rows[:, :, w0] + ww * rows[:, :, w1]


@pytest.mark.slow
@pytest.mark.parametrize("batch_stats_mode", ["train", "eval"])
def test_maps_are_the_objectives(batch_stats_mode):
  train_mode = batch_stats_mode == "train"
  with jax.enable_x64(True):
    model, variables = _model_and_variables()
    batch = train_utils.float64_batch(train_utils.random_batch(0, 6))
    images = batch["image"]
    maps = jax.jit(lambda v, x: restriction.restriction_maps(
        model, v, x, LAM, train=train_mode))(variables, images)
    maps = jax.device_get(maps)
    if train_mode:  # the objective's own clean pass and mask
      _, aux = objective.two_pass_objective(
          variables["params"], variables["batch_stats"], model, images,
          batch["label"], losses.cross_entropy, LAM)
      feature, mask = np.asarray(aux.feature), np.asarray(aux.mask)
    else:
      _, feature = model.apply(variables, images, train=False)
      feature = np.asarray(feature)
      up = _numpy_attention(feature, (32, 32))
      mask = (up > LAM * up.mean(axis=(1, 2), keepdims=True)).astype(float)
  assert 0.2 < mask.mean() < 0.8, mask.mean()   # not vacuous
  np.testing.assert_array_equal(maps["mask"], mask)
  np.testing.assert_allclose(maps["erased"], images * mask[..., None],
                             rtol=1e-6)
  np.testing.assert_allclose(maps["attention"],
                             _numpy_attention(feature, (32, 32)), rtol=1e-5,
                             atol=1e-7)
  # The mask is the attention thresholded: the column shows what it cuts.
  att = maps["attention"].astype(np.float64)
  np.testing.assert_array_equal(
      maps["mask"], att > LAM * att.mean(axis=(1, 2), keepdims=True))
  assert maps["attention"].dtype == np.float32
  assert maps["mask"].shape == (6, 32, 32)
  assert maps["erased"].shape == (6, 32, 32, 3)


def _cell(grid, row, col, size=32, scale=SCALE, header=True):
  top = grid_lib.HEADER if header else 0
  cell = size * scale
  y = top + grid_lib.GAP + row * (cell + grid_lib.GAP)
  x = grid_lib.GAP + col * (cell + grid_lib.GAP)
  return grid[y:y + cell, x:x + cell]


def _big(x, scale=SCALE):
  return np.asarray(x).repeat(scale, axis=1).repeat(scale, axis=2)


def test_grid_layout_and_columns():
  rng = np.random.default_rng(0)
  n = 3
  images = rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)
  mask = (rng.uniform(size=(n, 32, 32)) > 0.5).astype(np.float32)
  attention = rng.uniform(0, 2, (n, 32, 32)).astype(np.float32)
  maps = {"attention": attention, "mask": mask,
          "erased": images * mask[..., None]}
  mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
  grid = grid_lib.restriction_grid(images, maps, mean=mean, std=std)
  cell = 32 * SCALE
  assert grid.dtype == np.uint8
  assert grid.shape == (grid_lib.HEADER + grid_lib.GAP + n * (cell + grid_lib.GAP),
                        grid_lib.GAP + 4 * (cell + grid_lib.GAP)
                        + grid_lib.LABEL, 3)
  pixels = lambda x: np.round(np.clip(x * 0.5 + 0.5, 0, 1) * 255)
  for r in range(n):
    np.testing.assert_array_equal(_cell(grid, r, 0), _big(pixels(images))[r])
    peak = attention[r].max()
    np.testing.assert_array_equal(
        _cell(grid, r, 1), _big(grid_lib.viridis(attention[r:r + 1] / peak))[0])
    # The mask: pure white where kept, pure black where erased.
    want = np.where(_big(mask)[r][..., None] > 0, 255, 0)
    np.testing.assert_array_equal(_cell(grid, r, 2),
                                  np.broadcast_to(want, (cell, cell, 3)))
    np.testing.assert_array_equal(_cell(grid, r, 3),
                                  _big(pixels(maps["erased"]))[r])
  # value_range instead of mean / std: the same for [-1, 1] data, no header.
  plain = grid_lib.restriction_grid(images, maps, (-1.0, 1.0), header=False)
  np.testing.assert_array_equal(plain[:-grid_lib.GAP, :-grid_lib.LABEL],
                                grid[grid_lib.HEADER:-grid_lib.GAP,
                                     :-grid_lib.LABEL])


def test_viridis_matches_matplotlib():
  cm = pytest.importorskip("matplotlib").colormaps["viridis"]
  x = np.linspace(0, 1, 256)
  want = np.round(cm(x)[:, :3] * 255)
  got = grid_lib.viridis(x).astype(float)
  assert np.max(np.abs(got - want)) <= 3  # anchors rounded to levels
  np.testing.assert_array_equal(grid_lib.viridis(np.array([-1.0, 2.0])),
                                grid_lib.viridis(np.array([0.0, 1.0])))


def test_save_png_round_trips(tmp_path):
  grid = np.random.default_rng(1).integers(0, 256, (7, 5, 3), np.uint8)
  path = tmp_path / "sub" / "g.png"
  grid_lib.save_png(grid, str(path))
  np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)


# A smoke run with 3 steps an epoch: evaluations (and pictures) at 3 and 6.
EVAL_STEPS = (3, 6)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, digits_dir):
  workdir = tmp_path_factory.mktemp("viz") / "run"
  p = train_utils.launch(workdir, f"--config.data_dir={digits_dir}",
                         "--config.train_split=train[:48]", *train_utils.LIGHT,
                         devices=2)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out.decode()[-3000:]
  return workdir


def _tensorboard_images(workdir):
  """{step: decoded image} of the TensorBoard images tagged restriction."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  found = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "restriction":
          encoded = tf.make_ndarray(value.tensor)[2]  # width, height, PNG
          found[event.step] = np.asarray(Image.open(io.BytesIO(encoded)))
  return found


@pytest.mark.slow
def test_training_writes_pictures_at_every_eval(smoke_run):
  pngs = sorted(os.listdir(smoke_run / "restriction"))
  assert pngs == [f"step_{s:06d}.png" for s in EVAL_STEPS]
  tb = _tensorboard_images(smoke_run)
  assert sorted(tb) == list(EVAL_STEPS)
  n = 8  # config.restriction_images
  cell = 32 * SCALE
  for s in EVAL_STEPS:
    png = np.asarray(Image.open(smoke_run / "restriction" / f"step_{s:06d}.png"))
    assert png.shape == (grid_lib.HEADER + grid_lib.GAP
                         + n * (cell + grid_lib.GAP),
                         grid_lib.GAP + 4 * (cell + grid_lib.GAP)
                         + grid_lib.LABEL, 3)
    np.testing.assert_array_equal(tb[s], png)
    mask_column = np.stack([_cell(png, r, 2) for r in range(n)])
    assert set(np.unique(mask_column)) <= {0, 255}


def test_no_pictures_without_information_restriction():
  config = train_utils.tiny_digits_config("unused")
  config.information_restriction = False   # nothing is erased: no pictures
  assert loop._restriction_pictures(config, None, None, "unused") is False
  config.information_restriction, config.restriction_images = True, 0
  assert loop._restriction_pictures(config, None, None, "unused") is False


def test_loader_reads_workdir_best_and_converted_weights(smoke_run, tmp_path):
  recorded = lambda path: (
      read_recorded_config(evaluate.recorded_config(path))
      if evaluate.recorded_config(path) else None)
  config = recorded(str(smoke_run))
  assert config.train_split == "train[:48]"
  assert recorded(str(smoke_run / "best")) == config
  assert recorded(str(tmp_path)) is None
  step, saved = train_utils.final_state(smoke_run)
  assert step == EVAL_STEPS[-1]
  _, variables = visualize.load_model(config, str(smoke_run))
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  assert flat.keys() == {k for k in saved if not k.startswith("['opt")}
  for k in flat:
    np.testing.assert_array_equal(flat[k], saved[k], err_msg=k)
  # best/ holds the best eval's step; converted weights hold what was saved.
  _, best = visualize.load_model(config, str(smoke_run / "best"))
  weights.save_variables(str(tmp_path / "converted"), best)
  _, converted = visualize.load_model(config, str(tmp_path / "converted"))
  jax.tree.map(np.testing.assert_array_equal, converted, best)
  with pytest.raises(visualize.VisualizeError, match="no such directory"):
    visualize.load_model(config, str(tmp_path / "missing"))


@pytest.mark.slow
def test_command_line_draws_image_files(smoke_run, tmp_path):
  rng = np.random.default_rng(2)
  images = tmp_path / "images"
  images.mkdir()
  for i in range(2):  # 8x8 grey digits, as the data set stores them
    Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(
        images / f"d{i}.png")
  Image.fromarray(rng.integers(0, 256, (20, 12, 3), np.uint8)).save(
      tmp_path / "other.jpg")
  output = tmp_path / "grid.png"
  p = subprocess.run(
      [sys.executable, "-m", "ir2net_jax.tools.visualize",
       f"--checkpoint={smoke_run / 'best'}",
       f"--images={images},{tmp_path / '*.jpg'}", f"--output={output}"],
      cwd=train_utils.ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert p.returncode == 0, p.stderr[-3000:]
  assert "3 images" in p.stdout
  cell = 32 * SCALE
  grid = np.asarray(Image.open(output))
  assert grid.shape == (grid_lib.HEADER + grid_lib.GAP
                        + 3 * (cell + grid_lib.GAP),
                        grid_lib.GAP + 4 * (cell + grid_lib.GAP)
                        + grid_lib.LABEL, 3)


@pytest.mark.parametrize("dataset,size", [("digits", 32), ("cifar10", 32),
                                          ("imagenet2012", 64)])
def test_image_files_load_alike_without_tensorflow(tmp_path, monkeypatch,
                                                   dataset, size):
  """``--images`` without TensorFlow: the numpy recipes give the tf.data
  recipes' inputs up to the decoders' rounding (mean under 2 levels)."""
  import photos  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data import images  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data.device import on_device  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data.shared import constants  # pylint: disable=g-import-not-at-top
  photos.write_tree(str(tmp_path / "tree"), {"x": 2}, [(50, 70), (80, 60)])
  config = ml_collections.ConfigDict({"dataset": dataset,
                                      "image_size": size})
  pattern = str(tmp_path / "tree" / "x" / "*" / "*.jpg")
  with_tf = images.load_images(config, pattern, "tf.data")
  without = images.load_images(config, pattern, "numpy")
  # What a run without TensorFlow gets from 'auto'.
  from ir2net_jax.data import engines  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(on_device, "tensorflow_installed", lambda: False)
  monkeypatch.setattr(engines, "tensorflow_installed", lambda: False)
  np.testing.assert_array_equal(images.load_images(config, pattern), without)
  assert with_tf.shape == without.shape == (6, size, size, 3)
  std = np.array(constants.DIGITS_STD if dataset == "digits"
                 else constants.IMAGENET_STD) * 255
  levels = np.abs(with_tf - without) * std
  assert levels.reshape(6, -1).mean(1).max() < 2.0, levels.mean()


def _digit_files(directory, count=3, seed=3):
  """``count`` 8x8 grey PNGs and a text file named .png."""
  rng = np.random.default_rng(seed)
  directory.mkdir()
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(
        directory / f"d{i}.png")
  (directory / "notes.png").write_text("not an image")
  return directory


def test_predict_gives_the_models_top_classes(smoke_run, tmp_path, caplog):
  """``ir2net_jax.train.predict``: each readable image's top-k labels and
  softmax probabilities are the model's on the eval recipe's images, named
  by the data set; a bad file is skipped and named."""
  from ir2net_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from ir2net_jax.train import predict  # pylint: disable=g-import-not-at-top
  config = read_recorded_config(evaluate.recorded_config(str(smoke_run)))
  files = _digit_files(tmp_path / "images")
  found = predict.predict(config, str(smoke_run / "best"), str(files),
                          top_k=3)
  assert "notes.png" in caplog.text
  assert [os.path.basename(p.path) for p in found.predictions] == [
      "d0.png", "d1.png", "d2.png"]
  model, variables = evaluate.load_model(config, str(smoke_run / "best"))
  images = images_lib.load_images(config, str(files))
  logits = np.asarray(model.apply(variables, images, train=False)[0],
                      np.float64)
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  for p, row in zip(found.predictions, want):
    # The two programs (batched predict, this apply) may round a near-tie
    # either way: the top-3 probabilities, in order, are what must agree.
    np.testing.assert_allclose(p.probabilities, np.sort(row)[::-1][:3],
                               rtol=1e-5)
    np.testing.assert_allclose(p.probabilities, row[list(p.labels)],
                               rtol=1e-5)
    assert len(set(p.labels)) == 3
    assert list(p.classes) == [str(l) for l in p.labels]   # digits' names
  assert "d0.png  " in predict.table(found.predictions)


def test_class_names_are_the_data_sets(tmp_path):
  import photos  # pylint: disable=g-import-not-at-top
  from ir2net_jax.data.shared import sources  # pylint: disable=g-import-not-at-top
  photos.write_tree(str(tmp_path / "tree"), {"train": 1}, [(8, 8)])
  folder = ml_collections.ConfigDict({"dataset": f"folder:{tmp_path}/tree"})
  assert sources.class_names(folder, 4) == ["ant", "bee", "cow", "3"]
  cifar = ml_collections.ConfigDict({"dataset": "cifar10"})
  assert sources.class_names(cifar, 10)[:2] == ["airplane", "automobile"]
  imagenet = sources.class_names(
      ml_collections.ConfigDict({"dataset": "imagenet2012"}), 1000)
  assert imagenet[0] == "n01440764" and len(set(imagenet)) == 1000


@pytest.mark.slow
def test_predict_command_prints_a_table_json_and_pictures(smoke_run,
                                                          tmp_path):
  files = _digit_files(tmp_path / "images", count=2)
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "ir2net_jax.tools.predict",
       f"--images={files}", *args], cwd=train_utils.ROOT,
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  p = run(f"--checkpoint={smoke_run}", "--json", "--top_k=2",
          f"--output={tmp_path / 'out' / 'p.json'}",
          f"--pictures={tmp_path / 'out' / 'maps.png'}")
  assert p.returncode == 0, p.stderr[-3000:]
  printed = json.loads(p.stdout)
  assert printed == json.loads((tmp_path / "out" / "p.json").read_text())
  assert printed["model"] == "cifar_resnet20"
  assert [len(e["top"]) for e in printed["predictions"]] == [2, 2]
  assert "Traceback" not in p.stderr and "oneDNN" not in p.stderr
  warned = [l for l in p.stderr.splitlines() if l.startswith("W")]
  assert len(warned) == 1 and "skipped" in warned[0], p.stderr
  assert "notes.png: not a JPEG, PNG" in warned[0]
  cell = 32 * SCALE
  maps = np.asarray(Image.open(tmp_path / "out" / "maps.png"))
  assert maps.shape[0] == (grid_lib.HEADER + grid_lib.GAP
                           + 2 * (cell + grid_lib.GAP))
  missing = run(f"--checkpoint={tmp_path / 'nothing'}")
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines() == [
      f"error: --checkpoint={tmp_path / 'nothing'}: no such directory; pass "
      "a training workdir, its best/, or converted weights (ir2net-convert)"]
