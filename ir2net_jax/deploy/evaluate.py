"""A packed model's top-1 and top-5 on its data set's eval split
(``ir2net-eval --packed``): the trainer's evaluation
(``train.evaluate.evaluate_split``), every example counted once over all
devices, with the binary convolutions on bits."""

from typing import Any, Dict

from absl import logging

from ir2net_jax.deploy import load
from ir2net_jax.train import evaluate as float_evaluate
from ir2net_jax.train import parallel, startup, step

__all__ = ["evaluate_packed"]


def evaluate_packed(config, path: str, how: str = "auto") -> Dict[str, Any]:
  """Evaluates the packed model file ``path``.

  Args:
    config: the data fields (data set, data_dir, eval batch); None: the
      config the file records.
    path: what ``ir2net-export`` wrote.
    how: how binary convolutions are computed (``packed.CONVOLUTIONS``).

  Returns:
    ``top1``, ``top5``, ``count``, ``split``, ``dataset``, ``checkpoint``
    (``path``: what was evaluated) and ``step`` (of the checkpoint it was
    exported from), as ``train.evaluate.evaluate`` returns them.

  Raises:
    FileNotFoundError, packed.PackError: no packed model at ``path``.
    DataError: the eval data are missing.
  """
  startup.connect(config)
  model = load.load_packed(path, how)
  config = config or model.config
  run = startup.prepare(config, training=False)
  mesh = parallel.data_mesh()
  logging.info("evaluating %s (step %s) on %s %s", path, model.step,
               config.dataset, run.info.eval_split)
  eval_step = step.sharded_eval_step(model.model, mesh, model.apply)
  sums = float_evaluate.evaluate_split(
      eval_step, parallel.replicate(model.state, mesh), config, mesh)
  return {"top1": sums["eval_top1"], "top5": sums["eval_top5"],
          "count": int(sums["eval_count"]), "checkpoint": path,
          "step": model.step, "split": run.info.eval_split,
          "dataset": config.dataset}
