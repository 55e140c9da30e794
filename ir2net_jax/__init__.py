"""ir2net_jax: IR2Net binary neural networks in JAX / Flax."""

__version__ = "0.1.0"
