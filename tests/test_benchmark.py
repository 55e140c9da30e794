"""The benchmark runs the real train step of tiny recipes and reports sanely.

No timing assertions: only that every column is there, positive and
consistent. Runs on the eight fake CPU devices of conftest.py, so global
batches are multiples of 8.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from ir2net_jax.train import step as step_lib
from ir2net_jax import models
from ir2net_jax.tools import benchmark
from ir2net_jax.models import costs
from ir2net_jax.backend import xla_cpu
from ir2net_jax.tools.benchmark import hardware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In-process runs start after JAX did: they keep the tests' XLA_FLAGS.
TINY = ["--tiny", "--steps=1", "--warmup=0", "--xla_cpu_flags="]
# Smaller still than --tiny (compiling dominates): stages 2-4 empty.
ONE_BLOCK = ["--config.model_kwargs.num_blocks=(1,0,0,0)",
             "--config.teacher_kwargs.num_blocks", "(1,0,0,0)"]
POSITIVE = ("compile_s", "step_s", "images_per_s", "student_macs",
            "flops_per_step", "tflops_per_s", "peak_memory_mb",
            "xla_memory_mb")


def test_recipe_config_overrides():
  c = benchmark.recipe_config(
      "ir2net_d_stage2", tiny=True,
      overrides=["--config.binary_compute_dtype=bfloat16",
                 "--config.erase_lambda=1", "--noconfig.information_recovery",
                 "--config.model_kwargs.num_blocks", "(2, 1, 1, 1)"])
  assert (c.batch_size, c.image_size, c.stage, c.num_classes) == (
      16, 32, 2, 1000)
  assert c.teacher_kwargs.num_blocks == (1, 1, 1, 1)
  assert c.model_kwargs.num_blocks == (2, 1, 1, 1)
  assert c.binary_compute_dtype == "bfloat16"
  assert c.erase_lambda == 1.0 and isinstance(c.erase_lambda, float)
  assert c.information_recovery is False
  assert benchmark.recipe_config("cifar_vgg_small", 64).batch_size == 64
  base = benchmark.recipe_config(benchmark.BASELINE)
  assert (base.model, base.loss, base.information_restriction) == (
      "float_resnet18", "cross_entropy", False)
  with pytest.raises(benchmark.UsageError, match="no field 'eras_lambda'"):
    benchmark.recipe_config("cifar_resnet20",
                            overrides=["--config.eras_lambda=0.1"])
  with pytest.raises(benchmark.UsageError, match="erase_lambda=abc"):
    benchmark.recipe_config("cifar_resnet20",
                            overrides=["--config.erase_lambda=abc"])
  with pytest.raises(benchmark.UsageError, match="unknown recipe"):
    benchmark.recipe_config("resnet50")


def test_command_line_errors_before_compiling():
  for argv, match in (
      (["--per_device_batch=2", "--batch_size=16"], "both set"),
      (["--stesp=3"], "unknown flag"),
      (["stray"], "unknown flag or argument 'stray'"),
      (["--recipes=resnet50"], "unknown recipes"),
      (["--steps=0"], "steps"),
      (["--recipes=cifar_resnet20", "--batch_size=12", "--skip_pipeline",
        "--xla_cpu_flags="], "not divisible by the 8 devices"),
  ):
    with pytest.raises(benchmark.UsageError, match=match):
      benchmark.main(argv)


def test_float_resnet_is_torchvision_resnet18():
  model = models.create_model("float_resnet18", num_classes=1000,
                              information_recovery=True, zero_to_one=False)
  assert tuple(model.num_blocks) == (2, 2, 2, 2)
  # 1.82 GMAC (torchvision's resnet18 at 224px), all real-valued.
  summary = costs.summarize(model, (1, 224, 224, 3))
  assert summary.bops == 0 and abs(summary.flops / 1.8e9 - 1) < 0.02


def test_peaks_and_mfu():
  h100 = "NVIDIA H100 80GB HBM3"
  assert hardware.peak_flops(h100, "bfloat16") == 989.4e12
  assert hardware.peak_flops(h100, "float32") == 494.7e12   # TF32
  assert hardware.peak(h100).f32_full == 66.9e12
  assert hardware.peak_flops("NVIDIA H200", "bfloat16") == 989.4e12
  assert hardware.peak_flops("NVIDIA GH200 480GB", "bfloat16") == 989.4e12
  assert hardware.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert hardware.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert hardware.peak_flops("TPU v5", "bfloat16") == 459e12       # v5p
  assert hardware.peak_flops("TPU v4", "float32") == 275e12
  assert hardware.peak_flops("cpu", "bfloat16") is None
  assert hardware.mfu(989.4e12, 2.0, h100, "bfloat16", 1) == 0.5
  assert hardware.mfu(494.7e12, 1.0, h100, "float32", 2) == 0.5
  assert hardware.mfu(1e12, 1.0, "cpu", "float32", 1) is None


def test_xla_memory_figure():
  x = jnp.ones((1000,), jnp.float32)                     # 4000 bytes
  donated = jax.jit(lambda x: x * 2, donate_argnums=0).lower(x).compile()
  m = hardware.xla_memory_mb(donated)
  assert (m["xla_argument_mb"], m["xla_output_mb"], m["xla_alias_mb"]) == (
      0.004, 0.004, 0.004)
  assert m["xla_memory_mb"] == pytest.approx(0.004 + m["xla_temp_mb"])
  kept = hardware.xla_memory_mb(jax.jit(lambda x: x * 2).lower(x).compile())
  assert kept["xla_alias_mb"] == 0 and kept["xla_memory_mb"] == (
      pytest.approx(0.008 + kept["xla_temp_mb"]))


def test_step_flops():
  c = benchmark.recipe_config("ir2net_a_stage1", batch_size=8, tiny=True)
  student = step_lib.build_model(c, 1000)
  teacher = models.create_model("teacher_resnet34", num_classes=1000,
                                num_blocks=(1, 1, 1, 1))
  f = benchmark.train_step_flops(c, student, teacher)
  assert f["student_macs"] > 0 and f["teacher_macs"] > 0
  assert f["flops_per_step"] == 8 * (12 * f["student_macs"]
                                     + 2 * f["teacher_macs"])
  c.information_restriction = False
  assert benchmark.train_step_flops(c, student)["flops_per_step"] == (
      8 * 6 * f["student_macs"])


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory):
  """IR2Net-A stage 2 (teacher included) and the float ResNet-18 baseline,
  one block each, per-device batch 1 on the 8 devices, profiled."""
  profile = tmp_path_factory.mktemp("profile")
  result = benchmark.main(
      [f"--recipes=ir2net_a_stage2,{benchmark.BASELINE}", *TINY,
       *ONE_BLOCK, "--per_device_batch=1", f"--profile={profile}",
       "--profile_steps=1", "--skip_pipeline", "--skip_inference", "--json"])
  return result["rows"], profile


@pytest.mark.slow
def test_imagenet_rows_ratio_and_memory(imagenet_run):
  (row, base), _ = imagenet_run
  assert (row["recipe"], row["stage"], row["image_size"]) == (
      "ir2net_a_stage2", 2, 32)
  for r in (row, base):
    assert (r["batch"], r["per_device_batch"], r["devices"]) == (8, 1, 8)
    for key in POSITIVE:
      assert r[key] > 0, key
    assert r["xla_memory_mb"] == pytest.approx(
        r["xla_argument_mb"] + r["xla_output_mb"] + r["xla_temp_mb"]
        - r["xla_alias_mb"])
    assert r["inference_images_per_s"] is None and r["mfu"] is None
  assert row["teacher_macs"] > 0 and base["teacher_macs"] == 0
  # One pass and no teacher: 6 forward MACs' worth of FLOPs per image.
  assert base["flops_per_step"] == 8 * 6 * base["student_macs"]
  assert base["vs_float_resnet18"] == 1.0
  assert row["vs_float_resnet18"] == pytest.approx(
      row["images_per_s"] / base["images_per_s"])
  table = benchmark.format_table(benchmark.report.environment(), [row, base])
  assert "/R18" in table.splitlines()[4] and "MFU %" in table


def test_profile_is_a_tensorboard_trace(imagenet_run):
  _, profile = imagenet_run
  for recipe in ("ir2net_a_stage2", benchmark.BASELINE):
    traces = [f for _, _, files in os.walk(profile / recipe) for f in files
              if f.endswith(".xplane.pb")]
    assert traces, recipe


def test_from_json_merges_runs_and_recomputes_ratio(imagenet_run, tmp_path,
                                                    capsys):
  (row, base), _ = imagenet_run
  env = {"device_kind": "cpu", "platform": "cpu", "local_devices": 8,
         "jax_version": jax.__version__, "xla_flags": "", "host_cpus": 2,
         "peak_memory_source": "process peak RSS"}
  paths = []
  for i, r in enumerate((dict(row, vs_float_resnet18=None),
                         dict(base, images_per_s=2 * row["images_per_s"]))):
    paths.append(tmp_path / f"{i}.json")
    paths[-1].write_text(json.dumps(
        {"environment": env, "rows": [r], "pipelines": []}))
  result = benchmark.main([f"--from_json={paths[0]},{paths[1]}"])
  assert [r["vs_float_resnet18"] for r in result["rows"]] == [0.5, 1.0]
  assert "0.50" in capsys.readouterr().out


@pytest.mark.slow
def test_remat_lowers_the_xla_memory_figure():
  """At 96x96 the activations of 8 images per device are large enough next
  to the tiny model's weight gradients for recomputing the residual blocks
  to show in XLA:CPU's temporary memory (at 64x64 with 4 images, Eigen's
  convolutions leave it unchanged; on a GPU, IR2Net-A at 256 per device
  drops from 9.1 to 5.6 GB)."""
  memory = {}
  for remat in (False, True):
    (row,) = benchmark.main(
        ["--recipes=ir2net_a_stage1", *TINY, "--per_device_batch=8",
         "--image_size=96", f"--remat={str(remat).lower()}",
         "--skip_pipeline", "--skip_inference", "--json"])["rows"]
    assert row["remat"] is remat
    memory[remat] = row["xla_temp_mb"]
  assert memory[True] < memory[False]


@pytest.mark.slow
def test_cifar_with_input_pipelines(capsys):
  torch_before = "torch" in sys.modules
  result = benchmark.main(["--recipes=cifar_resnet20", *TINY,
                           "--batch_size=8", "--json",
                           "--config.erase_lambda=0.2", "--image_size=32",
                           "--pipeline_examples=32"])
  out = json.loads(capsys.readouterr().out)   # stdout is only the JSON
  assert out == json.loads(json.dumps(result))
  assert out["environment"]["local_devices"] == 8
  (row,) = out["rows"]
  assert (row["recipe"], row["batch"], row["devices"]) == (
      "cifar_resnet20", 8, 8)
  for key in POSITIVE + ("inference_images_per_s",):
    assert row[key] > 0, key
  assert row["teacher_macs"] == 0 and row["vs_float_resnet18"] is None
  assert [p["pipeline"] for p in out["pipelines"]] == [
      "imagenet_train", "digits_train", "digits_device"]
  assert all(p["images_per_s"] > 0 for p in out["pipelines"])
  if not torch_before:
    assert "torch" not in sys.modules


# Importing tensorflow (or tfds) fails in this process, as on a GPU image or
# a Colab TPU runtime without TensorFlow.
_NO_TENSORFLOW = textwrap.dedent("""\
    import runpy, sys
    class NoTensorFlow:
      def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "tensorflow_datasets"):
          raise ImportError(f"{name} is not installed here")
    sys.meta_path.insert(0, NoTensorFlow())
    sys.argv = ["benchmark"] + sys.argv[1:]
    runpy.run_module("ir2net_jax.tools.benchmark", run_name="__main__")
    assert not any(m.startswith("tensorflow") for m in sys.modules)
    """)


@pytest.mark.slow
def test_train_step_benchmark_runs_without_tensorflow():
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
  cmd = [sys.executable, "-c", _NO_TENSORFLOW,
         f"--recipes={benchmark.BASELINE}", *TINY, *ONE_BLOCK,
         "--batch_size=2", "--skip_inference", "--json"]
  refused = subprocess.run(cmd, env=env, capture_output=True, text=True,
                           timeout=300)
  assert refused.returncode != 0
  assert "needs TensorFlow" in refused.stderr and "--skip_pipeline" in (
      refused.stderr)
  run = subprocess.run(cmd + ["--skip_pipeline"], env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  (row,) = json.loads(run.stdout)["rows"]
  assert row["recipe"] == benchmark.BASELINE and row["images_per_s"] > 0


@pytest.mark.slow
def test_command_line_runs_each_recipe_under_its_auto_xla_flags():
  """``python -m ir2net_jax.tools.benchmark`` as users run it: recipes whose 'auto'
  flags differ run in their own processes, and each row says which."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  run = subprocess.run(
      [sys.executable, "-m", "ir2net_jax.tools.benchmark",
       "--recipes=cifar_resnet20,ir2net_a_stage2", "--tiny", "--batch_size=4",
       "--steps=1", "--warmup=0", "--json", "--skip_pipeline",
       "--skip_inference"],
      env=env, capture_output=True, text=True, timeout=900, check=True)
  out = json.loads(run.stdout)
  cifar, imagenet = out["rows"]
  assert (cifar["recipe"], imagenet["recipe"]) == ("cifar_resnet20",
                                                   "ir2net_a_stage2")
  assert cifar["xla_flags"].split() == [xla_cpu.EIGEN_CONV_FLAGS]
  assert cifar["devices"] == 1
  two_cores = len(os.sched_getaffinity(0)) >= 2
  assert (xla_cpu.DATA_PARALLEL_FLAGS in imagenet["xla_flags"].split()
          ) == two_cores
  assert imagenet["devices"] == (2 if two_cores else 1)
  for row in out["rows"]:
    assert row["images_per_s"] > 0
  table = benchmark.format_table(out["environment"], out["rows"], [])
  assert "XLA_FLAGS for ir2net_a_stage2: " in table


@pytest.mark.slow
def test_decoders_table(capsys):
  from ir2net_jax.tools.benchmark import decoders  # pylint: disable=g-import-not-at-top
  rows = decoders.main(["--examples=16", "--workers=1,2", "--image_size=64"])
  table = capsys.readouterr().out
  assert [r["decoder"] for r in rows] == [
      "tf.data", "pil_full", "pil", "simplejpeg", "simplejpeg, device finish",
      "simplejpeg, device resize", "grain engine",
      "grain engine, device resize"]
  for r in rows:
    assert r["images_per_s_1_workers"] > 0 and r["images_per_s_2_workers"] > 0
    assert r["cores_for_float_resnet18"] == pytest.approx(
        14_000 / r["images_per_s_per_core"])
    assert f"| {r['decoder']} |" in table


def test_loop_rate_and_input_wait_from_a_runs_scalars(tmp_path):
  """The loop's img/s is steps over their wall time (intervals weighted by
  their length, the compiling first step left out), and so is the wait."""
  from ir2net_jax.tools.benchmark import loop  # pylint: disable=g-import-not-at-top
  from ir2net_jax.train import metric_writer  # pylint: disable=g-import-not-at-top
  writer = metric_writer.MetricWriter(str(tmp_path))
  # Steps 2..11 at 2 steps/s (5 s, 20% waiting), 12..41 at 10 steps/s (3 s,
  # no waiting).
  writer.write_scalars(11, {"steps_per_sec": 2.0, "input_wait_fraction": 0.2})
  writer.write_scalars(41, {"steps_per_sec": 10.0, "input_wait_fraction": 0.0})
  writer.close()
  got = loop.loop_images_per_s(str(tmp_path), batch_size=8)
  assert got["loop_images_per_s"] == pytest.approx(40 * 8 / 8.0)
  assert got["input_wait_fraction"] == pytest.approx(0.2 * 5 / 8.0)


@pytest.mark.slow
def test_loop_benchmark_runs_the_loop_and_the_step(tmp_path, capsys):
  from ir2net_jax.tools.benchmark import loop  # pylint: disable=g-import-not-at-top
  import train_utils  # pylint: disable=g-import-not-at-top
  config = train_utils.light_digits_config(
      str(tmp_path / "tfds"), restriction_images=0,
      diagnostics=False)   # compile less
  row = loop.benchmark_loop(config, steps=6, workdir=str(tmp_path / "run"))
  assert row["input_engine"] == "device" and row["steps"] == 6
  assert row["step_images_per_s"] > 0 and row["loop_images_per_s"] > 0
  assert 0 <= row["input_wait_fraction"] <= 1
  assert row["loop_over_step"] == pytest.approx(
      row["loop_images_per_s"] / row["step_images_per_s"])
  assert os.path.exists(tmp_path / "run" / "summary.json")
  assert row["resize_images_per_s"] is None   # no windows to resize
  assert "| digits_resnet20 | device | 16 | 6 |" in loop.format_row(row)
  assert "| - |" in loop.format_row(row)


def test_loop_benchmark_times_the_devices_resize_where_it_runs():
  """Where the grain engine leaves the windows' resize to the devices, the
  row times it alone; elsewhere it has none."""
  from ir2net_jax.configs import digits  # pylint: disable=g-import-not-at-top
  from ir2net_jax.tools.benchmark import loop  # pylint: disable=g-import-not-at-top
  from ir2net_jax.train import parallel  # pylint: disable=g-import-not-at-top
  config = digits.get_config("smoke")
  config.update(dict(dataset="folder:/nowhere", augment="imagenet",
                     input_engine="grain", image_size=32, batch_size=8,
                     input_resize="device"))
  mesh = parallel.data_mesh(jax.devices()[:2])
  assert loop.resize_images_per_s(config, mesh, repeats=3) > 0
  config.input_resize = "host"
  assert loop.resize_images_per_s(config, mesh) is None
