"""Backend protocol and registry.

A backend is found by name and imported only when it is asked for:

- ``'jax'``        -> ``pinn_jax.backend:JaxBackend`` (this project)
- ``'tensorflow'`` -> ``backend_api.reference_adapters:TensorFlowBackend``, an adapter over the
  reference ``ptycho`` package
- ``'pytorch'``    -> ``backend_api.reference_adapters:PyTorchBackend``, an adapter over the
  reference ``ptycho_torch`` package
- anything else    -> an entry point in the group ``backend_api.backends`` (``name = module:attr``)
  or a target given to :func:`register_backend`.

A target is ``"module:attr"``, a class, or an instance. A class is instantiated without
arguments; the instance is cached, so ``get_backend(name)`` returns the same object each time.

A backend whose package is not installed raises ``RuntimeError`` naming the backend and how to
install it. There is never a silent fallback to another backend. This module imports no backend.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from backend_api.canvas import STITCH_CROP

__all__ = [
    "ENTRY_POINT_GROUP",
    "BUILTIN_BACKENDS",
    "Backend",
    "get_backend",
    "register_backend",
    "unregister_backend",
    "available_backends",
    "is_backend_installed",
    "configure_runtime",
]

ENTRY_POINT_GROUP = "backend_api.backends"

#: name -> import target of the backends this project knows without entry points
BUILTIN_BACKENDS: dict[str, str] = {
    "jax": "pinn_jax.backend:JaxBackend",
    "tensorflow": "backend_api.reference_adapters:TensorFlowBackend",
    "pytorch": "backend_api.reference_adapters:PyTorchBackend",
}

_INSTALL_HINTS: dict[str, str] = {
    "jax": "pip install pinn-jax (it brings jax, flax, optax and orbax-checkpoint)",
    "tensorflow": (
        "pip install tensorflow and the reference PtychoPINN package "
        "(pip install git+https://github.com/hoidn/PtychoPINN)"
    ),
    "pytorch": (
        "pip install torch lightning and the reference PtychoPINN package with its torch "
        "extras (pip install 'ptychopinn[torch] @ git+https://github.com/hoidn/PtychoPINN')"
    ),
}

# the top-level package that must be importable for a builtin backend (checked without importing)
_REQUIRED_PACKAGES: dict[str, tuple[str, ...]] = {
    "jax": ("pinn_jax", "jax", "flax"),
    "tensorflow": ("ptycho", "tensorflow"),
    "pytorch": ("ptycho_torch", "torch"),
}


@runtime_checkable
class Backend(Protocol):
    """What a backend provides. Arrays at the boundary are numpy.

    Data arguments are ``backend_api.raw_data.RawData`` or ``backend_api.container.
    PtychoDataContainer`` (``test_data`` may be None); configs are ``backend_api.config``
    dataclasses. ``params.cfg`` has already been filled from the config by the caller.

    Optional members (a backend may leave them out; callers check with ``getattr``):

    - ``configure_runtime()``: apply process-wide settings (XLA flags, threads) before the
      first computation; entry points (the CLI, the ptychodus child) call it
      (:func:`configure_runtime`).
    - ``reassemble_on_grid_with_weights(patches, positions, object_shape, crop)``: the
      backend's own on-grid stitcher, ``patches (n, N, N, 1)`` complex, ``positions (n, 2)``
      ``[x, y]`` object pixels -> ``(object (H, W) complex, weights (H, W) float)``; without
      it, ``backend_api.ptychodus.convert.stitch_on_grid`` (numpy, the same bilinear
      placement) is used.
    - ``refine_on_grid(amplitudes, positions, probe, initial, *, iterations, noise,
      refine_probe, refine_positions, seed[, tv_weight, full_batch_from])``: physics refinement of ``initial (H, W)`` complex
      on the object grid against ``amplitudes (n, N, N)`` at ``positions (n, 2)`` ``[x, y]``
      -> ``(object (H, W) complex, footprint (H, W) float, info dict)``; the ptychodus child
      calls it when ``RefineIterations > 0`` and refuses that setting for a backend without it
      (``tv_weight``/``full_batch_from``, the low-dose options, only when they are set).
    """

    name: str

    def train_cdi_model(self, train_data: Any, test_data: Any, config: Any, *,
                        on_epoch_end: Any = None, seed: int | None = None) -> dict:
        """Train; returns the reference results dict (``history``, ``history_epochs``,
        ``train_container``, ``test_container``, ``model_instance`` = the trained model, and the
        test-set outputs when test data are given).

        ``on_epoch_end(epoch, logs)``: called once per epoch, in order (``epoch`` 0-based,
        ``logs`` a mapping with ``loss`` and ``val_loss``, NaN when there is no validation),
        while training runs, or -- for a backend that cannot call back -- replayed from the
        history after training. ``seed``: the run's random seed (None: the backend's default).
        ``results['history']`` is a mapping ``{'loss': [...], 'val_loss': [...]}``.
        """
        ...

    def run_cdi_example(
        self,
        train_data: Any,
        test_data: Any,
        config: Any,
        *,
        flip_x: bool = False,
        flip_y: bool = False,
        transpose: bool = False,
        M: int = STITCH_CROP,
        do_stitching: bool = False,
    ) -> tuple[Any, Any, dict]:
        """Train, then stitch the test set when asked: ``(amplitude|None, phase|None, results)``."""
        ...

    def save_model(self, model: Any, output_dir: str | Path, config: Any) -> Path:
        """Write ``output_dir/wts.h5.zip`` (see :mod:`backend_api.archive`); returns its path.

        ``model`` is ``results['model_instance']`` (the workflow unwraps a results dict that
        has one; otherwise it passes what it was given). ``output_dir`` already exists."""
        ...

    def load_inference_bundle(self, model_dir: str | Path) -> tuple[Any, dict]:
        """Load ``model_dir/wts.h5.zip``: ``(model, params_dict)``, where
        ``model.predict([X * intensity_scale, offsets])`` returns ``(B, N, N, 1)`` complex64."""
        ...

    def reconstruct(
        self, model: Any, data: Any, *, config: Any = None, M: int = STITCH_CROP
    ) -> tuple[Any, Any, dict]:
        """Predict every group and stitch: ``(amplitude (H,W), phase (H,W), results)``;
        results hold ``obj_tensor_full`` (B,N,N,1) c64 and ``global_offsets`` (B,1,2,1) f64.

        :func:`backend_api.workflows.reassemble_cdi_image` also passes ``flip_x``, ``flip_y``,
        ``transpose`` (bool) and ``coord_scale`` (float) as keywords, but only when they differ
        from their defaults (False / 1.0); a backend that supports them accepts them."""
        ...


_lock = threading.RLock()
_registered: dict[str, Any] = {}  # name -> target given to register_backend
_instances: dict[str, Any] = {}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep for ep in eps}


def register_backend(name: str, target: Any, *, replace: bool = False) -> None:
    """Register a backend under ``name``.

    target: ``"module:attr"`` (imported on first use), a class (instantiated without
    arguments on first use) or a backend instance. An existing name (builtin, entry point or
    registered) is only replaced with ``replace=True``.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"backend name: expected a non-empty str without spaces, got {name!r}")
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"backend target {target!r}: expected 'module:attr'")
    with _lock:
        if not replace and name in available_backends():
            raise ValueError(
                f"backend {name!r} is already known; pass replace=True to override it"
            )
        _registered[name] = target
        _instances.pop(name, None)


def unregister_backend(name: str) -> None:
    """Forget a backend registered with :func:`register_backend` (builtins come back)."""
    with _lock:
        _registered.pop(name, None)
        _instances.pop(name, None)


def available_backends() -> list[str]:
    """Names of every known backend (builtin, entry point, registered), sorted. Nothing is
    imported; use :func:`is_backend_installed` to see whether one can actually load."""
    names = set(BUILTIN_BACKENDS) | set(_registered)
    try:
        names |= set(_entry_points())
    except Exception:  # a broken third-party distribution must not hide the builtins
        pass
    return sorted(names)


def is_backend_installed(name: str) -> bool:
    """Whether the packages a backend needs can be found (without importing them)."""
    if name in _registered:
        return True
    if name in _REQUIRED_PACKAGES:
        return all(importlib.util.find_spec(pkg) is not None for pkg in _REQUIRED_PACKAGES[name])
    ep = _entry_points().get(name)
    if ep is None:
        return False
    return importlib.util.find_spec(ep.value.split(":", 1)[0].split(".", 1)[0]) is not None


def _missing(name: str, detail: str, exc: BaseException | None = None) -> RuntimeError:
    hint = _INSTALL_HINTS.get(name, "install the package that provides it")
    label = {"jax": "JAX", "tensorflow": "TensorFlow", "pytorch": "PyTorch"}.get(name, name)
    return RuntimeError(
        f"{label} backend selected (backend={name!r}) but it is unavailable: {detail}. "
        f"To use it: {hint}. No other backend is used in its place."
    )


def _import_target(name: str, target: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _missing(name, f"module {module_name!r} could not be imported ({exc})") from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise _missing(name, f"{module_name!r} has no attribute {attr!r}") from exc
    return obj


def _instantiate(name: str, obj: Any) -> Any:
    if isinstance(obj, type):
        obj = obj()
    if not hasattr(obj, "name"):
        try:
            obj.name = name
        except AttributeError:
            pass
    return obj


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (imported and instantiated on first use, then cached).

    ValueError for an unknown name (listing the known ones); RuntimeError naming the backend
    and the install command when its package is missing.
    """
    if not isinstance(name, str):
        raise ValueError(f"backend: expected a str, got {name!r}")
    with _lock:
        if name in _instances:
            return _instances[name]
        if name in _registered:
            target = _registered[name]
        elif name in BUILTIN_BACKENDS:
            target = BUILTIN_BACKENDS[name]
        else:
            ep = None
            try:
                ep = _entry_points().get(name)
            except Exception:
                pass
            if ep is None:
                raise ValueError(
                    f"unknown backend {name!r}; known backends: {available_backends()} "
                    f"(third-party backends register through the entry-point group "
                    f"{ENTRY_POINT_GROUP!r})"
                )
            try:
                target = ep.load()
            except ImportError as exc:
                raise _missing(name, f"entry point {ep.value!r} could not be imported ({exc})") from exc
        if isinstance(target, str):
            target = _import_target(name, target)
        backend = _instantiate(name, target)
        _instances[name] = backend
        return backend


def __getattr__(name: str) -> Any:
    # The reference adapters live in backend_api.reference_adapters; importable from here too.
    if name in ("TensorFlowBackend", "PyTorchBackend"):
        from backend_api import reference_adapters

        return getattr(reference_adapters, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def configure_runtime(backend: Any) -> None:
    """Let ``backend`` apply its process-wide settings (its optional ``configure_runtime()``;
    nothing for a backend without one). Call before the backend's first computation."""
    hook = getattr(backend, "configure_runtime", None)
    if callable(hook):
        hook()
