"""How a run computes on its backend, below every other layer.

* ``xla_cpu``: XLA:CPU flags, applied before JAX starts, and the compiler
  options of programs that run once (``jit_run_once``).
* ``policy``: the dtypes, kernels and flags a config gets on a backend.
"""
