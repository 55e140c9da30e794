"""notebooks/ir2net_colab.ipynb runs end to end on the CPU in smoke mode.

The notebook is executed by a real Jupyter kernel (nbclient + ipykernel) whose
working directory and PYTHONPATH are this checkout, with its parameters
overridden the way papermill does it: a cell tagged ``injected-parameters``
right after the one tagged ``parameters``. ``IR2NET_NOTEBOOK_OUTPUT=FILE.ipynb``
keeps the executed notebook.
"""

import base64
import json
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "ir2net_colab.ipynb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _cell(nb, needle):
  """The one code cell whose source contains ``needle``."""
  found = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
  assert len(found) == 1, f"{len(found)} code cells contain {needle!r}"
  return found[0]


def _text(cell) -> str:
  """Everything a cell printed (streams and text/plain results)."""
  out = []
  for o in cell.outputs:
    if o.output_type == "stream":
      out.append(o.text)
    elif o.output_type in ("execute_result", "display_data"):
      out.append(o.data.get("text/plain", ""))
  return "".join(out)


def _pngs(cell):
  return [base64.b64decode(o.data["image/png"]) for o in cell.outputs
          if o.output_type in ("display_data", "execute_result")
          and "image/png" in o.data]


def test_notebook_is_stored_clean():
  nb = _read()
  nbformat.validate(nb)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and params[0].cell_type == "code"
  for c in nb.cells:
    if c.cell_type == "code":
      assert not c.outputs and c.execution_count is None, (
          "store the notebook with its outputs cleared")


def _kernel_spec(tmp_path) -> str:
  """A kernel spec running this Python on one CPU device, in this checkout."""
  spec_dir = tmp_path / "jupyter" / "kernels" / "ir2net_test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher",
               "-f", "{connection_file}"],
      "display_name": "ir2net_jax test", "language": "python",
      "env": {"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
              # conftest asks for 8 fake devices; the notebook wants one.
              "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
              "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
  }))
  return str(tmp_path / "jupyter")


def _execute(nb, params, tmp_path, monkeypatch):
  """Runs ``nb`` in place with ``params`` injected after its parameters."""
  index = next(i for i, c in enumerate(nb.cells)
               if "parameters" in c.metadata.get("tags", []))
  injected = nbformat.v4.new_code_cell(
      "\n".join(f"{k} = {v!r}" for k, v in params.items()))
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, injected)

  monkeypatch.setenv("JUPYTER_PATH", _kernel_spec(tmp_path))
  client = NotebookClient(nb, kernel_name="ir2net_test", timeout=300,
                          resources={"metadata": {"path": ROOT}})
  try:
    client.execute()   # raises CellExecutionError on any failing cell
  finally:
    if os.environ.get("IR2NET_NOTEBOOK_OUTPUT"):   # to look at the outputs
      nbformat.write(nb, os.environ["IR2NET_NOTEBOOK_OUTPUT"])


@pytest.mark.slow
def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
  nb = _read()
  workdir = tmp_path / "runs" / "digits"
  params = {
      "SMOKE": True, "INSTALL": False, "WORKDIR": str(workdir),
      "RELEASED_CHECKPOINT": str(tmp_path / "model_best.pth.tar"),  # absent
      "CONVERTED_DIR": str(tmp_path / "converted"),
      "IMAGENET_DATA_DIR": None,
  }
  _execute(nb, params, tmp_path, monkeypatch)

  devices = _text(_cell(nb, "jax.devices()"))
  assert "backend cpu, compute dtype float32" in devices
  assert "CpuDevice" in devices

  summary = json.loads((workdir / "summary.json").read_text())
  train_out = _text(_cell(nb, "loop.train_and_evaluate"))
  assert f"trained {summary['steps']} steps" in train_out
  assert f"test top-1 {summary['final_eval_top1']:.2%}" in train_out

  curve = _cell(nb, "run_metrics.read_scalars")
  assert "train_loss" in _text(curve) and "eval_top1" in _text(curve)
  curve_pngs = _pngs(curve)
  assert len(curve_pngs) == 1 and curve_pngs[0].startswith(PNG_MAGIC)

  grid = _cell(nb, "IPython.display")
  grid_files = sorted((workdir / "restriction").glob("step_*.png"))
  # Training writes a grid at every evaluation: the newest is shown.
  assert grid_files, "training wrote no restriction grid"
  assert _pngs(grid) == [grid_files[-1].read_bytes()]
  assert grid_files[-1].name in _text(grid)

  released = _text(_cell(nb, "convert.main"))
  assert "Skipped the released checkpoint: no file" in released
  assert params["RELEASED_CHECKPOINT"] in released
  assert not os.path.exists(params["CONVERTED_DIR"])

  from ir2net_jax.models import costs  # pylint: disable=g-import-not-at-top
  from ir2net_jax.models import create_model  # pylint: disable=g-import-not-at-top
  cost_out = _text(_cell(nb, "costs.print_summary"))
  a = costs.summarize(create_model("ir2net_a", stage=2), (1, 224, 224, 3))
  r20 = costs.summarize(create_model("cifar_resnet20"), (1, 32, 32, 3))
  assert "ir2net_a stage 2 summary" in cost_out
  assert f"{a.bops:.3e}" in cost_out and f"{a.flops:.3e}" in cost_out
  r20_rows = [l for l in cost_out.splitlines() if l.startswith("cifar_resnet20")]
  assert len(r20_rows) == 1
  assert f"{r20.params_1bit:,}" in r20_rows[0]
  assert f"{r20.bops:.3e}" in r20_rows[0]


@pytest.mark.slow
def test_released_checkpoint_cell_converts(tmp_path, monkeypatch):
  """The released-checkpoint cell on a full-size IR2Net-A state_dict (random
  values; an .npz, which the converter reads like a .pth.tar) converts it
  exactly and, without ImageNet, says what is missing."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ir2net_jax import models  # pylint: disable=g-import-not-at-top
  from ir2net_jax.io import torch_layout, weights  # pylint: disable=g-import-not-at-top
  from ir2net_jax.models import create_model  # pylint: disable=g-import-not-at-top

  model = create_model("ir2net_a", stage=2)
  abstract = models.abstract_variables(model, 224)
  rng = np.random.default_rng(0)
  variables = {c: jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract[c])
               for c in ("params", "batch_stats")}
  released = tmp_path / "model_best.npz"
  np.savez(released, **{"module." + k: v for k, v in
                        torch_layout.flax_to_torch(variables, model).items()})

  nb = _read()
  nb.cells = [c for c in nb.cells if c.cell_type == "code" and (
      "parameters" in c.metadata.get("tags", []) or "convert.main" in c.source)]
  params = {"INSTALL": False, "RELEASED_CHECKPOINT": str(released),
            "CONVERTED_DIR": str(tmp_path / "converted"),
            "IMAGENET_DATA_DIR": None}
  _execute(nb, params, tmp_path, monkeypatch)

  out = _text(_cell(nb, "convert.main"))
  assert f"wrote {params['CONVERTED_DIR']}: ir2net_a" in out
  assert "Skipped the ImageNet evaluation: IMAGENET_DATA_DIR is None" in out
  restored = weights.load_variables(params["CONVERTED_DIR"]).variables
  for c in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, dict(restored[c]),
                 variables[c])


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
