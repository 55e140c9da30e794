"""``ir2net-preresize``: the same tree, labels and file names, every image's
shorter side at most N (torchvision's ``Resize(N)`` size), small images
copied byte for byte, an interrupted copy resumed, bad arguments refused."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from ir2net_jax.data import folders
from ir2net_jax.tools import preresize


def _image(path, width, height, kind="JPEG", seed=0):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3),
                       np.uint8)   # smooth: JPEG rounds it by a level or two
  pixels = Image.fromarray(small).resize((width, height),
                                         Image.Resampling.BILINEAR)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels.save(path, format=kind, **({"quality": 95} if kind == "JPEG" else {}))


@pytest.fixture
def tree(tmp_path):
  root = tmp_path / "photos"
  _image(root / "train/cat/big.jpg", 400, 300, seed=1)
  _image(root / "train/cat/tall.JPEG", 150, 500, seed=2)
  _image(root / "train/dog/small.jpg", 120, 90, seed=3)
  _image(root / "train/dog/big.png", 330, 250, kind="PNG", seed=4)
  _image(root / "val/cat/v.jpg", 260, 200, seed=5)
  _image(root / "val/dog/v.jpg", 100, 100, seed=6)
  (root / "train/dog/notes.txt").write_text("not an image")
  return root


def _relative(folder):
  return {split: ([os.path.relpath(p, folder.root) for p in paths],
                  labels.tolist())
          for split, (paths, labels) in folder.splits.items()}


def test_the_copy_has_the_same_tree_and_shorter_sides_at_most_n(
    tree, tmp_path):
  out = tmp_path / "small"
  counts = preresize.main(["--input", str(tree), "--output", str(out),
                           "--shorter_side", "96", "--workers", "2"])
  assert counts == {"resized": 5, "copied": 1, "kept": 0, "failed": 0}
  before, after = folders.scan(str(tree)), folders.scan(str(out))
  assert after.classes == before.classes
  assert _relative(after) == _relative(before)   # same files, same labels
  assert not (out / "train/dog/notes.txt").exists()
  sizes = {"train/cat/big.jpg": (128, 96), "train/cat/tall.JPEG": (96, 320),
           "train/dog/big.png": (126, 96), "val/cat/v.jpg": (124, 96),
           "train/dog/small.jpg": (120, 90), "val/dog/v.jpg": (96, 96)}
  for name, size in sizes.items():
    with Image.open(out / name) as image:
      assert image.size == size, name
      assert image.format == ("PNG" if name.endswith("png") else "JPEG")
  # Small enough already: the same bytes.
  assert ((out / "train/dog/small.jpg").read_bytes()
          == (tree / "train/dog/small.jpg").read_bytes())
  # Resized as Pillow resizes the decoded original (up to JPEG's rounding).
  with Image.open(tree / "train/cat/big.jpg") as original:
    want = np.asarray(original.convert("RGB").resize(
        (128, 96), Image.Resampling.BILINEAR), np.float64)
  got = np.asarray(Image.open(out / "train/cat/big.jpg"), np.float64)
  assert np.abs(got - want).mean() < 3.0
  with Image.open(tree / "train/dog/big.png") as original:   # lossless
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "train/dog/big.png")),
        np.asarray(original.resize((126, 96), Image.Resampling.BILINEAR)))


def test_an_interrupted_copy_resumes_and_keeps_what_it_wrote(tree, tmp_path):
  out = tmp_path / "small"
  first = out / "train/cat/big.jpg"
  _image(first, 10, 10, seed=9)   # a file the earlier run finished
  mark = first.read_bytes()
  counts = preresize.preresize_tree(str(tree), str(out), 96, workers=0)
  assert counts == {"resized": 4, "copied": 1, "kept": 1, "failed": 0}
  assert first.read_bytes() == mark
  assert not list(out.rglob("*.partial-*"))
  again = preresize.preresize_tree(str(tree), str(out), 96, workers=0)
  assert again == {"resized": 0, "copied": 0, "kept": 6, "failed": 0}


def test_an_unreadable_image_is_reported_and_the_rest_written(tree, tmp_path):
  (tree / "train/cat/broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  out = tmp_path / "small"
  with pytest.raises(SystemExit) as e:
    preresize.main(["--input", str(tree), "--output", str(out),
                    "--shorter_side", "96", "--workers", "0"])
  assert e.value.code == 1
  assert not (out / "train/cat/broken.jpg").exists()
  assert (out / "train/cat/big.jpg").exists()


@pytest.mark.parametrize("args, message", [
    (["--input", "{tree}/missing", "--output", "{out}"], "is not a directory"),
    (["--input", "{tree}", "--output", "{tree}/train/small"], "lies in it"),
    (["--input", "{tree}", "--output", "{out}", "--quality", "100"],
     "in 1..95"),
    (["--input", "{tree}/train/cat", "--output", "{out}"], "holds no images"),
])
def test_bad_arguments_are_refused_before_anything_is_written(
    tree, tmp_path, capsys, args, message):
  out = tmp_path / "small"
  with pytest.raises(SystemExit):
    preresize.main([a.format(tree=tree, out=out) for a in args])
  assert message in capsys.readouterr().err
  assert not out.exists() and not (tree / "train/small").exists()


def test_resized_size_is_torchvisions_resize():
  assert preresize.resized_size(500, 375, 256) == (341, 256)
  assert preresize.resized_size(375, 500, 256) == (256, 341)
  assert preresize.resized_size(256, 999, 256) is None
  assert preresize.resized_size(300, 300, 256) == (256, 256)


def test_the_decoders_benchmark_times_preresized_jpegs():
  """``benchmark.decoders --shorter_side=N`` runs its recipes on the JPEGs
  as this tool writes them."""
  from ir2net_jax.tools.benchmark import decoders  # pylint: disable=g-import-not-at-top
  jpegs = decoders.imagenet_like_jpegs(6, seed=1)
  small = decoders._preresized(jpegs, 128)  # pylint: disable=protected-access
  assert len(small) == len(jpegs)
  for before, after in zip(jpegs, small):
    with Image.open(io.BytesIO(before)) as a, Image.open(io.BytesIO(after)) as b:
      assert min(b.size) == min(128, min(a.size)) and b.format == "JPEG"
      assert preresize.resized_size(*a.size, 128) in (None, b.size)
