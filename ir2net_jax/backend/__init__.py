"""How a run computes on its backend, below every other layer.

* ``xla_cpu``: XLA:CPU flags, applied before JAX starts.
* ``policy``: the dtypes, kernels and flags a config gets on a backend.
"""
