"""``pinn-jax ptychodus [ptychodus arguments]``: start ptychodus with PtychoPINN-JAX listed.

Registers the library (:func:`backend_api.ptychodus.register`) and hands the arguments to
ptychodus's own entry point, so everything ptychodus accepts works unchanged:

- ``pinn-jax ptychodus`` — the GUI (needs PyQt5: ``pip install 'ptychodus[gui]'``);
- ``pinn-jax ptychodus -b train -i IN -o OUT`` — batch training (``IN`` holds
  ``diffraction.h5``, ``product.h5``, ``settings.ini``, ``train_data.npz``, ``test_data.npz``);
- ``pinn-jax ptychodus -b reconstruct -i IN -o OUT`` — batch inference (``IN`` also holds
  ``model.zip``).

Select the backend with ``[Processing] Algorithm = ptychopinn-jax_pinn`` (or
``ptychopinn-jax_supervised``) in ``settings.ini``, or in the GUI's algorithm list.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ptychodus with ``argv`` (default ``sys.argv[1:]``); return its exit code."""
    try:
        import ptychodus.__main__ as ptychodus_main
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        print(
            f"pinn-jax ptychodus: ptychodus is not installed ({exc}); "
            "install it with: pip install 'ptychodus==1.7.*'",
            file=sys.stderr,
        )
        return 2

    from .registration import register

    register()
    args = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    # ptychodus parses sys.argv itself (and hands the rest to Qt), so present it as its own.
    sys.argv = ["ptychodus", *args]
    try:
        code = ptychodus_main.main()
    finally:
        sys.argv = saved
    return int(code or 0)


if __name__ == "__main__":  # the spawn children re-import __main__; keep this guard
    sys.exit(main())
