"""Make ptychodus 1.7 list the ``PtychoPINN-JAX`` library without editing ptychodus.

ptychodus 1.7.0 has no hook for third-party reconstructors: ``ModelCore.__init__`` builds a
literal list of five libraries and hands it to ``ProcessingCore``; its plugin registry has no
reconstructor category and it reads no entry points. So :func:`register` does the least
invasive thing available: it replaces the name ``ProcessingCore`` *in the module
``ptychodus.model.core``* with a subclass whose constructor appends our library to the list it
is given. Nothing else in ptychodus changes; ``ModelCore`` objects built before the call are
unaffected; :func:`unregister` puts the original back. The subclass keeps a handle on the
library it added as ``processing_core.ptychopinn_jax_library``.

The same call also (1) replaces the subclass's ``processing_api`` with one whose ``train``
feeds the loss plot and re-enables Infer (:mod:`.processing`), and (2) when PyQt5 is importable,
makes ptychodus's GUI show our parameter panel for ``ptychopinn-jax_*`` (:mod:`.gui`).

The library is built inside ``ProcessingCore``'s constructor, i.e. after ptychodus's own
PtychoPINN library, so the ``PtychoPINNModel/Training/Inference`` settings groups exist and
are shared (see :mod:`backend_api.ptychodus.settings`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["register", "unregister", "is_registered"]

_MARKER = "_ptychopinn_jax_original"


def _developer_mode() -> bool:
    # ModelCore's own definition of developer mode (its logger at DEBUG or lower).
    return logging.getLogger("ptychodus.model.core").getEffectiveLevel() <= logging.DEBUG


def is_registered() -> bool:
    """True while ``ptychodus.model.core.ProcessingCore`` is our wrapper."""
    import ptychodus.model.core as core

    return hasattr(core.ProcessingCore, _MARKER)


def register(*, backend_registrations: Mapping[str, str] | None = None) -> None:
    """Add ``PtychoPINN-JAX`` to every ``ModelCore`` built after this call (idempotent).

    Call it before constructing ``ptychodus.model.ModelCore`` (or before
    ``ptychodus.__main__.main()``), e.g.::

        import backend_api.ptychodus
        backend_api.ptychodus.register()
        from ptychodus.model import ModelCore
        with ModelCore() as model: ...

    Args:
        backend_registrations: extra ``{name: 'module:attr'}`` backends the library passes to
            its child processes (see :class:`PtychoPINNJaxReconstructorLibrary`). A second
            call replaces them.
    """
    import ptychodus.model.core as core

    from .library import LIBRARY_NAME, PtychoPINNJaxReconstructorLibrary
    from .processing import make_processing_api

    original = getattr(core.ProcessingCore, _MARKER, core.ProcessingCore)
    registrations = dict(backend_registrations or {})

    class ProcessingCore(original):  # type: ignore[misc, valid-type]
        __doc__ = original.__doc__

        def __init__(
            self,
            task_manager: Any,
            settings_registry: Any,
            product_api: Any,
            algorithm_libraries: Any,
            *args: Any,
            **kwargs: Any,
        ) -> None:
            libraries = list(algorithm_libraries)
            ours = next((lib for lib in libraries if lib.name == LIBRARY_NAME), None)
            if ours is None:
                ours = PtychoPINNJaxReconstructorLibrary(
                    settings_registry,
                    _developer_mode(),
                    backend_registrations=registrations,
                )
                libraries.append(ours)
            super().__init__(task_manager, settings_registry, product_api, libraries,
                             *args, **kwargs)
            self.ptychopinn_jax_library = ours
            # Training from the GUI: losses to the loss plot, Infer enabled afterwards
            # (see .processing); the processing API also tells the GUI panel where we are.
            api = self.processing_api
            self.processing_api = make_processing_api(type(api), ours)(
                task_manager, product_api, self.algorithm_parameter, api.task_monitor)

    setattr(ProcessingCore, _MARKER, original)
    ProcessingCore.__module__ = __name__
    ProcessingCore.__qualname__ = "ProcessingCore"
    core.ProcessingCore = ProcessingCore
    _install_gui()


def gui_available() -> str | None:
    """None when the GUI panel can be installed, else why not (PyQt5 missing, ...)."""
    try:
        import PyQt5.QtWidgets  # noqa: F401
    except Exception as exc:  # ImportError, or a broken Qt installation
        return f"PyQt5 is not importable ({type(exc).__name__}: {exc})"
    return None


def _install_gui() -> None:
    # The panel needs ptychodus's Qt controllers; batch mode and headless use work without.
    reason = gui_available()
    if reason is not None:
        logging.getLogger(__name__).debug("PtychoPINN-JAX GUI panel not installed: %s", reason)
        return
    from . import gui

    gui.install()


def unregister() -> None:
    """Undo :func:`register` for ``ModelCore`` objects built afterwards."""
    import ptychodus.model.core as core

    original = getattr(core.ProcessingCore, _MARKER, None)
    if original is not None:
        core.ProcessingCore = original
    import sys

    if "backend_api.ptychodus.gui" in sys.modules:
        sys.modules["backend_api.ptychodus.gui"].uninstall()
