"""``ir2net_jax.io.pth``: hostile ``.pth`` files are refused, never obeyed.

Crafted files (each of the attacks we know, by name) and a fuzz of the
torch-written fixture: random byte flips, truncations, edited shapes,
strides, offsets and storage sizes, missing and extra records. Every file is
read in one child process under a cap on its address space; each must give
exactly the arrays it holds or raise ``ConversionError``, never anything
else, quickly, and without allocating more than the file is worth.
"""

import itertools
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import torch_zip
from ir2net_jax.io import pth

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "tiny_resnet20.pth")
FOUR = np.arange(4, dtype=np.float32)  # the storage of the crafted tensors
MEMORY_CAP = 1 << 30  # the worker's address space; numpy needs ~0.4 GiB


def _save(path, state, epoch=3):
  torch_zip.save({"epoch": epoch, "state_dict": state}, str(path))
  return str(path)


def _crafted(tmp_path, view=None, numel=None):
  """A file holding one tensor ``w`` over the storage ``FOUR``."""
  return _save(tmp_path / "crafted.pth",
               {"w": torch_zip.Tensor(FOUR, view=view, numel=numel)})


def _expected_view(storage, offset, shape, stride):
  """The tensor torch would make, by explicit index arithmetic, or None
  where torch's writer could not have written it (out of the storage,
  negative strides, more elements than the storage)."""
  n = storage.size
  values = (offset,) + tuple(shape) + tuple(stride)
  if min(values) < 0 or max(values) >= 1 << 63:  # torch's int64
    return None
  numel = int(np.prod([int(s) for s in shape], dtype=object))
  if numel == 0:
    try:
      return np.zeros(shape, storage.dtype) if offset <= n else None
    except ValueError:  # more than numpy can index, even empty
      return None
  if numel > n:
    return None
  index = [offset + sum(i * s for i, s in zip(at, stride))
           for at in itertools.product(*(range(size) for size in shape))]
  if max(index) >= n:
    return None
  return storage[np.array(index, dtype=np.int64)].reshape(shape)


@pytest.mark.parametrize("view,numel,reason", [
    ((0, (4096,), (1,)), None, "reaches element 4095"),
    ((0, (2,), (1 << 20,)), None, "reaches element 1048576"),
    ((1000, (1,), (1,)), None, "reaches element 1000"),
    ((3, (2,), (-1,)), None, "negative"),
    ((0, (1 << 40, 1 << 40), (0, 0)), None, "overlapping"),
    ((1 << 63, (1,), (1,)), None, "int64 range"),
    ((0, (1 << 62, 4), (1 << 62, 1)), None, "reaches element"),
    ((0, (1.5,), (1,)), None, "tuples of integers"),
    ((0, (True, 2), (1, 1)), None, "tuples of integers"),
    ((0, (4,), (1,)), 1000, "holds 16 bytes, fewer than the 4000"),
    ((0, (4,), (1,)), 1 << 62, "fewer than the 18446744073709551616"),
    ((0, (4,), (1,)), -1, "persistent id"),
], ids=["shape", "stride", "offset", "negative_stride", "zero_stride_huge",
        "offset_overflow", "extent_overflow", "float_shape", "bool_shape",
        "storage_past_record", "storage_huge", "storage_negative"])
def test_crafted_tensors_are_refused_by_name(tmp_path, view, numel, reason):
  with pytest.raises(pth.ConversionError, match=reason) as e:
    pth.read_torch_zip(_crafted(tmp_path, view, numel))
  assert ("tensor ['state_dict']['w']: " in str(e.value)) == (
      "record data/0" not in str(e.value) and "persistent" not in reason)


def test_views_inside_their_storage_are_read_as_torch_reads_them(tmp_path):
  for view in [(1, (3,), (1,)), (0, (2, 2), (1, 2)), (0, (2, 2), (0, 1)),
               (2, (0, 5), (9, 9)), (3, (1, 1), (7, 7)), (0, (4,), (1,))]:
    got = pth.read_torch_zip(_crafted(tmp_path, view))["state_dict"]["w"]
    np.testing.assert_array_equal(got, _expected_view(FOUR, *view))
    assert got.shape == view[1] and got.dtype == np.float32


def _pickle_file(tmp_path, data_pkl: bytes, storages=()):
  """A torch zip whose data.pkl is ``data_pkl``, as given."""
  path = str(tmp_path / "pickled.pth")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", data_pkl)
    z.writestr("archive/byteorder", b"little")
    for key, value in storages:
      z.writestr(f"archive/data/{key}", value.tobytes())
  return path


class _System:
  def __reduce__(self):
    return (os.system, ("touch pwned",))


def test_no_code_from_the_file_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = _pickle_file(tmp_path, pickle.dumps({"w": _System()}, protocol=2))
  with pytest.raises(pth.ConversionError, match="posix.system is not allowed"):
    pth.read_torch_zip(path)
  assert not os.path.exists(tmp_path / "pwned")


@pytest.mark.parametrize("data_pkl,reason", [
    # LONG_BINPUT 2**32 - 1: the C unpickler would grow its memo to it.
    (b"\x80\x02]r\xff\xff\xff\xff.", "memo index 4294967295"),
    # BINBYTES8 claiming 2**40 bytes that are not there.
    (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"ab.", "bytes8"),
    # A list that holds itself.
    (b"\x80\x02]q\x00h\x00a.", "nested in itself"),
    # 200 nested lists.
    (b"\x80\x02" + b"]" * 200 + b"a" * 199 + b".", "deeper than 64"),
    # A tensor over something that is not a storage.
    (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00(K\x01K\x00K\x01\x85"
     b"K\x01\x85tR.", "its storage is a int"),
    (b"\x80\x02ctorch\nFloatStorage\n.", "storage type, not data"),
], ids=["memo", "bytes8", "cycle", "depth", "not_a_storage", "storage_type"])
def test_hostile_pickles_are_refused(tmp_path, data_pkl, reason):
  with pytest.raises(pth.ConversionError, match=reason):
    pth.read_torch_zip(_pickle_file(tmp_path, data_pkl))


def _records(path):
  with zipfile.ZipFile(path) as z:
    return [(i, z.read(i)) for i in z.infolist()]


def _rezip(path, records, compress=zipfile.ZIP_STORED):
  with zipfile.ZipFile(path, "w", compress) as z:
    for info, data in records:
      z.writestr(info.filename, data)
  return str(path)


def test_damaged_archives_are_refused(tmp_path):
  records = _records(FIXTURE)
  cases = {
      "is compressed": _rezip(tmp_path / "deflated.pth", records,
                              zipfile.ZIP_DEFLATED),
      "record data/3 is missing": _rezip(
          tmp_path / "missing.pth",
          [r for r in records if not r[0].filename.endswith("/data/3")]),
      "not one": _rezip(tmp_path / "no_pkl.pth", records[1:]),
      "big-endian": _rezip(tmp_path / "big.pth", [
          (i, b"big" if i.filename.endswith("byteorder") else d)
          for i, d in records]),
  }
  with open(FIXTURE, "rb") as f:
    raw = bytearray(f.read())
  # The central directory's size of data/0, edited to claim 2**31 bytes.
  info = next(i for i, _ in records if i.filename.endswith("/data/0"))
  entry = raw.index(b"PK\x01\x02")
  while not raw[entry + 46:].startswith(info.filename.encode()):
    entry = raw.index(b"PK\x01\x02", entry + 4)
  raw[entry + 20:entry + 28] = struct.pack("<II", 1 << 31, 1 << 31)
  claim = tmp_path / "claim.pth"
  claim.write_bytes(bytes(raw))
  cases["more than the file has left"] = str(claim)
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")
  cases["not in torch's zip format"] = str(legacy)
  for reason, path in cases.items():
    with pytest.raises(pth.ConversionError, match=reason):
      pth.read_torch_zip(path)
  # Records that nothing reads change nothing.
  extra = _rezip(tmp_path / "extra.pth",
                 records + [(zipfile.ZipInfo("tiny_resnet20/data/999"),
                             b"\0" * 64)])
  got, want = (pth.read_torch_zip(p)["state_dict"] for p in (extra, FIXTURE))
  assert all(np.array_equal(got[k], want[k]) for k in want)


def _pkl_span(raw: bytes):
  """Where data.pkl's bytes lie in the fixture (after its local header)."""
  with zipfile.ZipFile(FIXTURE) as z:
    info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
  start = info.header_offset
  name_len, extra_len = struct.unpack("<HH", raw[start + 26:start + 30])
  start += 30 + name_len + extra_len
  return start, start + info.compress_size


def _fuzz_cases(tmp_path, rng):
  """[(file, expect, may_refuse)] for the worker (see its docstring)."""
  with open(FIXTURE, "rb") as f:
    raw = f.read()
  original = pth.read_torch_zip(FIXTURE)["state_dict"]
  original_npz = str(tmp_path / "original.npz")
  np.savez(original_npz, **original)
  cases = []

  def add(data: bytes, expect, may_refuse=True):
    path = str(tmp_path / f"case{len(cases)}.pth")
    with open(path, "wb") as f:
      f.write(data)
    cases.append({"file": path, "expect": expect, "may_refuse": may_refuse})

  lo, hi = _pkl_span(raw)
  for span in [(lo, hi)] * 120 + [(0, len(raw))] * 120:
    data = bytearray(raw)
    for at in rng.integers(*span, size=rng.integers(1, 4)):
      data[at] ^= int(rng.integers(1, 256))
    add(bytes(data), original_npz)
  for cut in rng.integers(0, len(raw), size=40):
    add(raw[:cut], original_npz)

  # data.pkl with flipped bytes and a valid CRC: whatever it now says, the
  # reader refuses it or reads it, and never crashes.
  records = _records(FIXTURE)
  for _ in range(60):
    pkl = bytearray(records[0][1])
    for at in rng.integers(0, len(pkl), size=rng.integers(1, 4)):
      pkl[at] = int(rng.integers(0, 256))
    add(open(_rezip(tmp_path / "tmp.pth", [(records[0][0], bytes(pkl))]
                    + records[1:]), "rb").read(), "any")

  # Missing and extra records.
  for i in rng.integers(1, len(records), size=20):
    add(open(_rezip(tmp_path / "tmp.pth", records[:i] + records[i + 1:]),
             "rb").read(), original_npz)
  # One tensor of a small state_dict, edited: its offset, shape, stride and
  # its storage's claimed size drawn from in-range and hostile values.
  small = {k: original[k] for k in list(original)[:3]}
  key = "module.bn1.bias"
  values = np.ascontiguousarray(small[key]).reshape(-1)
  n = values.size
  def draw():
    return int(rng.choice([0, 1, 2, n - 1, n, n + 1, 1 << 31, 1 << 63,
                           -1, int(rng.integers(0, 2 * n))]))
  for _ in range(150):
    ndim = int(rng.integers(0, 4))
    offset = draw() if rng.random() < 0.5 else 0
    shape = tuple(draw() if rng.random() < 0.3 else int(rng.integers(0, 5))
                  for _ in range(ndim))
    stride = tuple(draw() if rng.random() < 0.3 else int(rng.integers(0, 5))
                   for _ in range(ndim))
    numel = draw() if rng.random() < 0.2 else n
    view = _expected_view(values[:max(0, min(numel, n))], offset, shape,
                          stride) if 0 <= numel <= n else None
    state = {k: torch_zip.Tensor(v) for k, v in small.items()}
    state[key] = torch_zip.Tensor(values, view=(offset, shape, stride),
                                  numel=numel)
    path = _save(tmp_path / "tmp.pth", state)
    if view is None:
      expect = "refused"
    else:
      expect = str(tmp_path / f"expected{len(cases)}.npz")
      np.savez(expect, **dict(small, **{key: view}))
    add(open(path, "rb").read(), expect, may_refuse=False)
  return cases


def test_fuzzed_files_read_exactly_or_are_refused(tmp_path):
  cases = _fuzz_cases(tmp_path, np.random.default_rng(18))
  manifest = tmp_path / "manifest.json"
  manifest.write_text(json.dumps({"memory_cap": MEMORY_CAP, "cases": cases}))
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
  proc = subprocess.run(
      [sys.executable, os.path.join(HERE, "pth_fuzz_worker.py"),
       str(manifest)], capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
  results = [json.loads(line) for line in proc.stdout.splitlines()]
  assert len(results) == len(cases)
  wrong = [(cases[r["case"]]["file"], r) for r in results
           if r["outcome"] in ("crash", "memory", "mismatch")
           or (r["outcome"] == "refused"
               and cases[r["case"]]["expect"] != "refused"
               and not cases[r["case"]]["may_refuse"])]
  assert not wrong, "\n".join(f"{c}: {r}" for c, r in wrong[:5])
  outcomes = [r["outcome"] for r in results]
  # The fuzz reaches both sides: files read exactly, and files refused.
  assert outcomes.count("equal") > 50 and outcomes.count("refused") > 200
  assert max(r["seconds"] for r in results) < 5.0
  # The worker's peak resident memory (KiB), numpy included, stayed small.
  assert results[-1]["peak_rss_kib"] < 200 * 1024
