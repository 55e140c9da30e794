"""The README's "Use the modules in your own model" example runs and does
what the README says it does."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- readme-example: modules"


def _example_source() -> str:
  """The first ```python block after the marker comment in README.md."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  start = readme.find(MARKER)
  assert start >= 0, f"README.md lost the {MARKER!r} comment"
  match = re.compile(r"```python\n(.*?)```", re.S).search(readme, start)
  assert match is not None, "no ```python block after the marker"
  return match.group(1)


def test_modules_example_runs_and_does_what_it_says():
  namespace = {}
  exec(compile(_example_source(), "README.md example", "exec"), namespace)  # pylint: disable=exec-used
  images, feature = namespace["images"], namespace["feature"]
  erased, mask = namespace["erased"], namespace["mask"]

  b, h, w, _ = images.shape
  assert feature.shape[0] == b and feature.ndim == 4
  # BinaryConv convolved ±1 activations with ±1 weights: every output is an
  # integer no larger than the number of products (3 x 3 x input channels).
  kernel = namespace["variables"]["params"]["BinaryConv_0"]["kernel"]
  fan_in = int(np.prod(kernel.shape[:-1]))
  f = np.asarray(feature)
  np.testing.assert_array_equal(f, np.round(f))
  assert np.abs(f).max() <= fan_in
  assert np.abs(f).max() > 0

  assert mask.shape == (b, h, w)
  m = np.asarray(mask)
  assert set(np.unique(m)) <= {0.0, 1.0}
  assert 0 < m.mean() < 1, "lam=1.0 on random features erases some pixels"
  np.testing.assert_array_equal(np.asarray(erased),
                                np.asarray(images) * m[..., None])
  # The mask keeps pixels whose attention is above lam x its mean: the kept
  # pixels' upsampled attention is higher on average than the erased ones'.
  from ir2net_jax.nn import restriction  # pylint: disable=g-import-not-at-top
  up = np.asarray(restriction.upsample_bilinear_align_corners(
      restriction.attention_map(feature), (h, w)))
  for i in range(b):
    assert up[i][m[i] == 1].min() > up[i][m[i] == 0].max()

  x = np.asarray(namespace["x"])
  surrogate = np.asarray(namespace["surrogate"])
  analytic = np.where(np.abs(x) < 1, 2 - 2 * np.abs(x), 0.0)
  np.testing.assert_allclose(surrogate, analytic, atol=1e-6)
  signs = np.asarray(jax.jit(namespace["binarize"].approx_sign)(
      jnp.asarray(x)))
  np.testing.assert_array_equal(signs, np.sign(x))
