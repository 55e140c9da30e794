"""A trained binary network as bits, for inference (issue 27, in progress).

* ``bits``: signs packed 32 to a word in two bit planes (sign, nonzero),
  and the exact XOR-popcount binary convolution in pure JAX.
* ``packed``: a model's binary convolutions run on packed kernels (a Flax
  method interceptor), logits equal to the float model's.

Still to come: the packed file (``ir2net-export``), folding, the native
CPU kernel through ``jax.ffi``.
"""
