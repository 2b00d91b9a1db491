"""PtychoPINN (any backend_api backend, JAX by default) as a ptychodus 1.7 reconstructor.

- :class:`PtychoPINNJaxReconstructorLibrary` — the ``PtychoPINN-JAX`` ``ReconstructorLibrary``
  (``PINN`` and ``Supervised`` ``TrainableReconstructor``\\ s);
- :func:`register` / :func:`unregister` — list it in every ``ptychodus.model.ModelCore``
  built afterwards (ptychodus has no plugin hook for reconstructors, see
  :mod:`.registration`);
- :func:`backend_api.ptychodus.launcher.main` — ``pinn-jax ptychodus [args]``.

Importing this package is cheap and imports neither ptychodus nor jax: the names above are
loaded on first use (the spawned child processes import :mod:`.child` through this package and
must not pay for ptychodus). Training and inference run in a spawned child per call.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LIBRARY_NAME",
    "PtychoPINNJaxReconstructor",
    "PtychoPINNJaxReconstructorLibrary",
    "register",
    "unregister",
    "is_registered",
]

_LAZY = {
    "LIBRARY_NAME": ".library",
    "PtychoPINNJaxReconstructor": ".library",
    "PtychoPINNJaxReconstructorLibrary": ".library",
    "register": ".registration",
    "unregister": ".registration",
    "is_registered": ".registration",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    try:
        module = importlib.import_module(module_name, __name__)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "ptychodus":
            raise ModuleNotFoundError(
                "backend_api.ptychodus needs ptychodus 1.7: pip install 'ptychodus==1.7.*'",
                name=exc.name,
            ) from exc
        raise
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
