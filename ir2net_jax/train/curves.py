"""A picture of a run's curves, without TensorBoard: ``curves.png``.

``plot(workdir)`` reads the scalars the run wrote (``run_metrics``) and
draws six panels: the train and eval loss, the train and eval top-1 (and
eval top-5), the learning rate, the BNN diagnostics' means over layers
(``act_in_clip``, ``latent_gt1``; ``flip_ratio`` on its own, log-scaled
panel) and the speed (steps/s, the share of time spent waiting for input).
A series the run did not write leaves its panel's line out. The training
loop writes ``curves.png`` into the workdir at the end of every run;
``ir2net-curves --workdir=RUN`` draws it on demand, also while a run goes on.

Needs matplotlib (``pip install matplotlib``; in requirements.txt).
"""

import io
from typing import Dict, List, Optional, Sequence, Tuple

from ir2net_jax.storage import paths
from ir2net_jax.train import run_metrics

__all__ = ["plot", "FILE_NAME", "PANELS"]

FILE_NAME = "curves.png"

# (title, [(tag, label, style)], y scale)
PANELS: Sequence[Tuple[str, List[Tuple[str, str, str]], str]] = (
    ("loss", [("train_loss", "train", "-"), ("eval_loss", "eval", "o-")],
     "linear"),
    ("top-1", [("train_top1", "train", "-"), ("eval_top1", "eval", "o-"),
               ("eval_top5", "eval top-5", "o:")], "linear"),
    ("learning rate", [("train_learning_rate", "", "-")], "linear"),
    ("binary activations and weights (mean over layers)",
     [("train_diag/act_in_clip/mean", "inputs in the clip range", "-"),
      ("train_diag/latent_gt1/mean", "latent weights |w| > 1", "-")],
     "linear"),
    ("weights flipped per step (mean over layers)",
     [("train_diag/flip_ratio/mean", "", "-")], "log"),
    ("speed", [("steps_per_sec", "steps/s", "-"),
               ("input_wait_fraction", "share waiting for input", "--")],
     "linear"),
)


def plot(workdir: str, output: Optional[str] = None) -> str:
  """Draws the curves of the run in ``workdir`` into a PNG.

  Args:
    workdir: the run's workdir (local or a bucket URL).
    output: where to write it; default ``<workdir>/curves.png``.

  Returns:
    The path written.

  Raises:
    FileNotFoundError: ``workdir`` holds no TensorBoard event file.
    ImportError: matplotlib is not installed.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  scalars = run_metrics.read_scalars(
      workdir, [tag for _, lines, _ in PANELS for tag, _, _ in lines])
  figure = Figure(figsize=(15, 8))
  figure.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.92,
                         wspace=0.25, hspace=0.35)
  for axes, (title, lines, scale) in zip(
      figure.subplots(2, 3).flat, PANELS):
    _panel(axes, title, lines, scale, scalars)
  figure.suptitle(paths.resolve(workdir))
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=80)
  output = output or paths.join(workdir, FILE_NAME)
  paths.write_atomic(output, buffer.getvalue())
  return output


def _panel(axes, title: str, lines, scale: str,
           scalars: Dict[str, List[Tuple[int, float]]]) -> None:
  axes.set_title(title)
  axes.set_xlabel("step")
  drawn = False
  for tag, label, style in lines:
    points = [(s, v) for s, v in scalars.get(tag, ())
              if scale != "log" or v > 0]
    if points:
      steps, values = zip(*points)
      axes.plot(steps, values, style, label=label or None, markersize=3)
      drawn = True
  if not drawn:
    axes.text(0.5, 0.5, "not written by this run", ha="center",
              va="center", transform=axes.transAxes, color="gray")
    return
  axes.set_yscale(scale)
  axes.grid(alpha=0.3)
  if any(label for _, label, _ in lines):
    axes.legend(fontsize="small")
