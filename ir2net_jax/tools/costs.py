"""The ``ir2net-costs`` command: a model's parameters, size, BOPs and FLOPs.

  ir2net-costs --model=ir2net_c --stage=2
  python -m ir2net_jax.tools.costs --model=cifar_resnet20

The counts are ``ir2net_jax.models.costs``'s (its docstring says how they
are counted).
"""

import argparse
from typing import Optional, Sequence

from ir2net_jax.models import MODELS, costs, create_model

__all__ = ["main", "run"]


def main(argv: Optional[Sequence[str]] = None) -> None:
  """``python -m ir2net_jax.tools.costs --model=ir2net_c --stage=2``."""
  parser = argparse.ArgumentParser(description=costs.__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="ir2net_a", choices=sorted(MODELS))
  parser.add_argument("--stage", type=int, choices=(1, 2), default=None,
                      help="IR2Net (ImageNet) training stage")
  parser.add_argument("--image_size", type=int, default=None,
                      help="input height and width (default: 32 for cifar_*, "
                           "224 otherwise)")
  parser.add_argument("--num_classes", type=int, default=None)
  parser.add_argument("--backbone", action="store_true",
                      help="information_recovery=False (no fusion head)")
  args = parser.parse_args(argv)

  kwargs = {}
  if args.stage is not None:
    kwargs["stage"] = args.stage
  if args.num_classes is not None:
    kwargs["num_classes"] = args.num_classes
  if args.backbone:
    kwargs["information_recovery"] = False
  try:
    model = create_model(args.model, **kwargs)
  except ValueError as e:
    parser.error(str(e))
  size = args.image_size or (32 if args.model.startswith("cifar_") else 224)
  name = args.model + (f" stage {args.stage}" if args.stage else "") + (
      " backbone" if args.backbone else "")
  costs.print_summary(model, (1, size, size, 3), name=name)


def run() -> None:
  """The ``ir2net-costs`` console script: ``main`` on ``sys.argv``."""
  main()


if __name__ == "__main__":
  run()
