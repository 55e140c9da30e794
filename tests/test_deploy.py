"""Inference as bits (``ir2net_jax.deploy``): the native kernel's build and
fallback (its sums on every instruction set are test_bits'), packed models
against the reference's logits, the packed file (sizes, refusals),
``ir2net-eval --packed`` and the jax.export artifact that runs without this
package."""

import json
import os
import subprocess
import sys

import flax.linen as nn
from flax import serialization, traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import reference_fixtures as rf
import sign_margins
import train_utils
from ir2net_jax import configs, models
from ir2net_jax.deploy import (bits, export, fold, load, native,
                                native_build, packed)
from ir2net_jax.nn import layers
from ir2net_jax.train import step

# The kernel is C++ compiled at install or on first use; CI machines have
# g++. Without a compiler the native tests say so and the pure-JAX ones
# still run.
needs_native = pytest.mark.skipif(
    native_build.compiler() is None,
    reason="no C++ compiler: the native kernel cannot be built")

# Binary-weight models of the reference's fixtures (stage 1 has none).
PACKABLE = [n for n in rf.fixture_ids()
            if n.startswith("cifar_") or n.endswith("_step2")]


@needs_native
def test_the_kernel_builds_and_names_this_cpus_instruction_set():
  assert native.available(), native.unavailable_reason()
  assert native.best_isa() in native.ISAS
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    flags = f.read()
  if "avx512_vpopcntdq" in flags and "avx512f" in flags:
    assert native.best_isa() == "avx512"
  elif " avx2" in flags:
    assert native.best_isa() == "avx2"
  # The library pip compiled into the package where there is one (the
  # editable install of requirements.txt), else the first-use build.
  packaged = native_build.packaged_library()
  assert native.library() == (
      packaged if os.path.exists(packaged)
      else native._cached_library())  # pylint: disable=protected-access


@needs_native
def test_an_instruction_set_this_cpu_lacks_is_an_error():
  if native.best_isa() == "avx512":
    pytest.skip("this CPU has every instruction set the kernel knows")
  x = bits.pack(jnp.ones((1, 4, 4, 8)))
  w = bits.pack_kernel(jnp.ones((3, 3, 8, 2)))
  with pytest.raises(Exception, match="lacks the instruction set"):
    jax.block_until_ready(native.conv2d(x, w, 1, 1, "avx512"))


@needs_native
def test_no_compiler_falls_back_to_pure_jax_with_one_line(monkeypatch,
                                                          tmp_path, caplog):
  monkeypatch.setenv("CXX", "/nonexistent/c++")
  monkeypatch.setenv("PATH", str(tmp_path))       # no c++, g++, clang++
  monkeypatch.setenv("IR2NET_JAX_CACHE", str(tmp_path / "cache"))
  # Nor a library compiled at install (an editable install's, in the tree).
  monkeypatch.setattr(native_build, "packaged_library",
                      lambda: str(tmp_path / "none.so"))
  native._load.cache_clear()  # pylint: disable=protected-access
  try:
    assert not native.available()
    assert "no C++ compiler" in native.unavailable_reason()
    assert "pure-JAX path" in caplog.text
    assert packed.convolution("auto") is packed.convolution("jax")
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler"):
      packed.convolution("native")
  finally:
    native._load.cache_clear()  # pylint: disable=protected-access
  assert not os.path.exists(tmp_path / "cache")


@needs_native
def test_a_package_library_that_does_not_load_is_compiled_again(
    monkeypatch, tmp_path, caplog):
  """E.g. a wheel's library, compiled against an XLA FFI that this jaxlib
  no longer accepts: one line says so and the kernel is compiled for this
  jaxlib on first use."""
  broken = tmp_path / "binary_conv-0123456789abcdef.so"
  broken.write_bytes(b"not a shared library")
  monkeypatch.setattr(native_build, "packaged_library", lambda: str(broken))
  monkeypatch.setenv("IR2NET_JAX_CACHE", str(tmp_path / "cache"))
  native._load.cache_clear()  # pylint: disable=protected-access
  try:
    assert native.available(), native.unavailable_reason()
    assert f"the native kernel built at install ({broken}) does not load" in (
        caplog.text)
    cached = native._cached_library()  # pylint: disable=protected-access
    assert native.library() == cached
    assert os.path.dirname(cached) == str(tmp_path / "cache")
  finally:
    native._load.cache_clear()  # pylint: disable=protected-access


@pytest.mark.parametrize("name", PACKABLE)
def test_packed_fixture_models_give_the_references_top1(name):
  """Each binary-weight reference model with its binary convolutions on
  bits: logits equal the float port's within float32 rounding, and each
  input's top-1 class is the reference's, on both paths."""
  fx = rf.load(os.path.join(rf.FIXTURE_DIR, name + ".npz"))
  model = fx.model()
  variables = fx.variables(np.float32)
  x = jnp.asarray(fx.nhwc("input"))
  size = x.shape[1]
  kernels_ = packed.pack_kernels(model, variables, size)
  folds = fold.fold_batch_norms(model, variables, size)
  # A BatchNorm that takes a convolution's output as it is, is folded; VGG
  # pools between some of its convolutions and BatchNorms.
  assert folds and set(folds) <= set(kernels_)
  if not name.startswith("cifar_vgg"):
    assert set(folds) == set(kernels_)
  float_logits = np.asarray(jax.jit(
      lambda v, x: model.apply(v, x, train=False)[0])(variables, x))
  reference = fx.data["eval_logits"]
  # The pure-JAX path with every BatchNorm as it is, the native kernel (or
  # pure JAX without one) with them folded in.
  ways = [("jax", None), ("native" if native.available() else "jax", folds)]
  for how, folded in ways:
    got = np.asarray(jax.jit(lambda v, k, f, x, how=how: packed.apply_packed(
        model, v, k, x, how, f)[0])(variables, kernels_, folded, x))
    assert rf.rel(got, float_logits) < 1e-5, how
    np.testing.assert_array_equal(got.argmax(-1), reference.argmax(-1))


def _digits_model():
  config = configs.get_config("digits:smoke")
  model = step.build_model(config, 10)
  variables = models.init_variables(model, config.image_size, 3)
  return config, model, variables


def test_packed_file_round_trip_and_sizes(tmp_path):
  config, model, variables = _digits_model()
  data = export.encode(config, model, variables, num_classes=10,
                       class_names=[f"digit {i}" for i in range(10)], step=7)
  path = tmp_path / "m.packed"
  path.write_bytes(data)
  loaded = load.load_packed(str(path))
  assert loaded.class_names[3] == "digit 3" and loaded.step == 7
  assert loaded.num_classes == 10 and loaded.image_size == 32
  # 1 bit per binary weight (dense kernels store no nonzero plane).
  binary = sum(k.channels * k.kernel_size ** 2 * k.out_channels
               for k in loaded.kernels.values())
  floats = export.float32_bytes(variables) - 4 * binary
  assert len(data) < floats + binary / 8 + 16384
  assert all(k.dense for k in loaded.kernels.values())
  # Each BatchNorm after a binary convolution is folded into it and its
  # own variables are left out.
  assert set(loaded.folds) == set(loaded.kernels)
  kept = {path[1:len(f.batch_norm) + 1]
          for path in traverse_util.flatten_dict(loaded.variables)
          for f in loaded.folds.values()}
  assert not {f.batch_norm for f in loaded.folds.values()} & kept
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  want = model.apply(variables, x, train=False)[0]
  assert rf.rel(loaded(x), want) < 1e-5
  small = export.encode(config, model, variables, num_classes=10,
                        float_dtype="bfloat16")
  assert len(small) < 0.8 * len(data)
  # bfloat16 float layers are the float32 ones rounded (which moves the
  # binary activations' signs: a lossy option, checked with ir2net-eval).
  rounded = load.decode(small)
  for got, full in zip(jax.tree.leaves(rounded.variables),
                       jax.tree.leaves(loaded.variables)):
    np.testing.assert_array_equal(
        got, np.asarray(full).astype(jnp.bfloat16).astype(np.float32))
  assert rounded(x).shape == (3, 10)


def test_bfloat16_head_rounds_only_what_no_binary_convolution_reads():
  config, model, variables = _digits_model()
  rng = np.random.default_rng(5)   # BatchNorms off their initial 1 and 0
  variables = jax.tree.map(
      lambda v: v * (1 + 0.1 * rng.random(v.shape, np.float32))
      + 0.1 * rng.random(v.shape, np.float32), variables)
  head = packed.head_modules(model, variables, config.image_size)
  data = export.encode(config, model, variables, num_classes=10,
                       float_dtype="bfloat16_head")
  stored = traverse_util.flatten_dict(
      serialization.msgpack_restore(data)["variables"])
  dtypes = {key[1:-1]: value.dtype for key, value in stored.items()}
  assert {m for m, d in dtypes.items() if d == jnp.bfloat16} == head & set(
      dtypes)
  assert {m for m, d in dtypes.items() if d != jnp.bfloat16} == (
      set(dtypes) - head)
  assert ("linear",) in head and ("conv1",) not in head
  # What no binary convolution reads: the head changed far more than bfloat16
  # rounds it leaves every binary convolution's sums exactly as they were.
  in_head = lambda p: tuple(k.key for k in p[1:-1]) in head
  moved = jax.tree_util.tree_map_with_path(
      lambda p, v: 1.5 * v + 0.5 if in_head(p) else v, variables)
  apply = jax.jit(lambda v, x: model.apply(
      v, x, train=False, capture_intermediates=lambda m, _: isinstance(
          m, layers.BinaryConv), mutable=["intermediates"]))
  x = jax.random.normal(jax.random.key(4), (3, 32, 32, 3))
  (want, _), sums = apply(variables, x)
  (other, _), moved_sums = apply(moved, x)
  assert len(jax.tree.leaves(sums)) == len(packed.pack_kernels(
      model, variables, config.image_size))
  for a, b in zip(jax.tree.leaves(sums), jax.tree.leaves(moved_sums)):
    np.testing.assert_array_equal(a, b)
  assert rf.rel(other, want) > 0.1
  # The file computes the model with its head rounded to bfloat16.
  rounded = jax.tree_util.tree_map_with_path(
      lambda p, v: v.astype(jnp.bfloat16).astype(jnp.float32)
      if in_head(p) else v, variables)
  got = apply(rounded, x)[0][0]
  assert 0 < rf.rel(got, want) < 1e-2
  # Two float32 programs (packed and float) agree only where no binary
  # activation's input lies within float32 rounding of zero (sign_margins,
  # measured in float64). Holds for this seed, with 13 times the bound.
  with jax.enable_x64(True):
    assert sign_margins.clears_rounding(sign_margins.activation_inputs(
        model, jax.tree.map(lambda a: np.asarray(a, np.float64), rounded),
        np.asarray(x, np.float64), train=False)), "choose another seed"
  assert rf.rel(load.decode(data, how="jax")(x), got) < 1e-4


def test_ir2net_a_is_ten_times_smaller_with_its_head_in_bfloat16():
  """IR2Net-A stage 2's file against its float32 variables (their values do
  not change the sizes: random ones, shaped by the model)."""
  model = models.create_model("ir2net_a", stage=2)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, s: (np.abs(rng.standard_normal(s.shape)) + 0.5).astype(
          np.float32), jax.eval_shape(lambda: models.init_variables(
              model, 224, 0)))
  ratios = {dtype: export.float32_bytes(variables) / len(export.encode(
      None, model, variables, num_classes=1000, image_size=224,
      float_dtype=dtype)) for dtype in export.FLOAT_DTYPES}
  # float32: its 1.25 M float parameters (CIRec's fusion, the classifier,
  # the shortcuts) outweigh its 11 M binary weights (docs/deploy.md).
  assert 7.5 < ratios["float32"] < 8
  assert ratios["bfloat16_head"] > 11
  assert ratios["bfloat16"] > 12.5


def test_zero_weights_keep_their_plane_and_stay_exact():
  config, model, variables = _digits_model()
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.where(jnp.abs(v) < 0.05, 0.0, v)
      if "kernel" in jax.tree_util.keystr(p) else v, variables)
  data = export.encode(config, model, variables, num_classes=10)
  loaded = load.decode(data, how="jax")
  assert not all(k.dense for k in loaded.kernels.values())
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  assert rf.rel(loaded(x), model.apply(variables, x, train=False)[0]) < 1e-5


class _OwnModel(nn.Module):
  """A model of a user's own: a float stem, two BinaryConvs, a classifier."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3))(x)
    x = layers.BinaryConv(40)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = layers.BinaryConv(8, strides=2)(x)
    return nn.Dense(4)(x.mean((1, 2))), x


def test_a_model_of_your_own_exports_and_loads_with_its_module(tmp_path):
  model = _OwnModel()
  x = jax.random.normal(jax.random.key(4), (3, 12, 12, 3))
  variables = model.init(jax.random.key(5), x)
  path = tmp_path / "own.packed"
  path.write_bytes(export.encode(None, model, variables, num_classes=4,
                                 image_size=12))
  with pytest.raises(packed.PackError, match="pass model="):
    load.load_packed(str(path))
  loaded = load.load_packed(str(path), model=_OwnModel())
  assert loaded.config is None and loaded.image_size == 12
  assert len(loaded.kernels) == 2
  want = model.apply(variables, x, train=False)[0]
  assert rf.rel(loaded(x), want) < 1e-5
  assert np.std(np.asarray(want)) > 0


def test_what_cannot_be_packed_or_read_is_refused(tmp_path):
  config = configs.get_config("imagenet:a")
  model = models.create_model("ir2net_a", stage=1, num_blocks=(1, 1, 1, 1))
  variables = models.init_variables(model, 64, 0)
  config.image_size = 64
  with pytest.raises(packed.PackError, match="real weights"):
    export.encode(config, model, variables, num_classes=1000)
  junk = tmp_path / "junk.packed"
  junk.write_bytes(b"\x00not a model" * 10)
  with pytest.raises(packed.PackError, match="not a packed model"):
    load.load_packed(str(junk))
  _, m, v = _digits_model()
  document = export.document(configs.get_config("digits:smoke"), m, v,
                             num_classes=10)
  document["version"] = 99
  from flax import serialization  # pylint: disable=g-import-not-at-top
  old = tmp_path / "future.packed"
  old.write_bytes(serialization.msgpack_serialize(document))
  with pytest.raises(packed.PackError, match="version 99.*export it again"):
    load.load_packed(str(old))
  with pytest.raises(packed.PackError, match="convolution='gpu'"):
    load.decode(export.encode(configs.get_config("digits:smoke"), m, v,
                              num_classes=10), how="gpu")


def test_stablehlo_artifact_runs_where_the_package_cannot_be_imported(
    tmp_path):
  from ir2net_jax.deploy import stablehlo  # pylint: disable=g-import-not-at-top
  config, model, variables = _digits_model()
  loaded = load.decode(export.encode(config, model, variables,
                                     num_classes=10))
  (tmp_path / "m.stablehlo").write_bytes(
      stablehlo.serialize(loaded, ("cpu", "cuda", "tpu")))
  x = np.asarray(jax.random.normal(jax.random.key(2), (5, 32, 32, 3)))
  np.save(tmp_path / "x.npy", x)
  script = (
      "import importlib.util, sys\n"
      # Whether or not the package is installed here, it cannot be imported.
      "class Refuse:\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.partition('.')[0] == 'ir2net_jax':\n"
      "      raise ModuleNotFoundError(name)\n"
      "sys.meta_path.insert(0, Refuse())\n"
      "import jax, numpy as np\n"
      "assert 'ir2net_jax' not in sys.modules\n"
      "e = jax.export.deserialize(bytearray(open('m.stablehlo','rb').read()))\n"
      "assert set(e.platforms) == {'cpu', 'cuda', 'tpu'}, e.platforms\n"
      "x = np.load('x.npy')\n"
      "np.save('y.npy', np.asarray(e.call(x)))\n"
      "np.save('y2.npy', np.asarray(e.call(x[:2])))\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                        env=dict(env, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  want = np.asarray(loaded(x))
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / "y2.npy"), want[:2],
                             rtol=1e-5, atol=1e-5)


def test_auto_lowers_for_gpu_and_tpu_without_the_cpu_kernel():
  """``how='auto'`` picks the pure-JAX path when lowered for a GPU or a TPU
  (what an accelerator would run, checked with ``jax.export``), and the
  native kernel when lowered for a CPU where it is built."""
  config, model, variables = _digits_model()
  loaded = load.decode(export.encode(config, model, variables,
                                     num_classes=10))
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  # The kernel's custom calls have no jax.export compatibility guarantee,
  # which export checks (it would refuse them, not lower them differently).
  ours = [jax.export.DisabledSafetyCheck.custom_call(t) for t in (
      native.TARGET, native.FOLDED_TARGET, native.PACK_TARGET)]
  text = lambda platform: jax.export.export(
      jax.jit(lambda x: loaded.apply(loaded.state, x)),
      platforms=(platform,), disabled_checks=ours)(images).mlir_module()
  for platform in ("cuda", "tpu"):
    module = text(platform)
    assert "custom_call @ir2net" not in module, platform
    assert "stablehlo.popcnt" in module, platform
  if native.available():
    module = text("cpu")
    assert f"custom_call @{native.FOLDED_TARGET}" in module
    assert f"custom_call @{native.PACK_TARGET}" in module


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_dir):
  workdir = tmp_path_factory.mktemp("deploy") / "run"
  p = train_utils.launch(workdir, f"--config.data_dir={digits_dir}")
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out.decode()[-3000:]
  return workdir


def _tool(name, *args):
  return subprocess.run(
      [sys.executable, "-m", f"ir2net_jax.tools.{name}", *args],
      cwd=train_utils.ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=train_utils.ROOT))


@pytest.mark.slow
def test_export_then_eval_packed_gives_the_runs_top1(digits_run, tmp_path):
  """``ir2net-export`` then ``ir2net-eval --packed`` on both paths: the
  whole digits test set's top-1 and top-5 equal the float checkpoint's."""
  output = tmp_path / "out" / "digits.packed"
  done = _tool("export", f"--checkpoint={digits_run}/best",
               f"--output={output}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "binary convolutions as bits" in done.stdout
  assert "x smaller" in done.stdout and output.exists()
  results = {}
  for name, args in [("float", [f"--checkpoint={digits_run}/best"]),
                     ("jax", [f"--packed={output}", "--convolution=jax"]),
                     ("auto", [f"--packed={output}"])]:
    done = _tool("eval", *args, f"--output={tmp_path / name}.json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    results[name] = json.loads((tmp_path / f"{name}.json").read_text())
  for name in ("jax", "auto"):
    for key in ("top1", "top5", "count"):
      assert results[name][key] == results["float"][key], (name, key)
  assert results["float"]["count"] == 360
  # ir2net-predict --packed: the checkpoint's probabilities, and pictures.
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(
        images / f"d{i}.png")
  answers = {}
  for name, source in [("float", f"--checkpoint={digits_run}/best"),
                       ("packed", f"--packed={output}")]:
    done = _tool("predict", source, f"--images={images}", "--json",
                 "--top_k=3", f"--pictures={tmp_path / name}.png")
    assert done.returncode == 0, done.stderr[-3000:]
    answers[name] = json.loads(done.stdout)["predictions"]
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
  for a, b in zip(answers["float"], answers["packed"]):
    np.testing.assert_allclose([t["probability"] for t in a["top"]],
                               [t["probability"] for t in b["top"]],
                               rtol=1e-5)
  # --format=stablehlo: the packed model's logits, from jax alone.
  artifact = tmp_path / "digits.stablehlo"
  done = _tool("export", f"--checkpoint={digits_run}/best",
               f"--output={artifact}", "--format=stablehlo",
               "--platforms=cpu")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "jax.export for cpu" in done.stdout
  exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
  x = np.asarray(jax.random.normal(jax.random.key(3), (2, 32, 32, 3)))
  np.testing.assert_allclose(exported.call(x), load.load_packed(
      str(output))(x), rtol=1e-5, atol=1e-5)
  neither = _tool("eval")
  assert neither.returncode != 0 and "--packed=FILE" in neither.stderr
  stage1 = _tool("export", f"--checkpoint={digits_run}/best",
                 f"--output={tmp_path / 'x.packed'}", "--config=imagenet:a",
                 "--config.image_size=64")
  assert stage1.returncode != 0 and "export the stage-2 run" in stage1.stderr


def test_benchmark_rows_time_every_path(monkeypatch, capsys):
  from ir2net_jax.tools.benchmark import bits as bench  # pylint: disable=g-import-not-at-top
  from ir2net_jax.tools.benchmark import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(bench, "LAYERS", ((32, 6), (64, 4)))
  rows = bench.benchmark([2], 1, ("portable",), "cifar_resnet20", 1,
                         image_size=32, num_blocks=(1, 1, 1))
  assert [r["layer"] for r in rows] == ["32@6x6", "64@4x4", "cifar_resnet20"]
  paths = {"float32", "int8", "jax bits"} | (
      {"native", "native portable"} if native.available() else set())
  assert set(rows[0]) - {"batch", "layer"} == paths
  assert set(rows[-1]) - {"batch", "layer"} == (
      {"float32", "jax bits"} | ({"native"} if native.available() else set()))
  assert all(v > 0 for r in rows for k, v in r.items() if k != "layer")
  text = bench.table(rows, bench.cpu())
  assert text.startswith("CPU: ") and "| 2 | cifar_resnet20 |" in text
  cli.main(["--bits", "--batches=1", "--repeats=1", "--network="])
  out = capsys.readouterr().out
  assert "| batch | layer | float32 ms (vs float32)" in out
  assert len([l for l in out.splitlines() if l.startswith("| 1 |")]) == len(
      bench.LAYERS)
