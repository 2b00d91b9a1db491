"""``python -m pinn_jax`` = the ``pinn-jax`` command (see :mod:`pinn_jax.cli`)."""

import sys

from pinn_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
