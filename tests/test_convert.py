"""PyTorch state_dict -> Flax conversion, its inverse, and the command."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import reference_fixtures as rf
from ir2net_jax.io import torch_layout, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = rf.fixture_paths()


@pytest.mark.parametrize("path", PATHS, ids=rf.fixture_ids())
def test_round_trip_with_and_without_module_prefix(path):
  fx = rf.load(path)
  state = fx.state()
  model = fx.model()
  prefixed = {"module." + k: v for k, v in state.items()}
  a = torch_layout.torch_to_flax(state, model, fx.meta["image_size"])
  b = torch_layout.torch_to_flax(prefixed, model, fx.meta["image_size"])
  jax.tree.map(np.testing.assert_array_equal, a, b)
  back = torch_layout.flax_to_torch(a, model)
  expected = {k: v for k, v in state.items()
              if not k.endswith("num_batches_tracked")}
  assert set(back) == set(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def _small_fixture():
  """The student fixture with the fewest weights (fast to run)."""
  students = [rf.load(p) for p in PATHS if rf.load(p).meta["kind"] == "student"]
  return min(students, key=lambda f: sum(np.prod(s) for _, s in f.spec))


def test_errors_name_the_key():
  fx = _small_fixture()
  state, model = fx.state(), fx.model()
  key = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
  missing = {k: v for k, v in state.items() if k != key}
  with pytest.raises(torch_layout.ConversionError, match=f"missing key '{key}'"):
    torch_layout.torch_to_flax(missing, model, fx.meta["image_size"])
  with pytest.raises(torch_layout.ConversionError, match="unexpected keys.*extra"):
    torch_layout.torch_to_flax(state | {"extra.weight": np.zeros(3)}, model,
                          fx.meta["image_size"])
  bad = dict(state)
  bad[key] = bad[key][:1]
  with pytest.raises(torch_layout.ConversionError, match=f"key '{key}' has shape"):
    torch_layout.torch_to_flax(bad, model, fx.meta["image_size"])


def _run_command(fx, input_path, out_dir):
  name = fx.meta["model"]
  args = [sys.executable, "-m", "ir2net_jax.tools.convert", f"--input={input_path}",
          f"--output={out_dir}"]
  m = __import__("re").fullmatch(r"imagenet_ir2net_([a-d])_step([12])", name)
  args += ([f"--model=ir2net_{m.group(1)}", f"--stage={m.group(2)}"] if m
           else [f"--model={name}"])
  subprocess.run(args, check=True, cwd=ROOT, capture_output=True,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  variables = weights.load_variables(str(out_dir)).variables
  x = fx.nhwc("input")
  logits, _ = jax.jit(lambda v, x: fx.model().apply(v, x, train=False))(
      variables, x)
  assert rf.rel(logits, fx.data["eval_logits"]) <= 1e-4


def test_command_npz_to_orbax_reproduces_the_fixture(tmp_path):
  fx = _small_fixture()
  npz = tmp_path / "state.npz"
  np.savez(npz, **{"module." + k: v for k, v in fx.state().items()})
  _run_command(fx, npz, tmp_path / "ckpt")


def test_command_pth_to_orbax(tmp_path):
  torch = pytest.importorskip("torch")
  fx = _small_fixture()
  pth = tmp_path / "checkpoint.pth.tar"
  torch.save({"epoch": 1, "state_dict": {
      "module." + k: torch.from_numpy(np.asarray(v))
      for k, v in fx.state().items()}}, pth)
  _run_command(fx, pth, tmp_path / "ckpt")


def test_command_refuses_existing_output(tmp_path):
  fx = _small_fixture()
  npz = tmp_path / "state.npz"
  np.savez(npz, **fx.state())
  (tmp_path / "exists").mkdir()
  r = subprocess.run([sys.executable, "-m", "ir2net_jax.tools.convert",
                      f"--model={fx.meta['model']}", f"--input={npz}",
                      f"--output={tmp_path / 'exists'}"], cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode != 0 and "exists" in r.stderr


def test_a_shallower_state_dict_gets_the_num_blocks_that_fits(tmp_path,
                                                              capsys):
  """A ResNet-20 of one block per stage, converted without --num_blocks:
  one line naming the flag and the value, nothing written."""
  from ir2net_jax import models  # pylint: disable=g-import-not-at-top
  from ir2net_jax.tools import convert  # pylint: disable=g-import-not-at-top
  small = models.create_model("cifar_resnet20", num_blocks=(1, 2, 1))
  state = torch_layout.flax_to_torch(models.init_variables(small, 32, 0),
                                     small)
  assert torch_layout.blocks_per_stage(state) == (1, 2, 1)
  np.savez(tmp_path / "small.npz", **state)
  args = ["--model=cifar_resnet20", f"--input={tmp_path / 'small.npz'}",
          f"--output={tmp_path / 'out'}"]
  with pytest.raises(SystemExit) as e:
    convert.main(args)
  assert "pass --num_blocks=1,2,1" in str(e.value), e.value
  assert not (tmp_path / "out").exists()
  convert.main(args + ["--num_blocks=1,2,1"])
  assert "wrote" in capsys.readouterr().out
