"""Loading the reference's parity fixtures (tests/fixtures/reference/*.npz).

Everything about a fixture comes from its file: the spec, seeds, sizes and
the model name in ``meta_json``. ``weights.py`` (copied from the reference
harness) rebuilds the exact weights from the spec.
"""

import dataclasses
import functools
import glob
import json
import os
import re
from typing import Any, Dict, Optional

import numpy as np

import weights as weights_lib
from ir2net_jax.io import torch_layout
from ir2net_jax import models

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "reference")


def fixture_paths():
  return sorted(glob.glob(os.path.join(FIXTURE_DIR, "*.npz")))


def fixture_ids():
  return [os.path.basename(p)[:-4] for p in fixture_paths()]


@dataclasses.dataclass
class Fixture:
  name: str
  data: Dict[str, np.ndarray]
  meta: Dict[str, Any]
  spec: list

  @property
  def is_teacher(self) -> bool:
    return self.meta["kind"] == "teacher"

  @property
  def is_imagenet(self) -> bool:
    return self.meta["model"].startswith(("imagenet", "teacher"))

  def state(self) -> Dict[str, np.ndarray]:
    return weights_lib.make_state(self.spec, seed_salt=self.meta["seed_salt"])

  def model(self, **kwargs):
    """The Flax model the fixture's ``meta['model']`` names."""
    name = self.meta["model"]
    m = re.fullmatch(r"imagenet_ir2net_([a-d])_step([12])", name)
    if m:
      stage = int(m.group(2))
      assert (stage == 2) == bool(self.meta["weights_binarized"]), name
      return models.create_model(f"ir2net_{m.group(1)}", stage=stage, **kwargs)
    return models.create_model(name, **kwargs)

  def variables(self, dtype=np.float32):
    return torch_layout.torch_to_flax(self.state(), self.model(),
                                 self.meta["image_size"], dtype=dtype)

  def nhwc(self, key: str) -> np.ndarray:
    return self.data[key].transpose(0, 2, 3, 1)

  def teacher(self) -> Optional["Fixture"]:
    """The teacher fixture that ``meta['teacher']`` names, if any."""
    if not self.meta.get("teacher"):
      return None
    name = self.meta["teacher"].split(":")[0].strip()
    return load(os.path.join(FIXTURE_DIR, name + ".npz"))


@functools.lru_cache(maxsize=None)
def load(path: str) -> Fixture:
  with np.load(path) as z:
    data = {k: z[k] for k in z.files}
  return Fixture(os.path.basename(path)[:-4], data,
                 json.loads(str(data["meta_json"])),
                 json.loads(str(data["spec_json"])))


def rel(a, ref) -> float:
  """``max|a - ref| / max|ref|``: error relative to the array's scale."""
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-300))
