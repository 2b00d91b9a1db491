"""Adapters over the reference implementations: the ``'tensorflow'`` and ``'pytorch'`` backends.

:class:`TensorFlowBackend` wraps ``ptycho.workflows.components`` (hoidn/PtychoPINN),
:class:`PyTorchBackend` wraps ``ptycho_torch.workflows.components``; neither package is a
dependency of this project, so both are imported only when the backend is asked for
(:func:`backend_api.backends.get_backend`), and a missing one raises ``RuntimeError`` naming
the install command.

These adapters are tested here only with fake reference modules (tests/test_backends.py); the
cross-backend benchmark runs them against the real packages. What they cannot pass on is
refused or said, never dropped in silence:

- ``reconstruct``: the reference TensorFlow path has no ``flip_x`` / ``flip_y`` /
  ``transpose`` / ``coord_scale`` and no on-grid stitching, the torch path has no stitch crop
  ``M``: non-default values raise ``ValueError`` naming them.
- ``train_cdi_model``: neither reference calls back per epoch, so ``on_epoch_end`` is replayed
  from the history after training; neither takes a seed argument, so a ``seed`` gives a
  ``UserWarning`` (the reference seeds from its own configuration).
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backend_api.backends import _missing

__all__ = ["TensorFlowBackend", "PyTorchBackend", "history_losses"]

#: the reference's default stitch crop (``M``)
_REFERENCE_M = 20


def history_losses(history: Any) -> tuple[list[float], list[float]]:
    """``(train, validation)`` losses per epoch from a reference ``results['history']``: a
    Keras ``History`` (its ``.history`` dict) or a mapping, with the keys ``loss`` /
    ``train_loss`` and ``val_loss`` / ``validation_loss`` (what the TF and torch references
    write). Anything else gives ``([], [])``."""
    import numpy as np

    hist = getattr(history, "history", history)
    if not isinstance(hist, Mapping):
        return [], []

    def pick(*names: str) -> list[float]:
        for n in names:
            if n in hist and hist[n] is not None:
                return [float(v) for v in np.asarray(hist[n], dtype=np.float64).ravel()]
        return []

    return pick("loss", "train_loss"), pick("val_loss", "validation_loss")


def _replay_epochs(results: Mapping[str, Any], on_epoch_end: Any) -> None:
    if on_epoch_end is None:
        return
    train, val = history_losses(results.get("history"))
    for i, loss in enumerate(train):
        on_epoch_end(i, {"loss": loss, "val_loss": val[i] if i < len(val) else math.nan})


def _warn_seed(name: str, seed: Any) -> None:
    if seed is not None:
        warnings.warn(f"backend {name!r}: the reference takes no seed argument; seed={seed!r} is "
                      "ignored (it seeds from its own configuration)", UserWarning, stacklevel=3)


def _refuse_options(name: str, what: str, **options: Any) -> None:
    """ValueError naming the options the reference cannot honour (non-default values)."""
    bad = {k: v for k, v in options.items() if v}
    if bad:
        listed = ", ".join(f"{k}={v!r}" for k, v in bad.items())
        raise ValueError(f"backend {name!r}: {what} does not support {listed}")


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

    def train_cdi_model(self, train_data: Any, test_data: Any, config: Any, *,
                        on_epoch_end: Any = None, seed: int | None = None) -> dict:
        _warn_seed(self.name, seed)
        results = self._components.train_cdi_model(
            self._data(train_data), self._data(test_data), self._config(config)
        )
        _replay_epochs(results, on_epoch_end)
        return results

    def run_cdi_example(self, train_data, test_data, config, *, flip_x=False, flip_y=False,
                        transpose=False, M=_REFERENCE_M, do_stitching=False):
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

    def reconstruct(self, model, data, *, config=None, M=_REFERENCE_M, flip_x=False, flip_y=False,
                    transpose=False, coord_scale=1.0, object_shape=None):
        import numpy as np

        _refuse_options(self.name, "reconstruct", flip_x=flip_x, flip_y=flip_y, transpose=transpose,
                        coord_scale=coord_scale != 1.0 and coord_scale, object_shape=object_shape)
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

    def train_cdi_model(self, train_data: Any, test_data: Any, config: Any, *,
                        on_epoch_end: Any = None, seed: int | None = None) -> dict:
        _warn_seed(self.name, seed)
        # the torch port's name, or the generic one in older layouts
        fn = self._fn("train_cdi_model_torch", "train_cdi_model")
        results = fn(self._data(train_data), self._data(test_data), self._config(config))
        _replay_epochs(results, on_epoch_end)
        return results

    def run_cdi_example(self, train_data, test_data, config, *, flip_x=False, flip_y=False,
                        transpose=False, M=_REFERENCE_M, do_stitching=False):
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

    def reconstruct(self, model, data, *, config=None, M=_REFERENCE_M, flip_x=False, flip_y=False,
                    transpose=False, coord_scale=1.0, object_shape=None):
        _refuse_options(self.name, "reconstruct", M=M != _REFERENCE_M and M, flip_x=flip_x, flip_y=flip_y,
                        transpose=transpose, coord_scale=coord_scale != 1.0 and coord_scale,
                        object_shape=object_shape)
        # the torch port exposes no public reconstruct; this is its own inference entry
        inference = importlib.import_module("ptycho_torch.inference")
        return inference._run_inference_and_reconstruct(model, self._data(data), self._config(config))
