"""Adapters over the reference implementations: the ``'tensorflow'`` and ``'pytorch'`` backends.

:class:`TensorFlowBackend` wraps ``ptycho.workflows.components`` (hoidn/PtychoPINN),
:class:`PyTorchBackend` wraps ``ptycho_torch.workflows.components``; neither package is a
dependency of this project, so both are imported only when the backend is asked for
(:func:`backend_api.backends.get_backend`), and a missing one raises ``RuntimeError`` naming
the install command.

Unit tests run them against fake reference modules (tests/test_backends.py); the ``reference``
tests (tests/test_reference_backends.py) and ``benchmarks/parity.py`` run them against the real
packages (checked against hoidn/PtychoPINN 712c23f). What they cannot pass on is refused or
said, never dropped in silence:

- ``reconstruct``: the TensorFlow path applies ``flip_x`` / ``flip_y`` / ``transpose`` /
  ``coord_scale`` and ``M`` the way the reference's ``reassemble_cdi_image`` does; the torch
  path passes ``flip_x`` / ``flip_y`` / ``transpose`` / ``M`` to the port's own stitcher, which
  has no ``coord_scale``. Neither reference stitches onto a given object grid, so
  ``object_shape`` (and a torch ``coord_scale`` other than 1) raise ``ValueError`` naming them.
- ``train_cdi_model``: neither reference calls back per epoch, so ``on_epoch_end`` is replayed
  from the history after training; neither takes a seed argument, so a ``seed`` gives a
  ``UserWarning`` (the reference seeds from its own configuration).
- The torch port's training builds its configuration from ``config.train_data_file`` (it reads
  the probe size and photon metadata from that file). Data handed over in memory without a
  file are written to a temporary NPZ for the duration of the call, so the file the port reads
  is the data it trains on.
- The torch port's amplitude-mode training illuminates with the raw probe divided by
  ``probe_scale``, not with the reference's normalised probe; the adapter passes the port's
  ``amplitude_physics_gain`` that makes the two forward models equal, and ``probe_scale``
  (:func:`_probe_scale_overrides`; ``results['port_overrides']`` records what was passed).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backend_api.backends import _missing

__all__ = ["TensorFlowBackend", "PyTorchBackend", "TorchReferenceModel", "history_losses",
           "xla_flags_unknown_to", "xla_flags_unknown_to_tensorflow"]

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
        # both references compile with TensorFlow's XLA (the torch port stitches with ptycho.tf_helper)
        _check_tensorflow_xla_flags(self.name)

    def _config(self, config: Any) -> Any:
        """Our config as the reference's dataclass, also written into the reference's own
        ``ptycho.params.cfg`` (its CONFIG-001: its training reads N, gridsize, ... from there,
        and only its ``run_cdi_example`` fills it; the workflow fills ours, not that one)."""
        cfg_mod = importlib.import_module("ptycho.config.config")
        ref = _ref_config(config, cfg_mod)
        if ref is not config and hasattr(ref, "backend"):
            ref.backend = self.name
        update = getattr(cfg_mod, "update_legacy_dict", None)
        if ref is not None and callable(update):
            update(importlib.import_module("ptycho.params").cfg, ref)
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


def _xla_flag_names(flags: str) -> list[tuple[str, ...]]:
    """Per ``XLA_FLAGS`` entry, the names XLA could know it by (``--noname`` may be the boolean
    ``name`` negated, or a flag spelled ``noname``)."""
    import shlex

    try:
        entries = shlex.split(flags)
    except ValueError:
        entries = flags.split()
    out = []
    for e in entries:
        if not e.startswith("--") or len(e) <= 2:
            continue
        body = e[2:].split("=", 1)[0]
        names = (body, body[2:]) if body.startswith("no") and "=" not in e and len(body) > 2 else (body,)
        out.append(names)
    return out


def xla_flags_unknown_to(libraries: list[Path], flags: str) -> list[str]:
    """The ``XLA_FLAGS`` names that none of ``libraries`` (the shared objects holding an XLA
    build) contains as a string: XLA aborts the whole process on an unknown flag when it first
    compiles, so a caller can refuse before that. Empty when no library can be read."""
    import mmap

    wanted = _xla_flag_names(flags)
    if not wanted:
        return []
    blobs = []
    try:
        for lib in libraries:
            with open(lib, "rb") as fh:
                blobs.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        if not blobs:
            return []
        unknown = []
        for names in wanted:
            if not any(b.find(n.encode()) >= 0 for n in names for b in blobs):
                unknown.append(names[0])
        return unknown
    except OSError:
        return []  # cannot tell: let XLA decide
    finally:
        for b in blobs:
            b.close()


def xla_flags_unknown_to_tensorflow(flags: str) -> list[str]:
    """The ``XLA_FLAGS`` entries of ``flags`` that the installed TensorFlow's XLA does not know
    (its libraries searched as :func:`xla_flags_unknown_to` does); ``[]`` when there are none,
    when TensorFlow is not installed or when its libraries cannot be read."""
    if not flags.strip():
        return []
    tf_spec = importlib.util.find_spec("tensorflow")
    if tf_spec is None or not tf_spec.submodule_search_locations:
        return []
    root = Path(next(iter(tf_spec.submodule_search_locations)))
    libs = [p for p in (root / "libtensorflow_framework.so.2", root / "libtensorflow_cc.so.2") if p.is_file()]
    return xla_flags_unknown_to(libs, flags)


def _check_tensorflow_xla_flags(name: str) -> None:
    """RuntimeError instead of a process abort when ``XLA_FLAGS`` holds a flag that TensorFlow's
    XLA does not know, e.g. jaxlib's ``--xla_cpu_experimental_ynn_fusion_type`` that
    ``pinn_jax.configure_cpu_runtime`` adds (TF 2.19 aborts with 'Unknown flag in XLA_FLAGS')."""
    import os

    unknown = xla_flags_unknown_to_tensorflow(os.environ.get("XLA_FLAGS", ""))
    if unknown:
        raise RuntimeError(
            f"backend {name!r}: XLA_FLAGS contains {unknown}, which TensorFlow's XLA (used by both reference "
            "backends) does not know; it would abort this process at its first compilation. Run "
            "the reference backend in a process without them (PINN_JAX_XLA_DEFAULTS=0 keeps pinn_jax from "
            "adding its CPU flags), or remove them from XLA_FLAGS"
        )


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
        self._add_predictor(results)
        _replay_epochs(results, on_epoch_end)
        return results

    def _add_predictor(self, results: dict) -> None:
        """``results['diffraction_to_obj']``: the reference's ``model_instance`` is its
        *autoencoder* (three outputs); the model with the protocol's ``predict`` (and the one
        ``save_model`` archives) is the ``ptycho.model.diffraction_to_obj`` singleton that the
        reference's training sets beside it."""
        d2o = getattr(importlib.import_module("ptycho.model"), "diffraction_to_obj", None)
        if d2o is None:
            raise RuntimeError(f"backend {self.name!r}: after training, ptycho.model has no "
                               "diffraction_to_obj model")
        results["diffraction_to_obj"] = d2o

    def run_cdi_example(self, train_data, test_data, config, *, flip_x=False, flip_y=False,
                        transpose=False, M=_REFERENCE_M, do_stitching=False):
        amp, phase, results = self._components.run_cdi_example(
            self._data(train_data), self._data(test_data), self._config(config),
            flip_x=flip_x, flip_y=flip_y, transpose=transpose, M=M, do_stitching=do_stitching,
        )
        self._add_predictor(results)
        return amp, phase, results

    def save_model(self, model: Any, output_dir: str | Path, config: Any) -> Path:
        # the reference saves its module-level model singletons, not the object passed in
        self._mods["ptycho.model_manager"].save(str(output_dir))
        return Path(output_dir) / "wts.h5.zip"

    def load_inference_bundle(self, model_dir: str | Path) -> tuple[Any, dict]:
        return self._components.load_inference_bundle(Path(model_dir))

    def reconstruct(self, model, data, *, config=None, M=_REFERENCE_M, flip_x=False, flip_y=False,
                    transpose=False, coord_scale=1.0, object_shape=None):
        """Predict every group with ``model`` and stitch with the reference's
        ``reassemble_position``; ``transpose``, ``flip_x``, ``flip_y`` and ``coord_scale`` act
        as in the reference's ``reassemble_cdi_image`` (patch axes swapped, offset signs
        flipped, offsets scaled), which itself only uses its module-level model."""
        import numpy as np

        # the reference cannot place its stitch on a given object grid
        _refuse_options(self.name, "reconstruct", object_shape=object_shape)
        coord_scale = _check_coord_scale(self.name, coord_scale)
        comps = self._components
        container = comps.create_ptycho_data_container(self._data(data), self._config(config))
        nbutils = importlib.import_module("ptycho.nbutils")
        tf_helper = importlib.import_module("ptycho.tf_helper")
        obj, offsets = nbutils.reconstruct_image(container, diffraction_to_obj=model)
        obj = np.asarray(obj)
        offsets = np.array(offsets, dtype=np.float64)  # a copy: the flips below write into it
        if obj.ndim != 4:
            raise ValueError(f"backend {self.name!r}: the reference predicted patches of shape "
                             f"{obj.shape}; expected (B, N, N, C)")
        if transpose:
            obj = np.transpose(obj, (0, 2, 1, 3))
        if flip_x:
            offsets[:, 0, 0, :] = -offsets[:, 0, 0, :]
        if flip_y:
            offsets[:, 0, 1, :] = -offsets[:, 0, 1, :]
        offsets = offsets * coord_scale
        img = np.squeeze(np.asarray(tf_helper.reassemble_position(obj, offsets, M=M)))
        results = {"obj_tensor_full": obj, "global_offsets": offsets}
        return np.abs(img), np.angle(img), results


class TorchReferenceModel:
    """A trained torch-port model with the protocol's ``predict`` call.

    The port's ``PtychoPINN_Lightning`` has ``predict = False`` (an attribute, not the Keras
    method) and predicts with ``forward_predict(x (B, C, N, N), positions, probe,
    input_scale_factor)``, returning channels-first ``(B, C, N, N)`` complex patches. Its own
    stitcher feeds the container's normalised ``X`` with ``input_scale_factor = 1``; so does
    :meth:`predict`, after dividing the protocol's ``X * intensity_scale`` by the scale it was
    saved with. ``forward_predict`` does not read ``positions`` or ``probe`` (712c23f); they
    are passed as given for a port that would.
    """

    def __init__(self, module: Any, intensity_scale: float, probe: Any = None) -> None:
        scale = float(intensity_scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"intensity_scale={intensity_scale!r}: expected a finite value > 0")
        self.module = module
        self.intensity_scale = scale
        self.probe = probe

    def __repr__(self) -> str:
        return (f"TorchReferenceModel({type(self.module).__name__}, "
                f"intensity_scale={self.intensity_scale:.6g})")

    def predict(self, inputs: Any, batch_size: int = 64, verbose: Any = 0) -> Any:
        """``predict([X * intensity_scale (B, N, N, C), offsets (B, 1, 2, C)])`` ->
        ``(B, N, N, C)`` complex64, batch by batch under ``torch.no_grad``."""
        import numpy as np
        import torch

        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError("predict: expected [X * intensity_scale, offsets], got "
                             f"{type(inputs).__name__}")
        x = np.asarray(inputs[0], dtype=np.float32)
        offsets = np.asarray(inputs[1], dtype=np.float32)
        if x.ndim != 4 or offsets.ndim != 4 or offsets.shape[0] != x.shape[0] \
                or offsets.shape[1:3] != (1, 2) or offsets.shape[3] != x.shape[3]:
            raise ValueError(f"predict: X {x.shape} must be (B, N, N, C) and offsets "
                             f"{offsets.shape} (B, 1, 2, C) with the same B and C")
        if int(batch_size) < 1:
            raise ValueError(f"predict: batch_size={batch_size!r}: expected >= 1")
        n, N, C = x.shape[0], x.shape[1], x.shape[3]
        probe = self.probe
        if probe is None:
            probe = np.ones((N, N), np.complex64)  # not read by forward_predict (see the class)
        probe_t = torch.as_tensor(np.asarray(probe, dtype=np.complex64))
        module = self.module
        was_training = bool(getattr(module, "training", False))
        module.eval()
        out = []
        try:
            with torch.no_grad():
                for start in range(0, n, int(batch_size)):
                    xb = torch.from_numpy(x[start:start + batch_size] / self.intensity_scale)
                    xb = xb.permute(0, 3, 1, 2).contiguous()  # (B, N, N, C) -> (B, C, N, N)
                    pos = torch.from_numpy(offsets[start:start + batch_size])
                    ones = torch.ones(xb.shape[0], 1, 1, 1, dtype=torch.float32)
                    pred = module.forward_predict(xb, pos, probe_t, ones)
                    if pred.ndim == 3:  # (B, N, N): one channel without its axis
                        pred = pred.unsqueeze(1)
                    if tuple(pred.shape[1:]) != (C, N, N):
                        raise ValueError(f"forward_predict returned {tuple(pred.shape)}; expected "
                                         f"(B, {C}, {N}, {N})")
                    out.append(pred.permute(0, 2, 3, 1).cpu().numpy().astype(np.complex64))
        finally:
            module.train(was_training)
        if not out:
            return np.zeros((0, N, N, C), np.complex64)
        return np.concatenate(out, axis=0)


def _check_coord_scale(name: str, coord_scale: Any) -> float:
    try:
        value = float(coord_scale)
    except (TypeError, ValueError):
        raise ValueError(f"backend {name!r}: coord_scale={coord_scale!r}: expected a number") from None
    if not math.isfinite(value) or value == 0:
        raise ValueError(f"backend {name!r}: coord_scale={coord_scale!r}: expected a finite, "
                         "non-zero number")
    return value


# The torch port's default scale contract ("ci_intensity_v2", "count_intensity") reads diff3d as
# photon-count intensities; backend_api's data contract is the TensorFlow reference's: diff3d
# holds diffraction amplitudes, normalised by the training like the reference does. The port's
# own name for that contract is this pair ("legacy compatibility" in its config factory). Its
# amplitude-mode training ignores the pair; what that mode needs is the probe scale below.
TORCH_LEGACY_SCALE_CONTRACT = {"scale_contract_version": "legacy_v1", "measurement_domain": "normalized_amplitude"}


def reference_probe_norm(probe: Any, probe_scale: float) -> float:
    """The TensorFlow reference's probe normalisation (``ptycho.probe.set_probe``): its forward
    model illuminates with ``probe / norm``, ``norm = probe_scale * mean(|mask * probe|)`` over
    the N x N pixels, ``mask`` the disk ``r < N // 4`` around pixel ``(N - 1) / 2``."""
    import numpy as np

    p = np.asarray(probe)
    if p.ndim == 3 and p.shape[-1] == 1:
        p = p[..., 0]
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"probe of shape {p.shape}: expected (N, N) or (N, N, 1)")
    n = p.shape[0]
    a = np.arange(n, dtype=np.float64) - n // 2 + 0.5
    mask = np.sqrt(a[:, None] ** 2 + a[None, :] ** 2) < n // 4
    norm = float(probe_scale) * float(np.mean(np.abs(p) * mask))
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"probe normalisation {norm!r}: the probe is zero (or not finite) in its mask")
    return norm


def _port_knows(field_name: str) -> bool:
    """Whether the port's ``ptycho_torch.config_params.ModelConfig`` has ``field_name``."""
    import dataclasses

    try:
        cls = importlib.import_module("ptycho_torch.config_params").ModelConfig
    except (ImportError, AttributeError):
        return False
    return dataclasses.is_dataclass(cls) and field_name in {f.name for f in dataclasses.fields(cls)}


def _probe_scale_overrides(probe: Any, ref_config: Any) -> dict:
    """The port's ``probe_scale`` and ``amplitude_physics_gain`` for the reference's forward model.

    The port's in-memory training path (``_ensure_container``, also behind its own CLI) hands the
    raw ``probeGuess`` to its amplitude-mode forward model, which divides it by ``probe_scale``
    but never normalises it as the reference does (``reference_probe_norm``); only its
    memory-mapped dataloader does. Since upstream removed the accidental batch-size gain of its old
    flat probe layout (its PROBE-RANK-001), nothing makes up the difference: for a probe with
    max |P| = 1 the predicted intensity is ~100x the measured one too small, the sigmoid
    amplitude sits at 1 and carries nothing (benchmarks/README.md). The port's knob for this is
    ``amplitude_physics_gain`` (predicted amplitude times a constant, training only); with
    ``gain = port probe_scale / norm`` its predicted amplitude ``gain * |F(O * P / probe_scale)|``
    is the reference's ``|F(O * P / norm)|``. Nothing is passed for a port without that field
    (older ports kept the batch-size gain) or without a probe to read."""
    if probe is None or not _port_knows("amplitude_physics_gain"):
        return {}
    if hasattr(probe, "detach"):
        probe = probe.detach().cpu().numpy()
    probe_scale = float(getattr(getattr(ref_config, "model", None), "probe_scale", 4.0))
    return {"probe_scale": probe_scale,
            "amplitude_physics_gain": probe_scale / reference_probe_norm(probe, probe_scale)}


def _legacy_scale_overrides(train_fn: Any, extra: Mapping[str, Any] | None = None) -> dict:
    """``{"overrides": TORCH_LEGACY_SCALE_CONTRACT | extra}`` when the port's training function
    takes ``overrides`` (712c23f and later), else nothing (older ports had only the legacy
    contract)."""
    import inspect

    try:
        params = inspect.signature(train_fn).parameters
    except (TypeError, ValueError):
        return {}
    if "overrides" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {"overrides": {**TORCH_LEGACY_SCALE_CONTRACT, **(extra or {})}}
    return {}


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

    def _train_file(self, data: Any, ref_config: Any, stack: Any) -> None:
        """Give the port the ``train_data_file`` it insists on (see the module docstring)."""
        if getattr(ref_config, "train_data_file", None) is not None:
            return
        import tempfile

        import numpy as np

        if not (hasattr(data, "diff3d") and hasattr(data, "probeGuess")):
            raise ValueError(
                f"backend {self.name!r}: the torch port needs config.train_data_file (it reads "
                f"the probe size from it) and train data of type {type(data).__name__} cannot "
                "be written to one; set train_data_file or pass RawData"
            )
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pinn_torch_train_")))
        path = folder / "train_data.npz"
        arrays = {k: np.asarray(getattr(data, k)) for k in
                  ("xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d",
                   "probeGuess", "scan_index")}
        if getattr(data, "objectGuess", None) is not None:
            arrays["objectGuess"] = np.asarray(data.objectGuess)
        np.savez(path, **arrays)
        ref_config.train_data_file = path

    def _train(self, train_data: Any, test_data: Any, config: Any) -> dict:
        import contextlib
        import dataclasses

        fn = self._fn("train_cdi_model_torch", "train_cdi_model")
        train_ref = self._data(train_data)
        ref_config = self._config(config)
        if ref_config is config and dataclasses.is_dataclass(config):
            ref_config = dataclasses.replace(config)  # the temporary file must not leak into the caller's
        with contextlib.ExitStack() as stack:
            self._train_file(train_ref, ref_config, stack)
            train_probe = getattr(train_ref, "probeGuess", getattr(train_ref, "probe", None))
            kwargs = _legacy_scale_overrides(fn, _probe_scale_overrides(train_probe, ref_config))
            results = fn(train_ref, self._data(test_data), ref_config, **kwargs)
        models = results.get("models") if isinstance(results, Mapping) else None
        if not isinstance(models, Mapping) or "diffraction_to_obj" not in models:
            raise RuntimeError(
                f"backend {self.name!r}: the torch port's training returned no "
                f"models['diffraction_to_obj'] (keys: {sorted(results) if isinstance(results, Mapping) else type(results).__name__})"
            )
        scale = results.get("intensity_scale")
        if scale is None:
            raise RuntimeError(f"backend {self.name!r}: the torch port's training returned no "
                               "intensity_scale; the model could not be used with predict()")
        container = results.get("train_container")
        probe = getattr(container, "probe", None)
        if probe is not None and hasattr(probe, "detach"):
            probe = probe.detach().cpu().numpy()
        # the protocol's trained model: the Lightning module with the scale it was trained at
        results["model_instance"] = TorchReferenceModel(models["diffraction_to_obj"], scale, probe)
        results["diffraction_to_obj"] = results["model_instance"]  # the same key as the TF adapter
        results["port_overrides"] = dict(kwargs.get("overrides") or {})  # what the port was asked for
        return results

    def train_cdi_model(self, train_data: Any, test_data: Any, config: Any, *,
                        on_epoch_end: Any = None, seed: int | None = None) -> dict:
        _warn_seed(self.name, seed)
        results = self._train(train_data, test_data, config)
        _replay_epochs(results, on_epoch_end)
        return results

    def run_cdi_example(self, train_data, test_data, config, *, flip_x=False, flip_y=False,
                        transpose=False, M=_REFERENCE_M, do_stitching=False):
        """The two steps of the port's ``run_cdi_example_torch`` (train, then stitch the test
        set when asked), without its third: it also writes ``wts.h5.zip`` into
        ``config.output_dir``, while this protocol saves only in :meth:`save_model`."""
        results = self._train(train_data, test_data, config)
        amp = phase = None
        if do_stitching and test_data is not None:
            amp, phase, stitched = self.reconstruct(results["model_instance"], test_data,
                                                    config=config, M=M, flip_x=flip_x,
                                                    flip_y=flip_y, transpose=transpose)
            results.update(stitched)
        return amp, phase, results

    def _unwrap(self, model: Any) -> tuple[Any, float | None, Any]:
        """(Lightning module, intensity scale or None, probe or None) of what callers pass:
        a :class:`TorchReferenceModel`, a results dict (``models`` + ``intensity_scale``) or
        the bare module."""
        if isinstance(model, TorchReferenceModel):
            return model.module, model.intensity_scale, model.probe
        if isinstance(model, Mapping):
            if isinstance(model.get("model_instance"), TorchReferenceModel):
                return self._unwrap(model["model_instance"])
            models = model.get("models")
            if isinstance(models, Mapping) and "diffraction_to_obj" in models:
                return models["diffraction_to_obj"], model.get("intensity_scale"), None
            raise ValueError(f"backend {self.name!r}: a results dict without "
                             f"models['diffraction_to_obj'] (keys: {sorted(model)})")
        return model, None, None

    def save_model(self, model: Any, output_dir: str | Path, config: Any) -> Path:
        """``save_torch_bundle`` (weights + params snapshot), then the port's scaling metadata
        (``torch_scaling_metadata.pt``), which its loader needs to rebuild the model: the port
        appends it itself only inside ``run_cdi_example_torch``."""
        module, scale, _ = self._unwrap(model)
        if scale is None:
            raise ValueError(
                f"backend {self.name!r}: save_model needs the training intensity scale; pass "
                "results['model_instance'] or the results dict of train_cdi_model"
            )
        save = self._fn("save_torch_bundle")
        persist = self._fn("_persist_bundle_scaling_metadata")
        # a placeholder autoencoder entry, as the port's own training results carry one
        models = {"autoencoder": {"_sentinel": True}, "diffraction_to_obj": module}
        archive = Path(output_dir) / "wts.h5.zip"
        save(models, str(Path(output_dir) / "wts.h5"), self._config(config), intensity_scale=scale)
        if not archive.is_file():
            raise RuntimeError(f"backend {self.name!r}: save_torch_bundle wrote no {archive}")
        persist(archive, module)
        return archive

    def load_inference_bundle(self, model_dir: str | Path) -> tuple[Any, dict]:
        models, params_dict = self._fn("load_inference_bundle_torch")(Path(model_dir))
        if "diffraction_to_obj" not in models:
            raise KeyError(f"diffraction_to_obj not in bundle; available: {sorted(models)}")
        scale = params_dict.get("intensity_scale")
        if scale is None:
            raise ValueError(f"{Path(model_dir) / 'wts.h5.zip'}: its params snapshot has no "
                             "intensity_scale, so predict() could not undo the input scaling")
        return TorchReferenceModel(models["diffraction_to_obj"], scale,
                                   params_dict.get("probe")), params_dict

    def _stitch_config(self, config: Any) -> Any:
        """The port groups the test data with a TrainingConfig's fields (``sequential_sampling``,
        ``train_data_file`` included); an InferenceConfig becomes the reference TrainingConfig
        with its grouping fields."""
        ref = self._config(config)
        if type(config).__name__ != "InferenceConfig":
            return ref
        cfg_mod = importlib.import_module("ptycho.config.config")
        return cfg_mod.TrainingConfig(
            model=ref.model, n_groups=config.n_groups, neighbor_count=config.neighbor_count,
            subsample_seed=config.subsample_seed, backend=self.name,
        )

    def reconstruct(self, model, data, *, config=None, M=_REFERENCE_M, flip_x=False, flip_y=False,
                    transpose=False, coord_scale=1.0, object_shape=None):
        """The port's own stitcher (``_reassemble_cdi_image_torch``: ``forward_predict`` over
        the test container, then the reference's ``reassemble_position``), which applies
        ``flip_x``, ``flip_y``, ``transpose`` and ``M`` itself."""
        import numpy as np

        _refuse_options(self.name, "reconstruct", object_shape=object_shape,
                        coord_scale=_check_coord_scale(self.name, coord_scale) != 1.0 and coord_scale)
        if config is None:
            raise ValueError(f"backend {self.name!r}: reconstruct needs the config (N, gridsize, "
                             "n_groups, neighbor_count of the test grouping)")
        module, _, _ = self._unwrap(model)
        stitch = self._fn("_reassemble_cdi_image_torch")
        amp, phase, results = stitch(self._data(data), self._stitch_config(config), bool(flip_x),
                                     bool(flip_y), bool(transpose), int(M),
                                     train_results={"models": {"diffraction_to_obj": module}})
        results = dict(results)
        offsets = np.asarray(results["global_offsets"], dtype=np.float64)
        # the port hands back its offsets as (B, 1, 1, 2); the protocol's are (B, 1, 2, 1)
        if offsets.ndim == 4 and offsets.shape[2:] == (1, 2):
            offsets = np.swapaxes(offsets, 2, 3)
        results["global_offsets"] = offsets
        results["obj_tensor_full"] = np.asarray(results["obj_tensor_full"]).astype(np.complex64)
        return np.asarray(amp), np.asarray(phase), results
