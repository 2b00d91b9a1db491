"""pinn-jax: PtychoPINN in JAX/Flax NNX (the ``'jax'`` backend of :mod:`backend_api`).

Importing this package changes nothing in the process: it does not touch ``XLA_FLAGS`` or any
other environment variable. The CPU XLA settings that make training ~40 % faster on CPU are
applied by the entry points (the ``pinn-jax`` command, the benchmarks, the ptychodus child);
a script that uses the library directly opts in with one call, before its first jax
computation::

    import pinn_jax
    pinn_jax.configure_cpu_runtime()   # adds only flags not already in XLA_FLAGS

``PINN_JAX_XLA_DEFAULTS=0`` in the environment turns that call into a no-op. See
:mod:`pinn_jax.runtime` for what is set and why. On x86 CPUs with bfloat16 instructions a script
can also choose faster bfloat16 math for the network's convolutions, before its first one::

    pinn_jax.configure_conv_math("bfloat16")   # float32 stays the default
"""

from pinn_jax.runtime import configure_conv_math, configure_cpu_runtime

__all__ = ["__version__", "configure_conv_math", "configure_cpu_runtime"]
__version__ = "0.1.0"
