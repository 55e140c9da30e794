"""Checkpoints and weights on disk.

* ``checkpoints``: a run's orbax checkpoints (latest, best, resume,
  unreadable ones set aside).
* ``weights``: the one loader of model variables (a workdir, its ``best/``,
  converted weights, stage 1) and ``save_variables``.
* ``torch_layout``: PyTorch ``state_dict`` <-> Flax variables.
* ``pth``: reads ``torch.save`` files without torch.
"""
