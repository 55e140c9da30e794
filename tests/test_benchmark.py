"""The benchmark runs the real train step of tiny recipes and reports sanely.

No timing assertions: only that every column is there and positive. Runs on
the eight fake CPU devices of conftest.py, so batches are multiples of 8.
"""

import json
import os
import subprocess
import sys

import pytest

from ir2net_jax import benchmark, models, train, xla_cpu

# In-process runs start after JAX did: they keep the tests' XLA_FLAGS.
TINY = ["--tiny", "--batch_size=8", "--steps=2", "--warmup=1",
        "--xla_cpu_flags="]
POSITIVE = ("compile_s", "step_s", "images_per_s", "student_macs",
            "flops_per_step", "tflops_per_s", "peak_memory_mb")


def test_recipe_config_overrides():
  c = benchmark.recipe_config(
      "ir2net_d_stage2", tiny=True,
      overrides=["binary_compute_dtype=bfloat16", "erase_lambda=1",
                 "information_recovery=false",
                 "model_kwargs.num_blocks=[2, 1, 1, 1]"])
  assert (c.batch_size, c.image_size, c.stage) == (16, 32, 2)
  assert c.teacher_kwargs.num_blocks == (1, 1, 1, 1)
  assert c.model_kwargs.num_blocks == (2, 1, 1, 1)
  assert c.binary_compute_dtype == "bfloat16"
  assert c.erase_lambda == 1.0 and isinstance(c.erase_lambda, float)
  assert c.information_recovery is False
  assert benchmark.recipe_config("cifar_vgg_small", 64).batch_size == 64
  with pytest.raises(ValueError, match="no field"):
    benchmark.recipe_config("cifar_resnet20", overrides=["eras_lambda=0.1"])
  with pytest.raises(ValueError, match="unknown recipe"):
    benchmark.recipe_config("resnet50")


def test_peak_flops_and_step_flops():
  assert benchmark.peak_flops("NVIDIA H100 80GB HBM3") == (989e12, 67e12)
  assert benchmark.peak_flops("NVIDIA H100 PCIe")[0] == 756e12
  assert benchmark.peak_flops("TPU v5 lite")[0] == 197e12
  assert benchmark.peak_flops("cpu") is None
  c = benchmark.recipe_config("ir2net_a_stage1", batch_size=8, tiny=True)
  student = train.build_model(c, 1000)
  teacher = models.create_model("teacher_resnet34", num_classes=1000,
                                num_blocks=(1, 1, 1, 1))
  f = benchmark.train_step_flops(c, student, teacher)
  assert f["student_macs"] > 0 and f["teacher_macs"] > 0
  assert f["flops_per_step"] == 8 * (12 * f["student_macs"]
                                     + 2 * f["teacher_macs"])
  c.information_restriction = False
  assert benchmark.train_step_flops(c, student)["flops_per_step"] == (
      8 * 6 * f["student_macs"])


def test_cifar_json(capsys):
  torch_before = "torch" in sys.modules
  result = benchmark.main(["--recipes=cifar_resnet20", *TINY, "--json",
                           "--set=erase_lambda=0.2", "--image_size=32",
                           "--pipeline_examples=32"])
  out = json.loads(capsys.readouterr().out)   # stdout is only the JSON
  assert out == json.loads(json.dumps(result))
  assert out["environment"]["local_devices"] == 8
  (row,) = out["rows"]
  assert (row["recipe"], row["batch"], row["devices"]) == (
      "cifar_resnet20", 8, 8)
  for key in POSITIVE + ("inference_images_per_s", "xla_memory_mb"):
    assert row[key] > 0, key
  assert row["teacher_macs"] == 0
  assert row["mfu"] is None          # CPU: no known peak
  assert [p["pipeline"] for p in out["pipelines"]] == [
      "imagenet_train", "digits_train"]
  assert all(p["images_per_s"] > 0 for p in out["pipelines"])
  if not torch_before:
    assert "torch" not in sys.modules


def test_imagenet_recipe_with_teacher(capsys):
  # Smaller still than --tiny (compiling dominates): stages 2-4 empty.
  result = benchmark.main(["--recipes=ir2net_a_stage2", "--tiny",
                           "--batch_size=8", "--steps=1", "--warmup=0",
                           "--set=model_kwargs.num_blocks=(1,0,0,0)",
                           "--set", "teacher_kwargs.num_blocks=[1, 0, 0, 0]",
                           "--skip_pipeline", "--skip_inference",
                           "--xla_cpu_flags="])
  (row,) = result["rows"]
  assert (row["stage"], row["image_size"]) == (2, 32)
  assert row["teacher_macs"] > 0
  for key in POSITIVE:
    assert row[key] > 0, key
  assert row["inference_images_per_s"] is None
  table = capsys.readouterr().out
  assert "compile s" in table and "MFU %" in table
  assert any(line.startswith("ir2net_a_stage2") for line in table.splitlines())


def test_command_line_runs_each_recipe_under_its_auto_xla_flags():
  """``python -m ir2net_jax.benchmark`` as users run it: recipes whose 'auto'
  flags differ run in their own processes, and each row says which."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root)
  env.pop("XLA_FLAGS", None)
  run = subprocess.run(
      [sys.executable, "-m", "ir2net_jax.benchmark",
       "--recipes=cifar_resnet20,ir2net_a_stage2", "--tiny", "--batch_size=4",
       "--steps=1", "--warmup=0", "--json", "--skip_pipeline",
       "--skip_inference"],
      env=env, capture_output=True, text=True, timeout=900, check=True)
  out = json.loads(run.stdout)
  cifar, imagenet = out["rows"]
  assert (cifar["recipe"], imagenet["recipe"]) == ("cifar_resnet20",
                                                   "ir2net_a_stage2")
  assert cifar["xla_flags"].split() == [xla_cpu.TUNED_FLAGS]
  assert cifar["devices"] == 1
  two_cores = len(os.sched_getaffinity(0)) >= 2
  assert (xla_cpu.DATA_PARALLEL_FLAGS in imagenet["xla_flags"].split()
          ) == two_cores
  assert imagenet["devices"] == (2 if two_cores else 1)
  for row in out["rows"]:
    assert row["images_per_s"] > 0
  table = benchmark.format_table(out["environment"], out["rows"], [])
  assert "XLA_FLAGS for ir2net_a_stage2: " in table
