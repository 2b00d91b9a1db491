"""Backend protocol and registry.

A backend is found by name and imported only when it is asked for:

- ``'jax'``        -> ``pinn_jax.backend:JaxBackend`` (this project)
- ``'tensorflow'`` -> :class:`TensorFlowBackend`, an adapter over the reference ``ptycho`` package
- ``'pytorch'``    -> :class:`PyTorchBackend`, an adapter over the reference ``ptycho_torch`` package
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

__all__ = [
    "ENTRY_POINT_GROUP",
    "BUILTIN_BACKENDS",
    "Backend",
    "get_backend",
    "register_backend",
    "unregister_backend",
    "available_backends",
    "is_backend_installed",
    "TensorFlowBackend",
    "PyTorchBackend",
]

ENTRY_POINT_GROUP = "backend_api.backends"

#: name -> import target of the backends this project knows without entry points
BUILTIN_BACKENDS: dict[str, str] = {
    "jax": "pinn_jax.backend:JaxBackend",
    "tensorflow": "backend_api.backends:TensorFlowBackend",
    "pytorch": "backend_api.backends:PyTorchBackend",
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
    """

    name: str

    def train_cdi_model(self, train_data: Any, test_data: Any, config: Any) -> dict:
        """Train; returns the reference results dict (``history``, ``history_epochs``,
        ``train_container``, ``test_container``, ``model_instance`` = the trained model, and the
        test-set outputs when test data are given)."""
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
        M: int = 20,
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
        self, model: Any, data: Any, *, config: Any = None, M: int = 20
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


# --------------------------------------------------------------------------------------------
# adapters over the reference implementations (not installed here; thin and import-guarded)


def _ref_config(config: Any, module: Any) -> Any:
    """Rebuild one of our config dataclasses as the reference's dataclass of the same name.

    Only fields the reference knows are passed; our ``backend`` value is replaced by the
    reference backend name (its Literal does not know 'jax')."""
    import dataclasses

    if config is None or not dataclasses.is_dataclass(config):
        return config
    cls = getattr(module, type(config).__name__, None)
    if cls is None:
        return config
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for f in dataclasses.fields(config):
        if f.name not in known:
            continue
        value = getattr(config, f.name)
        if f.name == "model":
            value = _ref_config(value, module)
        kwargs[f.name] = value
    return cls(**kwargs)


class _ReferenceAdapter:
    """Common part of the TF and torch adapters: guarded import of the reference modules."""

    name = ""
    _modules: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._mods: dict[str, Any] = {}
        for mod in self._modules:
            try:
                self._mods[mod] = importlib.import_module(mod)
            except ImportError as exc:
                raise _missing(self.name, f"module {mod!r} could not be imported ({exc})") from exc

    def _config(self, config: Any) -> Any:
        cfg_mod = importlib.import_module("ptycho.config.config")
        ref = _ref_config(config, cfg_mod)
        if ref is not config and hasattr(ref, "backend"):
            ref.backend = self.name
        return ref

    def _data(self, data: Any) -> Any:
        """Our RawData -> the reference RawData (containers are passed through unchanged)."""
        if data is None or type(data).__module__.startswith("ptycho"):
            return data
        if hasattr(data, "diff3d") and hasattr(data, "xcoords"):
            ref = importlib.import_module("ptycho.raw_data").RawData
            return ref(
                data.xcoords, data.ycoords, data.xcoords_start, data.ycoords_start,
                data.diff3d, data.probeGuess, data.scan_index,
                objectGuess=getattr(data, "objectGuess", None), Y=getattr(data, "Y", None),
                norm_Y_I=getattr(data, "norm_Y_I", None),
            )
        return data


class TensorFlowBackend(_ReferenceAdapter):
    """The reference TensorFlow implementation (``ptycho.workflows.components``)."""

    name = "tensorflow"
    _modules = ("ptycho.workflows.components", "ptycho.model_manager")

    @property
    def _components(self) -> Any:
        return self._mods["ptycho.workflows.components"]

    def train_cdi_model(self, train_data: Any, test_data: Any, config: Any) -> dict:
        return self._components.train_cdi_model(
            self._data(train_data), self._data(test_data), self._config(config)
        )

    def run_cdi_example(self, train_data, test_data, config, *, flip_x=False, flip_y=False,
                        transpose=False, M=20, do_stitching=False):
        return self._components.run_cdi_example(
            self._data(train_data), self._data(test_data), self._config(config),
            flip_x=flip_x, flip_y=flip_y, transpose=transpose, M=M, do_stitching=do_stitching,
        )

    def save_model(self, model: Any, output_dir: str | Path, config: Any) -> Path:
        # the reference saves its module-level model singletons, not the object passed in
        self._mods["ptycho.model_manager"].save(str(output_dir))
        return Path(output_dir) / "wts.h5.zip"

    def load_inference_bundle(self, model_dir: str | Path) -> tuple[Any, dict]:
        return self._components.load_inference_bundle(Path(model_dir))

    def reconstruct(self, model, data, *, config=None, M=20, **kwargs):
        import numpy as np

        comps = self._components
        container = comps.create_ptycho_data_container(self._data(data), self._config(config))
        nbutils = importlib.import_module("ptycho.nbutils")
        tf_helper = importlib.import_module("ptycho.tf_helper")
        obj, offsets = nbutils.reconstruct_image(container, diffraction_to_obj=model)
        img = np.squeeze(np.asarray(tf_helper.reassemble_position(obj, offsets, M=M)))
        results = {"obj_tensor_full": np.asarray(obj), "global_offsets": np.asarray(offsets)}
        return np.abs(img), np.angle(img), results


class PyTorchBackend(_ReferenceAdapter):
    """The reference PyTorch port (``ptycho_torch.workflows.components``)."""

    name = "pytorch"
    _modules = ("ptycho_torch.workflows.components", "ptycho_torch.model_manager")

    def _fn(self, *names: str) -> Any:
        for mod in self._mods.values():
            for n in names:
                if hasattr(mod, n):
                    return getattr(mod, n)
        raise _missing(self.name, f"none of {names} found in {list(self._mods)}")

    def train_cdi_model(self, train_data: Any, test_data: Any, config: Any) -> dict:
        fn = self._fn("train_cdi_model_torch", "train_cdi_model")
        return fn(self._data(train_data), self._data(test_data), self._config(config))

    def run_cdi_example(self, train_data, test_data, config, *, flip_x=False, flip_y=False,
                        transpose=False, M=20, do_stitching=False):
        fn = self._fn("run_cdi_example_torch")
        return fn(
            self._data(train_data), self._data(test_data), self._config(config),
            flip_x=flip_x, flip_y=flip_y, transpose=transpose, M=M, do_stitching=do_stitching,
        )

    def save_model(self, model: Any, output_dir: str | Path, config: Any) -> Path:
        fn = self._fn("save_torch_bundle")
        models = model.get("models") if isinstance(model, dict) else model
        if not isinstance(models, dict):
            models = {"diffraction_to_obj": models}
        scale = model.get("intensity_scale") if isinstance(model, dict) else None
        fn(models, str(Path(output_dir) / "wts.h5"), self._config(config), intensity_scale=scale)
        return Path(output_dir) / "wts.h5.zip"

    def load_inference_bundle(self, model_dir: str | Path) -> tuple[Any, dict]:
        models, params_dict = self._fn("load_inference_bundle_torch")(Path(model_dir))
        if "diffraction_to_obj" not in models:
            raise KeyError(f"diffraction_to_obj not in bundle; available: {sorted(models)}")
        return models["diffraction_to_obj"], params_dict

    def reconstruct(self, model, data, *, config=None, M=20, **kwargs):
        inference = importlib.import_module("ptycho_torch.inference")
        return inference._run_inference_and_reconstruct(model, self._data(data), self._config(config))
