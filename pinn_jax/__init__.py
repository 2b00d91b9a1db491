"""pinn-jax: PtychoPINN in JAX/Flax NNX (the ``'jax'`` backend of :mod:`backend_api`)."""

__all__ = ["__version__"]
__version__ = "0.1.0"
