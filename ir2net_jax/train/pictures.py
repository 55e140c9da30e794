"""The restriction pictures that training draws at every evaluation.

Information restriction (SPEC section 3, ``nn.restriction``) turns the
clean pass's last feature map into an attention map, thresholds it into a
0/1 mask and feeds the masked ("erased") image to a second pass.
``RestrictionPictures`` draws that (``grid.restriction_grid``) for the same
first ``config.restriction_images`` eval images every time, written to
``workdir/restriction/step_{step:06d}.png`` and as the TensorBoard image
``restriction``. Runs with ``information_restriction=False`` draw none:
their objective erases nothing (its mask is all ones).

BatchNorm mode. The objective computes the mask in training mode: the clean
pass normalises with the statistics of its own training batch. A picture of
a few images would then depend on which images share its batch (and their
number, 8 rather than the run's batch size), so pictures use evaluation mode
(running statistics): each image's maps depend on that image alone, and
they show the network that evaluation measures.
"""

from typing import Any, Dict

import jax
import numpy as np

from ir2net_jax.data.shared import constants
from ir2net_jax.nn import restriction
from ir2net_jax.storage import paths
from ir2net_jax.train import grid, parallel

__all__ = ["RestrictionPictures", "display_normalization"]

# Display normalisation (mean, std) of the data sets the pipeline serves;
# others fall back to their spec's value_range.
_NORMALIZATION = {
    "digits": ("DIGITS_MEAN", "DIGITS_STD"),
    "cifar10": ("IMAGENET_MEAN", "IMAGENET_STD"),
    "imagenet2012": ("IMAGENET_MEAN", "IMAGENET_STD"),
}


def display_normalization(config) -> Dict[str, Any]:
  """``grid.restriction_grid`` keyword arguments that undo ``config.dataset``'s
  normalisation: ``mean`` and ``std`` where known, else ``value_range``."""
  names = _NORMALIZATION.get(config.dataset)
  if names:
    return {"mean": getattr(constants, names[0]),
            "std": getattr(constants, names[1])}
  # tfds: and folder: data, read by the tf.data engine only.
  from ir2net_jax.data.shared import sources  # pylint: disable=g-import-not-at-top
  return {"value_range": sources.read_settings(config).spec.value_range}


class RestrictionPictures:
  """The restriction grid of fixed eval images, drawn at every evaluation.

  The images are the first ``config.restriction_images`` of the eval split,
  read once. Every process runs the same jitted forward (a multi-host run
  needs that); process 0 alone writes
  ``workdir/restriction/step_{step:06d}.png`` and the TensorBoard image
  ``restriction``. BatchNorm in evaluation mode (module docstring).

  Args:
    config: the run's config.
    model: the student (its BatchNorm ``axis_name`` is unused in eval mode).
    mesh: the run's mesh; variables passed to ``__call__`` are replicated
      on it.
    workdir: the run's directory.
    inputs: the run's ``data.open_inputs`` (its eval images).
  """

  def __init__(self, config, model, mesh, workdir: str, inputs):
    # The same on every process (each reads the start of the whole split).
    images = inputs.first_eval_images(config.restriction_images)
    self.host_images = np.asarray(images, np.float32)
    self.images = parallel.replicate(images, mesh)
    self.directory = paths.join(workdir, "restriction")
    self.display = display_normalization(config)
    lam = config.erase_lambda
    self._maps = jax.jit(lambda v, x: restriction.restriction_maps(
        model, v, x, lam),
                         out_shardings=parallel.replicated(mesh))

  def __call__(self, step: int, variables: Dict[str, Any], writer) -> None:
    maps = self._maps(variables, self.images)
    if jax.process_index() != 0:
      return
    maps = {k: np.asarray(v.addressable_data(0)) for k, v in maps.items()}
    picture = grid.restriction_grid(self.host_images, maps, **self.display)
    grid.save_png(picture,
                  paths.join(self.directory, f"step_{step:06d}.png"))
    writer.write_images(step, {"restriction": picture[None]})
