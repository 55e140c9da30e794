"""The paper's building blocks, as Flax modules and JAX functions.

* ``binarize``: the sign estimators (ApproxSign, clipped STE, STE,
  SwishSign).
* ``layers``: ``BinaryConv``, ``CIRec``, PyTorch-exact ``BatchNorm``, PReLU,
  pooling.
* ``kernels``: custom convolutions (exact low-precision binary convs, the
  CPU's tap-wise grouped-conv weight gradient).
* ``restriction``: information restriction (attention, erase mask).
* ``objective``: the two-pass training objective.
* ``losses``: cross-entropy and the distribution (KD) loss.
* ``diagnostics``: what the binary convolutions sow for the BNN diagnostics.
"""
