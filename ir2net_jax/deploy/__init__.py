"""A trained binary network as bits, for inference (``ir2net-export``,
``ir2net_jax.load_packed``, ``ir2net-eval --packed``; docs/deploy.md).

* ``bits``: signs packed 32 to a word in two bit planes (sign, nonzero),
  and the exact XOR-popcount binary convolution in pure JAX (every
  platform; the reference the native kernel is tested against).
* ``native``: the same convolution as a C++ kernel through ``jax.ffi``,
  compiled on first use, its instruction set (AVX-512 VPOPCNTDQ, AVX2,
  portable) chosen at run time.
* ``packed``: a model's binary convolutions run on packed kernels (a Flax
  method interceptor), logits equal to the float model's; ``fold``: the
  BatchNorm after each of them computed by the convolution itself.
* ``export`` / ``load``: the packed model file, written from a run and read
  back as a function of images.
* ``evaluate``: a packed model's top-1 on its data set (the trainer's eval).
* ``stablehlo``: a ``jax.export`` artifact that needs jax alone.
"""
