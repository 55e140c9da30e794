"""Classifies image files with a trained model: ``ir2net-predict``'s work.

``predict(config, checkpoint, patterns)`` reads the images as the data
set's eval recipe prepares its own (``data.images``), runs the model in
evaluation mode (BatchNorm's running statistics: each image's answer
depends on that image alone) and returns each image's ``top_k`` classes
with their softmax probabilities, named as the data set names its classes
(``data.shared.sources.class_names``).
"""

import contextlib
import dataclasses
from typing import (Any, Callable, ContextManager, Dict, List, Optional,
                    Sequence, Tuple)

import jax
import numpy as np

from ir2net_jax.data import images as images_lib
from ir2net_jax.data.shared import sources
from ir2net_jax.nn import restriction
from ir2net_jax.train import evaluate, startup

__all__ = ["Prediction", "Predictions", "classify", "predict",
           "restriction_maps", "table", "BATCH"]

BATCH = 32   # images per forward pass; the last pass is padded to it


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One image's answer.

  Attributes:
    path: the image file.
    labels: the top-k labels, most probable first.
    classes: their names.
    probabilities: their softmax probabilities.
  """
  path: str
  labels: Tuple[int, ...]
  classes: Tuple[str, ...]
  probabilities: Tuple[float, ...]

  def as_dict(self) -> Dict[str, Any]:
    return {"path": self.path, "top": [
        {"label": l, "class": c, "probability": p}
        for l, c, p in zip(self.labels, self.classes, self.probabilities)]}


@dataclasses.dataclass
class Predictions:
  """What ``predict`` returns: the answers, and what the pictures need.

  Attributes:
    predictions: one per readable image, in the order the patterns list
      them (bad files are skipped or stop the call, as
      ``config.bad_examples`` says).
    images: (N, S, S, 3) the normalised images the model saw.
    model: the model (no BatchNorm ``axis_name``).
    variables: ``{'params', 'batch_stats'}``.
    context: a context in which ``model.apply`` computes as the
      predictions did (a packed model's: ``deploy.packed.on_bits``).
  """
  predictions: List[Prediction]
  images: np.ndarray
  model: Any
  variables: Dict[str, Any]
  context: Callable[[], ContextManager] = contextlib.nullcontext


def predict(config, checkpoint: str, patterns: str,
            top_k: int = 5) -> Predictions:
  """Each image's ``top_k`` classes.

  Args:
    config: the run's config (model, data set, image size).
    checkpoint: a workdir, ``workdir/best`` or converted weights.
    patterns: comma-separated image files, glob patterns or directories.
    top_k: how many classes per image (at most the model's classes).

  Raises:
    DataError: no image among the patterns, a bad one under
      ``bad_examples='error'``, or a data set that is not there.
    CheckpointError: no checkpoint there, or one that does not fit the
      model.
  """
  startup.connect(config)   # before orbax starts JAX's backends
  files, images = images_lib.load_image_files(config, patterns)  # first
  model, variables = evaluate.load_model(config, checkpoint)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  return classify(config, files, images, lambda x: apply(variables, x),
                  top_k, model, variables)


def classify(config, files: Sequence[str], images: np.ndarray,
             logits_fn: Callable[[np.ndarray], Any], top_k: int, model,
             variables, class_names: Optional[Sequence[str]] = None,
             context: Callable[[], ContextManager] = contextlib.nullcontext
             ) -> Predictions:
  """``predict`` given the images and a function of them to logits.

  Args:
    config: the data set (class names) where ``class_names`` is None.
    files, images: ``data.images.load_image_files``'s.
    logits_fn: (BATCH, S, S, 3) -> (BATCH, classes) logits.
    top_k: how many classes per image (at most the model's classes).
    model, variables, context: for the pictures (``Predictions``).
    class_names: each label's name (default: the data set's).
  """
  probabilities = np.concatenate([
      np.asarray(jax.nn.softmax(np.asarray(logits_fn(
          _padded(images[i:i + BATCH])), np.float32)))[
              :len(images[i:i + BATCH])]
      for i in range(0, len(images), BATCH)])
  names = (list(class_names) if class_names is not None
           else sources.class_names(config, probabilities.shape[-1]))
  k = max(1, min(top_k, probabilities.shape[-1]))
  top = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
  return Predictions(
      [Prediction(path, tuple(int(l) for l in labels),
                  tuple(names[l] for l in labels),
                  tuple(float(p[l]) for l in labels))
       for path, labels, p in zip(files, top, probabilities)],
      images, model, variables, context)


def _padded(batch: np.ndarray) -> np.ndarray:
  """``batch`` padded with zeros to ``BATCH`` images: one compiled shape."""
  return np.concatenate([batch, np.zeros(
      (BATCH - len(batch),) + batch.shape[1:], batch.dtype)])


def restriction_maps(result: Predictions, erase_lambda: float
                     ) -> Dict[str, np.ndarray]:
  """``nn.restriction.restriction_maps`` of the predicted images (BatchNorm
  in evaluation mode)."""
  with result.context():
    maps = jax.jit(lambda v, x: restriction.restriction_maps(
        result.model, v, x, erase_lambda))(result.variables, result.images)
  return jax.device_get(maps)


def table(predictions: Sequence[Prediction]) -> str:
  """One line per image: its file, then ``class probability`` per rank."""
  width = max(len(p.path) for p in predictions)
  lines = []
  for p in predictions:
    ranks = "  ".join(f"{c} {q:.3f}" for c, q in zip(p.classes,
                                                        p.probabilities))
    lines.append(f"{p.path:<{width}}  {ranks}")
  return "\n".join(lines)
