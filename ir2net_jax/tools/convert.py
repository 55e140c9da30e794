"""Converts a PyTorch ``state_dict`` into an orbax checkpoint of Flax
variables: ``ir2net-convert``.

  ir2net-convert --model=ir2net_a --stage=2 \\
      --input=checkpoint.pth.tar --output=/path/to/ir2net_a_stage2
  python -m ir2net_jax.tools.convert --model=teacher_resnet34 \\
      --input=resnet34.pth --output=/path/to/teacher

``--input`` may be a ``.pth``/``.pth.tar`` (a state_dict or the reference's
training checkpoint) or a ``.npz`` of arrays keyed by the PyTorch names
(``io.torch_layout.load_state_dict``). The output is what
``io.weights.load_variables`` reads: ``--config.init_from``,
``--config.teacher_checkpoint`` and ``ir2net-eval --checkpoint``.
"""

import argparse
import sys

import jax
import numpy as np

from ir2net_jax import models
from ir2net_jax.io import torch_layout, weights
from ir2net_jax.storage import paths, preflight

__all__ = ["main", "run"]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description="Convert a PyTorch IR2Net / ResNet state_dict into an "
                  "orbax checkpoint of Flax variables.")
  parser.add_argument("--model", required=True,
                      choices=sorted(models.MODELS))
  parser.add_argument("--stage", type=int, default=None,
                      help="IR2Net stage (1 or 2); ImageNet models only")
  parser.add_argument("--input", required=True,
                      help=".pth / .pth.tar or .npz")
  parser.add_argument("--output", required=True,
                      help="directory for the orbax checkpoint (must not "
                           "exist)")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--num_blocks", default=None,
                      help="blocks per stage, e.g. 1,1,1 (default: the "
                           "model's)")
  args = parser.parse_args(argv)
  kwargs = {"stage": args.stage} if args.stage is not None else {}
  if args.num_blocks:
    kwargs["num_blocks"] = tuple(int(n) for n in args.num_blocks.split(","))
  model = models.create_model(args.model, **kwargs)
  image_size = args.image_size or (32 if args.model.startswith("cifar")
                                   else 224)
  preflight.check(paths.parent(args.output), "--output", written=True,
                  holds="checkpoint")
  if paths.exists(args.output):
    parser.error(f"--output {args.output} exists; choose a new directory")
  state_dict = torch_layout.load_state_dict(args.input)
  try:
    variables = torch_layout.torch_to_flax(state_dict, model, image_size)
  except torch_layout.ConversionError as e:
    sys.exit(f"error: {e}{_depth_hint(state_dict, model, args.num_blocks)}")
  weights.save_variables(args.output, variables)
  n = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
  print(f"wrote {args.output}: {args.model} ({n:,} parameters)")


def _depth_hint(state_dict, model, given) -> str:
  """Where the state_dict's blocks per stage differ from the model's: the
  ``--num_blocks`` that fits."""
  found = torch_layout.blocks_per_stage(state_dict)
  built = tuple(getattr(model, "num_blocks", ()) or ())
  if not found or found == built:
    return ""
  flag = ",".join(map(str, found))
  return (f". The state_dict has {found} blocks per stage, the model "
          f"{built or 'another layout'}: pass --num_blocks={flag}"
          + (f" (not {given})" if given else ""))


def run() -> None:
  """The ``ir2net-convert`` console script: ``main`` on ``sys.argv``."""
  main()


if __name__ == "__main__":
  run()
