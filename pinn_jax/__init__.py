"""pinn-jax: PtychoPINN in JAX/Flax NNX (the ``'jax'`` backend of :mod:`backend_api`)."""

from pinn_jax.runtime import configure_cpu_runtime as _configure_cpu_runtime

# Before anything can start jax's backend: add the CPU XLA flags that measured faster (they
# never override the user's XLA_FLAGS; PINN_JAX_XLA_DEFAULTS=0 opts out). See pinn_jax.runtime.
_configure_cpu_runtime()

__all__ = ["__version__"]
__version__ = "0.1.0"
