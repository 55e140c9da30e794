"""A trained binary network as bits, for inference (issue 27, in progress).

* ``bits``: signs packed 32 to a word in two bit planes, and the exact
  XOR-popcount binary convolution in pure JAX.
"""
