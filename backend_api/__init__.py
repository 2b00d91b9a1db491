"""Backend-neutral PtychoPINN contract: configuration, data, archives, backend selection.

This package depends on numpy, scipy, h5py and the standard library only; it never imports
jax or any other backend. Backends are found by name through :mod:`backend_api.backends`.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
