"""The command lines, which import the rest and are never imported by it.

* ``train``: ``ir2net-train`` (and the checkout's ``launch.py``).
* ``eval``: ``ir2net-eval``.
* ``convert``: ``ir2net-convert`` (PyTorch ``.pth`` -> orbax).
* ``costs``: ``ir2net-costs``.
* ``curves``: ``ir2net-curves``, a run's curves as a PNG.
* ``visualize``: restriction pictures of image files.
* ``benchmark``: ``ir2net-benchmark``, the training-step benchmark.
* ``checkpoint_cli``: the flags and start of the commands that read a
  checkpoint.
"""

from ir2net_jax.tools import quiet_tensorflow

quiet_tensorflow.install()
