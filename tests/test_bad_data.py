"""Bad image files, built on the fly: each is named, read with bounds, and
handled by the run's ``bad_examples`` policy in every engine.

'skip' replaces a train example that fails to read by the next one of its
epoch's order (grain) or of the listing (tf.data), so a resumed stream
still equals the uninterrupted one; it masks
an eval example out, logs and counts each file once, and stops past
``max_bad_fraction``. 'error' stops before training where the listing finds
the file, else where it is read, naming it. Unusual modes decode to
tf.data's pixels.
"""

import io
import os
import time
from unittest import mock

import jax
import numpy as np
from photos import photo, write_tree
import pytest
from PIL import Image
import simplejpeg
import tensorflow as tf

from ir2net_jax.configs import digits as digits_config
from ir2net_jax.data.grain import grain_inputs, host_recipes
from ir2net_jax.data.shared import bad_data, folders, image_files, sources
from ir2net_jax.data.shared.specs import DataError
from ir2net_jax.data.tf_data import folder_reads, pipeline
from ir2net_jax.train import parallel

pytestmark = pytest.mark.skipif(not grain_inputs.grain_installed(),
                                reason="grain is not installed")


def _jpeg(rng, height=96, width=128, **kwargs) -> bytes:
  out = io.BytesIO()
  Image.fromarray(photo(rng, height, width)).save(out, "JPEG", quality=90,
                                                  **kwargs)
  return out.getvalue()


def _encoded(image: Image.Image, kind: str, **kwargs) -> bytes:
  out = io.BytesIO()
  image.save(out, kind, **kwargs)
  return out.getvalue()


def _hostile(directory, kind: str) -> str:
  """Writes one hostile file ``kind`` into ``directory``; returns its
  path."""
  rng = np.random.default_rng(len(kind))
  path = os.path.join(directory, f"bad_{kind}.jpg")
  writers = {
      "truncated": lambda: open(path, "wb").write(_jpeg(rng)[:1500]),
      "empty": lambda: open(path, "wb").close(),
      "text": lambda: open(path, "w").write("<html>not found</html>"),
      "tiff": lambda: open(path, "wb").write(_encoded(
          Image.fromarray(photo(rng, 20, 20)), "TIFF")),
      "fifo": lambda: os.mkfifo(path),
      "device": lambda: os.symlink("/dev/zero", path),
      "dangling": lambda: os.symlink(os.path.join(directory, "gone.jpg"),
                                     path),
      "loop": lambda: os.symlink(path, path),
      "jpeg_bomb": lambda: open(path, "wb").write(
          _encoded(Image.new("L", (16000, 16000)), "JPEG", quality=1)),
      "png_bomb": lambda: open(path, "wb").write(
          _encoded(Image.new("1", (12000, 12000)), "PNG")),
  }
  writers[kind]()
  return path


REASONS = {
    "truncated": "truncated", "empty": "empty file", "text": "not a JPEG",
    "tiff": "not a JPEG", "fifo": "a FIFO", "device": "character device",
    "dangling": "does not exist", "loop": "link loop",
    "jpeg_bomb": "16000x16000 pixels, over", "png_bomb": "12000x12000 pixels",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_each_bad_file_is_named_and_read_with_bounds(tmp_path, kind):
  path = _hostile(str(tmp_path), kind)
  start = time.perf_counter()
  reason = image_files.verify(path)
  assert reason is not None and REASONS[kind] in reason, reason
  assert time.perf_counter() - start < 5   # no FIFO wait, no endless read
  with pytest.raises(image_files.BadImage, match=os.path.basename(path)):
    image_files.decode_rgb(image_files.read_file(path), path)


def test_the_caps_are_settable(tmp_path, monkeypatch):
  path = tmp_path / "ok.jpg"
  path.write_bytes(_jpeg(np.random.default_rng(0)))
  assert image_files.verify(str(path)) is None
  monkeypatch.setenv("IR2NET_MAX_IMAGE_PIXELS", str(96 * 128 - 1))
  assert "96x128 pixels, over" in image_files.verify(str(path))
  monkeypatch.setenv("IR2NET_MAX_IMAGE_PIXELS", "")
  monkeypatch.setenv("IR2NET_MAX_IMAGE_BYTES", "1000")
  assert "over the 1,000-byte cap" in image_files.verify(str(path))


# ------------------------------------------------ modes, as tf.data reads --

def _tf_pixels(encoded: bytes) -> np.ndarray:
  return tf.io.decode_image(encoded, channels=3,
                            expand_animations=False).numpy()


def _modes():
  rng = np.random.default_rng(5)
  rgb = rng.integers(0, 256, (12, 16, 3), np.uint8)
  grey16 = rng.integers(0, 65536, (12, 16, 1)).astype(np.uint16)
  return {
      "I;16": (tf.io.encode_png(grey16).numpy(), 0),
      "RGB 16-bit": (tf.io.encode_png(rng.integers(
          0, 65536, (12, 16, 3)).astype(np.uint16)).numpy(), 0),
      "LA 16-bit": (tf.io.encode_png(rng.integers(
          0, 65536, (12, 16, 2)).astype(np.uint16)).numpy(), 0),
      "LA": (_encoded(Image.fromarray(rng.integers(
          0, 256, (12, 16, 2), np.uint8), "LA"), "PNG"), 0),
      "RGBA": (_encoded(Image.fromarray(rng.integers(
          0, 256, (12, 16, 4), np.uint8), "RGBA"), "PNG"), 0),
      "P": (_encoded(Image.fromarray(rgb).convert("P"), "PNG"), 0),
      "P with transparency": (_encoded(Image.fromarray(rgb).convert("P"),
                                       "PNG", transparency=3), 0),
      "1": (_encoded(Image.fromarray(rgb[..., 0] > 127), "PNG"), 0),
      "GIF": (_encoded(Image.fromarray(rgb).convert("P"), "GIF"), 0),
      "BMP": (_encoded(Image.fromarray(rgb), "BMP"), 0),
      # JPEG decoders round their IDCT and colour conversion differently.
      "L JPEG": (_encoded(Image.fromarray(rgb[..., 0]), "JPEG"), 3),
      "CMYK JPEG": (_encoded(Image.fromarray(rng.integers(
          0, 256, (12, 16, 4), np.uint8), "CMYK"), "JPEG", quality=95), 10),
      # libjpeg-turbo stores CMYK pixels as YCCK (Adobe transform 2).
      "YCCK JPEG": (simplejpeg.encode_jpeg(rng.integers(
          0, 256, (12, 16, 4), np.uint8), quality=95, colorspace="CMYK"),
                    10),
  }


@pytest.mark.parametrize("mode", sorted(_modes()))
def test_every_mode_decodes_to_tf_datas_pixels(mode):
  encoded, tolerance = _modes()[mode]
  want = _tf_pixels(encoded).astype(int)
  for got in (image_files.decode_rgb(encoded),
              host_recipes.decode_rgb(encoded),
              host_recipes.decode_region(encoded, lambda h, w: (0, 0, h, w),
                                         8, "pil_full", reduce=False)[0]):
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.abs(got.astype(int) - want).max() <= tolerance, mode


def test_a_16_bit_scan_is_not_turned_white():
  grey = np.full((8, 8, 1), 127 * 257, np.uint16)
  pixels = host_recipes.decode_rgb(tf.io.encode_png(grey).numpy())
  assert pixels.mean() == 127   # Pillow's own convert gives 255


def test_modes_i_and_f_take_the_high_byte_and_clip():
  samples = np.array([[0, 255, 256, 32768, 65535]], np.int32)
  np.testing.assert_array_equal(
      image_files.to_rgb(Image.fromarray(samples, "I"))[..., 0],
      [[0, 0, 1, 128, 255]])
  floats = np.array([[-3.0, 0.5, 254.9, 300.0]], np.float32)
  np.testing.assert_array_equal(
      image_files.to_rgb(Image.fromarray(floats, "F"))[..., 1],
      [[0, 0, 254, 255]])


# ----------------------------------------------------- the grain engine ---

BAD_AT_READ = ("truncated", "text", "jpeg_bomb")   # the listing cannot tell
BAD_IN_LISTING = ("empty", "fifo", "dangling")


@pytest.fixture
def messy_tree(tmp_path):
  sizes = [(96, 128), (128, 96), (100, 150), (120, 120)]
  root = write_tree(tmp_path / "messy", {"train": 8, "test": 4}, sizes,
                    seed=2)
  for kind in BAD_AT_READ + BAD_IN_LISTING:
    _hostile(str(root / "train" / "ant"), kind)
  _hostile(str(root / "test" / "bee"), "truncated")
  return root


def _config(dataset, **overrides):
  config = digits_config.get_config("smoke")
  config.update(dataset=dataset, input_engine="grain", input_workers=0,
                batch_size=6, image_size=32, max_bad_fraction=0.5)
  config.update(overrides)
  return config


def _open(config):
  return grain_inputs.GrainInputs(config, parallel.data_mesh(
      jax.devices()[:1]), 6, num_classes=3)


def _first(batches, count):
  try:
    return [next(batches) for _ in range(count)]
  finally:
    batches.close()


def _steps(inputs, start, count, workers=0):
  return _first(inputs.host_train_batches(start, workers=workers), count)


def test_skip_replaces_bad_files_and_a_resumed_stream_is_unchanged(
    messy_tree):
  inputs = _open(_config(f"folder:{messy_tree}"))
  per_epoch = inputs.train_order().steps_per_epoch   # 30 files, 5 steps
  whole = _steps(inputs, 0, 2 * per_epoch)
  bad = {os.path.basename(p) for p in inputs.bad_files.found}
  assert bad == {f"bad_{k}.jpg" for k in BAD_AT_READ + BAD_IN_LISTING}
  assert all(b["image"].shape == (6, 32, 32, 3) for b in whole)
  resumed = _steps(inputs, per_epoch + 1, per_epoch - 1, workers=2)
  for step, batch in enumerate(resumed, per_epoch + 1):
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key], whole[step][key])
  assert "bad" not in whole[0]


def test_skip_masks_a_bad_eval_file_and_counts_it(messy_tree):
  inputs = _open(_config(f"folder:{messy_tree}"))
  batches = list(inputs.host_eval_batches())
  assert sum(b["mask"].sum() for b in batches) == 13 - 1
  found = {os.path.relpath(p, messy_tree) for p in inputs.bad_files.found}
  assert found == {"test/bee/bad_truncated.jpg"} | {   # and the listing's
      f"train/ant/bad_{k}.jpg" for k in BAD_IN_LISTING}


def test_error_stops_before_training_naming_the_listed_files(messy_tree):
  with pytest.raises(DataError) as error:
    _open(_config(f"folder:{messy_tree}", bad_examples="error"))
  for kind in BAD_IN_LISTING:
    assert f"bad_{kind}.jpg" in str(error.value)
  assert "--config.bad_examples=skip" in str(error.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_error_names_a_file_that_fails_mid_epoch(tmp_path, workers):
  root = write_tree(tmp_path / "t", {"train": 4, "test": 2}, [(96, 128)])
  _hostile(str(root / "train" / "cow"), "truncated")
  inputs = _open(_config(f"folder:{root}", bad_examples="error"))
  with pytest.raises(Exception, match="bad_truncated.jpg: truncated"):
    _steps(inputs, 0, 3, workers=workers)


def test_skip_stops_past_the_share_of_bad_files(messy_tree):
  with pytest.raises(DataError, match="max_bad_fraction"):
    _open(_config(f"folder:{messy_tree}", max_bad_fraction=0.05))
  inputs = _open(_config(f"folder:{messy_tree}", max_bad_fraction=0.15))
  with pytest.raises(DataError, match="5 of 30 files are bad"):
    _steps(inputs, 0, 10)


def test_tf_data_leaves_out_the_listed_files_and_refuses_them_on_error(
    tmp_path):
  root = write_tree(tmp_path / "t", {"train": 4, "test": 2}, [(40, 40)])
  for kind in BAD_IN_LISTING:
    _hostile(str(root / "train" / "ant"), kind)
  config = _config(f"folder:{root}", input_engine="tf.data")
  assert pipeline.dataset_info(config).num_train == 12
  batches = pipeline.train_iterator(config, global_batch_size=6, seed=0)
  assert next(batches)["image"].shape == (6, 32, 32, 3)
  with pytest.raises(DataError, match="bad_fifo.jpg"):
    pipeline.dataset_info(_config(f"folder:{root}", input_engine="tf.data",
                                  bad_examples="error"))


def _tf_steps(config, start, count, tally=None):
  return _first(pipeline.train_iterator(
      config, global_batch_size=6, seed=0, start_step=start,
      bad_files=tally), count)


def test_tf_data_replaces_bad_files_and_a_resumed_stream_is_unchanged(
    messy_tree):
  config = _config(f"folder:{messy_tree}", input_engine="tf.data")
  tally = sources.bad_file_tally(sources.read_settings(config))
  per_epoch = 30 // 6   # 30 files the listing passes: 24 good, 3 bad
  whole = _tf_steps(config, 0, 2 * per_epoch, tally)
  assert {os.path.basename(p) for p in tally.found} == {
      f"bad_{k}.jpg" for k in BAD_AT_READ + BAD_IN_LISTING}
  assert all(b["image"].shape == (6, 32, 32, 3) for b in whole)
  assert set(whole[0]) == {"image", "label"}
  resumed = _tf_steps(config, per_epoch + 1, per_epoch - 1)
  for step, batch in enumerate(resumed, per_epoch + 1):
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key], whole[step][key])


def test_tf_data_reads_bad_files_as_a_fully_guarded_pipeline_would(
    messy_tree):
  """Batches read fast, with a bad file's batch read again guarded, equal
  those of a pipeline that guards every read."""
  config = _config(f"folder:{messy_tree}", input_engine="tf.data")
  fast = _tf_steps(config, 0, 5)
  guard_all = folder_reads.read

  def guarded(files, position, decode, tries, failed, guard=None):
    del guard
    return guard_all(files, position, decode, tries, failed, None)

  with mock.patch.object(folder_reads, "read", guarded):
    slow = _tf_steps(config, 0, 5)
  for a, b in zip(fast, slow):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_tf_data_names_the_bad_file_mid_epoch_or_masks_it(tmp_path):
  root = write_tree(tmp_path / "t", {"train": 4, "test": 2}, [(40, 40)])
  jpeg = _jpeg(np.random.default_rng(0), 40, 40)
  # The header reads (the listing passes it); the pixels are cut short.
  (root / "test" / "bee" / "cut.jpg").write_bytes(jpeg[:len(jpeg) - 150])
  _hostile(str(root / "train" / "cow"), "truncated")
  error = _config(f"folder:{root}", input_engine="tf.data",
                  bad_examples="error")
  with pytest.raises(image_files.BadImage, match="cut.jpg: truncated"):
    list(pipeline.eval_iterator(error, global_batch_size=6))
  with pytest.raises(image_files.BadImage, match="bad_truncated.jpg: trunc"):
    _tf_steps(error, 0, 3)
  skip = _config(f"folder:{root}", input_engine="tf.data")
  tally = sources.bad_file_tally(sources.read_settings(skip))
  batches = list(pipeline.eval_iterator(skip, global_batch_size=6,
                                        bad_files=tally))
  assert sum(b["mask"].sum() for b in batches) == 6
  assert [os.path.basename(p) for p in tally.found] == ["cut.jpg"]


def test_tf_data_stops_past_the_share_of_bad_files_in_a_split(messy_tree):
  config = _config(f"folder:{messy_tree}", input_engine="tf.data",
                   max_bad_fraction=0.15)
  with pytest.raises(DataError, match="'train': 5 of 30 files are bad"):
    _tf_steps(config, 0, 10)
  # The train split's bad files do not count against the eval split's.
  tally = bad_data.Tally("t", bad_data.Policy("skip", 0.15)).preload(
      {"t/train/a/1": "x", "t/train/a/2": "x", "t/train/a/3": "x"},
      lambda path: path.split("/")[1])
  tally.add("t/train/a/4", "bad", "train", 30)
  tally.add("t/test/a/1", "bad", "test", 13)   # 1 of 13, not 5 of 13
  with pytest.raises(DataError, match="'test': 2 of 13"):
    tally.add("t/test/a/2", "bad", "test", 13)


@pytest.mark.parametrize("kind,options", [
    ("JPEG", {}), ("PNG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {}),
    ("WEBP", {"lossless": True}), ("WEBP-alpha", {})])
def test_tf_data_reads_the_pixel_count_from_every_header(kind, options):
  for width, height in ((37, 21), (300, 17)):
    rgb = Image.fromarray(photo(np.random.default_rng(width), height, width))
    image = rgb.convert("RGBA") if kind == "WEBP-alpha" else rgb
    encoded = _encoded(image, kind.split("-")[0], **options)
    assert int(folder_reads.declared_pixels(tf.constant(encoded))) == (
        width * height)
  assert int(folder_reads.declared_pixels(tf.constant(b"<html>"))) == 0


# ---------------------------------------------------- the tree's listing --

def test_empty_classes_and_looping_links(tmp_path):
  root = write_tree(tmp_path / "t", {"train": 2, "test": 1}, [(40, 40)])
  os.makedirs(root / "train" / "yak")
  tree = folders.scan(str(root))
  assert tree.empty_classes == ("yak",) and len(tree.classes) == 4
  with pytest.raises(DataError, match="no image in any split: .'yak'."):
    bad_data.check_listing("t", {}, 9, bad_data.Policy("error"),
                           tree.empty_classes)
  os.symlink(root, root / "test" / "loop")
  with pytest.raises(DataError, match="a loop"):
    folders.scan.__wrapped__(str(root))


def test_a_file_name_that_is_not_utf8_is_read_and_printed(tmp_path):
  root = write_tree(tmp_path / "t", {"train": 2, "test": 1}, [(40, 40)])
  name = os.fsdecode(b"caf\xe9.jpg")
  target = os.path.join(root, "train", "ant", name)
  os.replace(os.path.join(root, "train", "ant", "000.jpg"), target)
  assert target in folders.scan(str(root)).splits["train"][0]
  inputs = _open(_config(f"folder:{root}"))
  assert len(_steps(inputs, 0, 1)) == 1
  tf_data = _config(f"folder:{root}", input_engine="tf.data")
  assert pipeline.dataset_info(tf_data).num_train == 6
  batch = next(pipeline.train_iterator(tf_data, global_batch_size=6, seed=0))
  assert batch["image"].shape == (6, 32, 32, 3)   # every file, read
  assert image_files.printable(target).endswith("caf\\xe9.jpg")
  with open(target, "wb"):
    pass
  message = str(image_files.BadImage(target, "an empty file"))
  message.encode("utf-8")   # printable anywhere


# ---------------------------------------------------- ir2net-check-data ---

def test_check_data_reports_every_bad_file_and_only_those(messy_tree,
                                                          tmp_path, capsys):
  from ir2net_jax.tools import check_data  # pylint: disable=g-import-not-at-top
  os.makedirs(messy_tree / "test" / "yak")
  report = tmp_path / "bad.tsv"
  assert check_data.main([f"--data=folder:{messy_tree}", "--workers=2",
                          f"--report={report}"]) == 1
  lines = report.read_text().splitlines()
  found = {os.path.relpath(line.split("\t")[0], messy_tree): line
           for line in lines if not line.startswith("class ")}
  want = {f"train/ant/bad_{k}.jpg" for k in BAD_AT_READ + BAD_IN_LISTING}
  assert set(found) == want | {"test/bee/bad_truncated.jpg"}
  for kind in BAD_AT_READ + BAD_IN_LISTING:
    assert REASONS[kind] in found[f"train/ant/bad_{kind}.jpg"]
  assert "class yak\tno image in any split" in lines
  assert "checked 43 / 43 files" in capsys.readouterr().err
  clean = write_tree(tmp_path / "clean", {"train": 2, "val": 1}, [(40, 40)])
  assert check_data.main([f"--data={clean}", "--workers=0"]) == 0
  assert check_data.main([f"--data={tmp_path / 'nowhere'}"]) == 2


def test_check_data_benchmark_prints_its_table(tmp_path, capsys):
  from ir2net_jax.tools.benchmark import check_data as bench  # pylint: disable=g-import-not-at-top
  root = write_tree(tmp_path / "t", {"train": 3, "val": 1}, [(60, 80)])
  bench.main([f"--data={root}", "--workers=0", "--repeats=1"])
  table = capsys.readouterr().out.splitlines()
  assert table[0].startswith("| check | workers | files | files/s")
  rows = [line.split("|") for line in table[2:]]
  assert [r[1].strip() for r in rows] == ["ir2net-check-data",
                                          "full-size decode"]
  assert all(r[3].strip() == "12" and float(r[4].replace(",", "")) > 0
             for r in rows)
