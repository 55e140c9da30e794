"""``ir2net-preresize``: the same tree, labels and file names, every image's
shorter side at most N (torchvision's ``Resize(N)`` size), small images
copied byte for byte once checked, bad files reported and not written, an
interrupted copy resumed (after SIGTERM or SIGKILL, with no partial file
left and no worker running), an output of other parameters or one that
reaches into the input refused."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from ir2net_jax.data.shared import folders, image_files
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
  assert counts == {"resized": 5, "copied": 1, "kept": 0, "bad": 0}
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
  preresize.preresize_tree(str(tree), str(out), 96, workers=0)
  first = out / "train/cat/big.jpg"
  _image(first, 10, 10, seed=9)   # a file the earlier run finished
  mark = first.read_bytes()
  for name in ("train/cat/tall.JPEG", "train/dog/small.jpg"):
    (out / name).unlink()   # not reached before it stopped
  report = preresize.preresize_tree(str(tree), str(out), 96, workers=0)
  assert report.counts == {"resized": 1, "copied": 1, "kept": 4, "bad": 0}
  assert first.read_bytes() == mark
  assert not list(out.rglob("*.partial-*"))
  again = preresize.preresize_tree(str(tree), str(out), 96, workers=0)
  assert again == ({"resized": 0, "copied": 0, "kept": 6, "bad": 0}, {})


def test_an_unreadable_image_is_reported_and_the_rest_written(
    tree, tmp_path, capsys):
  (tree / "train/cat/broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  out = tmp_path / "small"
  with pytest.raises(SystemExit) as e:
    preresize.main(["--input", str(tree), "--output", str(out),
                    "--shorter_side", "96", "--workers", "0"])
  assert e.value.code == 1
  assert not (out / "train/cat/broken.jpg").exists()
  assert (out / "train/cat/big.jpg").exists()
  printed = capsys.readouterr().out
  assert "5 resized, 1 copied, 0 kept, 1 bad" in printed
  assert (f"{tree / 'train/cat/broken.jpg'}: not a JPEG, PNG, GIF, BMP or "
          "WebP image") in printed


def _truncated(path, width, height):
  _image(path, width, height)
  os.truncate(path, os.path.getsize(path) - 10)


def test_bad_files_are_listed_and_never_copied_or_waited_for(
    tree, tmp_path, capsys):
  """A truncated JPEG small enough to be copied is decoded first; FIFOs,
  empty files and dangling links are named without being opened."""
  cat = tree / "train/cat"
  _truncated(cat / "cut_small.jpg", 80, 60)     # would be copied
  _truncated(cat / "cut_big.jpg", 400, 300)     # would be resized
  (cat / "empty.jpg").write_bytes(b"")
  os.mkfifo(cat / "pipe.jpg")
  (cat / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
  out = tmp_path / "small"
  with pytest.raises(SystemExit) as e:
    preresize.main(["--input", str(tree), "--output", str(out),
                    "--shorter_side", "96", "--workers", "0"])
  assert e.value.code == 1
  printed = capsys.readouterr().out
  assert "5 resized, 1 copied, 0 kept, 5 bad" in printed
  for name, why in (("cut_small.jpg", "truncated"),
                    ("cut_big.jpg", "truncated"),
                    ("empty.jpg", "an empty file"),
                    ("pipe.jpg", "a FIFO, not an image file"),
                    ("gone.jpg", "a symbolic link to")):
    assert f"{cat / name}: {why}" in printed, name
    assert not os.path.lexists(out / "train/cat" / name)
  assert not list(out.rglob("*.partial-*"))


@pytest.mark.parametrize("args, message", [
    (["--input", "{tree}/missing", "--output", "{out}"], "is not a directory"),
    (["--input", "{tree}", "--output", "{tree}/train/small"], "lies in it"),
    (["--input", "{tree}/train", "--output", "{tree}"], "lies in --output"),
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


def _hashes(*roots):
  """{path: sha256} of every file under ``roots`` (links not followed)."""
  found = {}
  for root in roots:
    for d, _, files in os.walk(root):
      for f in files:
        with open(os.path.join(d, f), "rb") as fh:
          found[os.path.join(d, f)] = hashlib.sha256(fh.read()).hexdigest()
  return found


def test_links_are_resolved_and_an_output_reaching_into_the_input_refused(
    tree, tmp_path, capsys):
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  os.replace(tree / "train/dog", elsewhere / "dog")
  (tree / "train/dog").symlink_to(elsewhere / "dog")   # a linked class
  (tmp_path / "via").symlink_to(tree)                  # the input, linked
  (tmp_path / "into_train").symlink_to(tree / "train")
  (tmp_path / "split_link").mkdir()
  (tmp_path / "split_link/train").symlink_to(tree / "train")
  before = _hashes(tree, elsewhere)
  for output, words in (
      (tmp_path / "into_train/small", "lies in it"),
      (elsewhere / "dog/small", "lies in the input's folder"),
      (tmp_path / "split_link", "lies in the input's folder"),
      (tmp_path, "lies in --output")):
    with pytest.raises(SystemExit) as e:
      preresize.main(["--input", str(tmp_path / "via"), "--output",
                      str(output), "--workers", "0"])
    assert e.value.code == 2
    assert words in capsys.readouterr().err, output
  assert _hashes(tree, elsewhere) == before
  assert os.listdir(tmp_path / "split_link") == ["train"]
  counts = preresize.main(["--input", str(tmp_path / "via"), "--output",
                           str(tmp_path / "small"), "--shorter_side", "96",
                           "--workers", "0"])
  assert counts == {"resized": 5, "copied": 1, "kept": 0, "bad": 0}
  assert (tmp_path / "small/train/dog/small.jpg").read_bytes() == (
      elsewhere / "dog/small.jpg").read_bytes()


def _args(tree, out, *more):
  return ["--input", str(tree), "--output", str(out), "--workers", "0",
          *more]


def test_the_parameters_are_recorded_and_another_size_is_refused(
    tree, tmp_path, capsys):
  out = tmp_path / "small"
  preresize.main(_args(tree, out, "--shorter_side", "96"))
  record = json.loads((out / preresize.RECORD).read_text())
  assert {k: record[k] for k in ("shorter_side", "quality", "format")} == {
      "shorter_side": 96, "quality": 90, "format": preresize.FORMAT}
  assert _relative(folders.scan(str(out))) == _relative(
      folders.scan(str(tree)))   # the record is not listed as data
  assert preresize.main(_args(tree, out, "--shorter_side", "96"))["kept"] == 6
  before = _hashes(out)
  with pytest.raises(SystemExit) as e:
    preresize.main(_args(tree, out, "--shorter_side", "64"))
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert ("was made with --shorter_side=96 --quality=90 (format 1), not "
          "--shorter_side=64 --quality=90 (format 1)") in err
  assert "new --output, or pass --redo" in err
  assert _hashes(out) == before
  counts = preresize.main(_args(tree, out, "--shorter_side", "64", "--redo"))
  assert counts == {"resized": 6, "copied": 0, "kept": 0, "bad": 0}
  assert json.loads((out / preresize.RECORD).read_text())["shorter_side"] == 64
  with Image.open(out / "train/cat/big.jpg") as image:
    assert image.size == (85, 64)


def test_an_output_with_files_but_no_record_is_refused(tree, tmp_path,
                                                       capsys):
  out = tmp_path / "small"
  _image(out / "train/cat/big.jpg", 10, 10)   # an older version's
  with pytest.raises(SystemExit):
    preresize.main(_args(tree, out, "--shorter_side", "96"))
  assert (f"--output {out} holds files (train) but no "
          f"{preresize.RECORD}") in capsys.readouterr().err
  preresize.main(_args(tree, out, "--shorter_side", "96", "--redo"))
  with Image.open(out / "train/cat/big.jpg") as image:
    assert image.size == (128, 96)


# ir2net-preresize with every file written slowly while its partial file
# exists. Each spawned worker imports the main module again (as
# __mp_main__), so the patches apply in the workers too.
_SLOW = """
import time

from PIL import Image

from ir2net_jax.data import image_files
from ir2net_jax.tools import preresize

_verify, _save = image_files.verify, Image.Image.save


def _slow_verify(path):
  time.sleep(0.3)
  return _verify(path)


def _slow_save(self, *args, **kwargs):
  _save(self, *args, **kwargs)
  time.sleep(0.3)


image_files.verify, Image.Image.save = _slow_verify, _slow_save

if __name__ == "__main__":
  preresize.run()
"""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def many(tmp_path):
  """A tree of 140 images, 112 to copy and 28 to resize at 48: three
  chunks of work, so two workers start."""
  root = tmp_path / "many"
  for i in range(140):
    big = i % 5 == 0
    _image(root / f"train/c{i % 2}/{i:03d}.jpg", 200 if big else 64,
           150 if big else 48, seed=i)
  return root


def _start_slow(tmp_path, tree, out):
  """The slow run in a new session; its output goes to ``tmp_path/log``
  (a pipe would stay open in a worker that outlived it)."""
  script = tmp_path / "slow_preresize.py"
  script.write_text(_SLOW)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
  with open(tmp_path / "log", "wb") as log:
    return subprocess.Popen(
        [sys.executable, str(script), "--input", str(tree), "--output",
         str(out), "--shorter_side", "48", "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True)


def _kill(pids):
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _partials(out):
  return list(out.rglob("*.partial-*")) if out.exists() else []


def _writing(proc, out, timeout_s=120.0):
  """Waits until two processes write partial files in ``out``."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if len({p.name.rsplit("-", 1)[1] for p in _partials(out)}) >= 2:
      return
    if proc.poll() is not None:
      pytest.fail(f"ended early: {(out.parent / 'log').read_text()}")
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)
  pytest.fail("two workers never wrote at once")


def _descendants(pid):
  """The pids of the processes under ``pid`` (read from /proc)."""
  parent_of = {}
  for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{entry}/stat") as f:
        parent_of[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
  found, todo = set(), [pid]
  while todo:
    parent = todo.pop()
    kids = {c for c, p in parent_of.items() if p == parent}
    found |= kids
    todo += kids
  return found


def _running(pids, wait_s=5.0):
  """Those of ``pids`` still running (zombies are not) after ``wait_s``."""
  def alive(pid):
    try:
      with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
      return False
  deadline = time.monotonic() + wait_s
  while any(map(alive, pids)) and time.monotonic() < deadline:
    time.sleep(0.05)
  return [pid for pid in pids if alive(pid)]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="reads processes from /proc")
@pytest.mark.parametrize("signum, group", [
    (signal.SIGTERM, False),   # kill PID
    (signal.SIGINT, True),     # Ctrl-C: the terminal signals every process
])
def test_a_signal_stops_the_workers_and_leaves_no_partial_file(
    many, tmp_path, signum, group):
  out = tmp_path / "small"
  proc = _start_slow(tmp_path, many, out)
  workers = set()
  try:
    _writing(proc, out)
    workers = _descendants(proc.pid)
    start = time.monotonic()
    (os.killpg if group else os.kill)(proc.pid, signum)
    proc.wait(timeout=60)
    took = time.monotonic() - start
    survivors = _running(workers)
  finally:
    _kill([proc.pid, *workers])
  log = (tmp_path / "log").read_text()
  assert proc.returncode == 128 + signum, log[-3000:]
  assert took < 10
  assert (f"stopped by {signal.Signals(signum).name}; the workers stopped "
          "and no partial file is left") in log
  assert "Traceback" not in log
  assert len(workers) >= 2 and not survivors
  assert not _partials(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="reads processes from /proc; parent-death signal")
@pytest.mark.slow
def test_after_sigkill_no_worker_runs_on_and_a_rerun_completes(many,
                                                              tmp_path):
  out = tmp_path / "small"
  proc = _start_slow(tmp_path, many, out)   # the parent alone killed
  workers = set()
  try:
    _writing(proc, out)
    workers = _descendants(proc.pid)
    proc.kill()
    proc.wait()
    survivors = _running(workers)
  finally:
    _kill(workers)
  assert len(workers) >= 2 and not survivors
  assert not _partials(out)   # each worker removed its own
  proc = _start_slow(tmp_path, many, out)   # every process killed at once
  try:
    _writing(proc, out)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert _partials(out)   # left behind
  done = [p for p in out.rglob("*.jpg") if p.is_file()]
  report = preresize.preresize_tree(str(many), str(out), 48, workers=0)
  assert not _partials(out) and not report.bad
  assert report.counts["kept"] == len(done)
  assert sum(report.counts.values()) == 140
  for path in folders.scan(str(out)).splits["train"][0]:
    assert image_files.verify(path) is None, path
    with Image.open(path) as image:
      assert image.size == (64, 48), path   # 200x150 ones resized
    if int(os.path.basename(path)[:3]) % 5:   # 64x48 ones copied
      with open(path, "rb") as f:
        assert f.read() == (many / os.path.relpath(path, out)).read_bytes()
