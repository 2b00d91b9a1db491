"""Import the weights of a TensorFlow (Keras 3) PtychoPINN model into :class:`pinn_jax.model.PtychoPINN`.

Two sources:

* a flat mapping ``'<keras layer name>/<kernel|bias>' -> array`` (the reference fixtures'
  ``weights_gs*.npz``), optionally with ``'__log_scale__'`` (scalar) and ``'__probe_variable__'``
  (``(1, N, N, 1)`` complex) for the two raw ``tf.Variable``s Keras 3 does not save;
* a reference ``wts.h5.zip`` archive (:func:`load_tf_archive`): the layer weights are read with
  h5py from ``<model>/model.keras`` -> ``model.weights.h5``, the probe, the intensity scale and
  the model flags from the ``params.dill`` snapshot (read without code execution by
  :func:`backend_api.archive.read_archive`). TensorFlow is never imported.

Layer names. Keras names each ``Conv2D`` ``conv2d``, ``conv2d_1``, ... in the order the layers are
*constructed*, which is not the order they are applied: each reference decoder builds its two
head convolutions (``conv1`` centre head, ``conv2`` border / full-field head) before its base
blocks, and builds a head convolution even when the head variant never calls it. The table
:data:`KERAS_CONSTRUCTION_ORDER` spells out that order with the module of ours each layer maps to;
:func:`keras_conv_table` turns it into ``keras name -> module path`` for one configuration. Every
kernel and bias shape is checked, and any weight left unmatched or missing is an error that
names it. (Inside ``model.weights.h5`` the HDF5 group names differ again from the layer names;
the real layer name is the ``name`` attribute of ``layers/<group>/vars``, which is what we use.)
"""

from __future__ import annotations

import io
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pinn_jax.models.cnn import DECODER_FILTERS, ENCODER_FILTERS, CNNGenerator
from pinn_jax.model import ModelSpec, PtychoPINN

__all__ = [
    "KERAS_CONSTRUCTION_ORDER",
    "keras_conv_table",
    "load_keras_weights",
    "plan_keras_weights",
    "KerasWeightPlan",
    "read_keras_weights",
    "spec_from_tf_params",
    "load_tf_archive",
    "empty_model",
    "check_fully_loaded",
    "LOG_SCALE_KEY",
    "PROBE_KEY",
]

LOG_SCALE_KEY = "__log_scale__"
PROBE_KEY = "__probe_variable__"

# Construction order of the reference's Conv2D layers (ptycho/model.py create_encoder,
# create_decoder_amp, create_decoder_phase, Conv_*_block, create_decoder_last), one row per
# Conv2D, as (role, our module path template). '{i}' runs over encoder / decoder-base blocks;
# '{dec}' is 'amp' then 'phase' (the amplitude decoder is built first). The 'when' column says
# for which head variant the layer is *used*; a layer that is constructed but unused still takes
# a name (and has no weights in the file), so it stays in the table with path None.
#
#   when            role                                 our module (under the generator)
KERAS_CONSTRUCTION_ORDER: tuple[tuple[str, str, str], ...] = (
    ("always", "encoder block {i}, conv 1", "encoder.{i}.conv_a"),
    ("always", "encoder block {i}, conv 2", "encoder.{i}.conv_b"),
    # --- repeated for dec = amp, then phase ---
    ("pad_object", "{dec} head conv1 (centre, [..., :-4])", "{dec}.head_center"),
    ("probe_big_or_full", "{dec} head conv2 (border / full field)", "{dec}.head_outer"),
    ("always", "{dec} base block {i}, conv 1", "{dec}.base.{i}.conv_a"),
    ("always", "{dec} base block {i}, conv 2", "{dec}.base.{i}.conv_b"),
    ("probe_big_or_full", "{dec} outer up-block conv 1", "{dec}.outer.conv_a"),
    ("probe_big_or_full", "{dec} outer up-block conv 2", "{dec}.outer.conv_b"),
)


def _used(when: str, pad_object: bool, probe_big: bool) -> bool:
    if when == "always":
        return True
    if when == "pad_object":
        return pad_object
    if when == "probe_big_or_full":
        return (not pad_object) or probe_big
    raise AssertionError(when)


def keras_conv_table(N: int, pad_object: bool, probe_big: bool) -> list[tuple[int, str | None, str]]:
    """``[(k, module_path | None, role), ...]`` in Keras construction order.

    Keras layer ``k`` is named ``'conv2d'`` for k = 0 and ``f'conv2d_{k}'`` otherwise (when the
    model was the first one built in its Keras session). ``module_path`` is a dotted path under
    :class:`~pinn_jax.models.cnn.CNNGenerator`, None for a layer that is built but unused.
    """
    rows: list[tuple[str | None, str]] = []
    enc_rows, dec_head, dec_base, dec_outer = (
        KERAS_CONSTRUCTION_ORDER[0:2],
        KERAS_CONSTRUCTION_ORDER[2:4],
        KERAS_CONSTRUCTION_ORDER[4:6],
        KERAS_CONSTRUCTION_ORDER[6:8],
    )
    for i in range(len(ENCODER_FILTERS[N])):
        for when, role, path in enc_rows:
            rows.append((path.format(i=i), role.format(i=i)))
    for dec in ("amp", "phase"):
        for when, role, path in dec_head:
            used = _used(when, pad_object, probe_big)
            rows.append((path.format(dec=dec) if used else None, role.format(dec=dec)))
        for i in range(len(DECODER_FILTERS[N])):
            for when, role, path in dec_base:
                rows.append((path.format(dec=dec, i=i), role.format(dec=dec, i=i)))
        for when, role, path in dec_outer:
            if _used(when, pad_object, probe_big):
                rows.append((path.format(dec=dec), role.format(dec=dec)))
    return [(k, path, role) for k, (path, role) in enumerate(rows)]


_CONV_NAME = re.compile(r"^conv2d(?:_(\d+))?$")


def _conv_index(name: str) -> int | None:
    m = _CONV_NAME.match(name)
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) else 0


def _keras_name(k: int) -> str:
    return "conv2d" if k == 0 else f"conv2d_{k}"


def _module_at(gen: CNNGenerator, path: str) -> nnx.Conv:
    obj: Any = gen
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    if not isinstance(obj, nnx.Conv):
        raise AssertionError(f"{path} is a {type(obj).__name__}, not an nnx.Conv")
    return obj


class KerasWeightPlan(NamedTuple):
    """What :func:`load_keras_weights` would do (pure: nothing is modified).

    ``assignments``: ``(target nnx variable, float32 array)`` pairs; ``probe``: the
    ``__probe_variable__`` array or None; ``log_s``: the ``__log_scale__`` array or None;
    ``loaded``: ``{keras layer name: our module path}`` in layer order; ``problems``: one message
    per unmatched key, missing layer or weight and shape mismatch (empty when it can be applied).
    """

    assignments: list
    probe: np.ndarray | None
    log_s: np.ndarray | None
    loaded: dict
    problems: list


def _sort_weights(weights: Mapping[str, Any], accept_extras: bool):
    """``({layer: {'kernel'|'bias': array}}, {extra key: array}, [unmatched keys])``."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    extras: dict[str, np.ndarray] = {}
    unmatched: list[str] = []
    for key, value in weights.items():
        if key in (LOG_SCALE_KEY, PROBE_KEY):
            extras[key] = np.asarray(value)
            continue
        layer, _, var = key.rpartition("/")
        if _conv_index(layer) is None or var not in ("kernel", "bias"):
            unmatched.append(key)
            continue
        layers.setdefault(layer, {})[var] = np.asarray(value)
    if extras and not accept_extras:
        unmatched += sorted(extras)
    return layers, extras, unmatched


def plan_keras_weights(model: PtychoPINN | CNNGenerator, weights: Mapping[str, Any]) -> KerasWeightPlan:
    """Match reference Keras ``weights`` to ``model``'s modules without modifying anything.

    Arguments as :func:`load_keras_weights`; returns a :class:`KerasWeightPlan`. Raises
    ``ValueError`` only for a model that is neither a PtychoPINN nor a CNNGenerator.
    """
    gen = model.generator if isinstance(model, PtychoPINN) else model
    if not isinstance(gen, CNNGenerator):
        raise ValueError(f"load_keras_weights: model is a {type(model).__name__}, expected PtychoPINN or CNNGenerator")
    is_pinn = isinstance(model, PtychoPINN)
    layers, extras, unmatched = _sort_weights(weights, accept_extras=is_pinn)

    table = keras_conv_table(gen.N, gen.pad_object, gen.probe_big)
    present = sorted(_conv_index(name) for name in layers)
    base = present[0] if present else 0
    expected = {_keras_name(base + k): (path, role) for k, path, role in table if path is not None}
    problems: list[str] = []
    if unmatched:
        problems.append(f"unmatched weight keys (no module of ours takes them): {sorted(unmatched)}")
    extra_layers = sorted(set(layers) - set(expected), key=_conv_index)
    if extra_layers:
        problems.append(
            f"unmatched Conv2D layers {extra_layers}: not part of the N={gen.N}, "
            f"pad_object={gen.pad_object}, probe_big={gen.probe_big} architecture"
        )
    missing = sorted(set(expected) - set(layers), key=_conv_index)
    if missing:
        problems.append(
            "missing Conv2D layers: " + ", ".join(f"{n} ({expected[n][1]})" for n in missing)
        )
    assignments = []
    matched = sorted(set(expected) & set(layers), key=_conv_index)
    for name in matched:
        path, role = expected[name]
        conv = _module_at(gen, path)
        for var, target in (("kernel", conv.kernel), ("bias", conv.bias)):
            if var not in layers[name]:
                problems.append(f"missing weight {name}/{var} ({role})")
                continue
            arr = layers[name][var]
            if tuple(arr.shape) != tuple(target.get_value().shape):
                problems.append(
                    f"{name}/{var} ({role} -> {path}.{var}): shape {tuple(arr.shape)}, "
                    f"expected {tuple(target.get_value().shape)}"
                )
                continue
            assignments.append((target, arr.astype(np.float32)))
    probe = None
    if PROBE_KEY in extras and is_pinn:
        probe = extras[PROBE_KEY]
        n = model.spec.N
        if probe.size != n * n:
            problems.append(f"{PROBE_KEY}: shape {probe.shape}, expected (1, {n}, {n}, 1)")
    log_s = None
    if LOG_SCALE_KEY in extras:
        log_s = extras[LOG_SCALE_KEY]
        if log_s.size != 1 or not np.isfinite(log_s).all():
            problems.append(f"{LOG_SCALE_KEY}: got {log_s!r}, expected a finite scalar")
    loaded = {name: expected[name][0] for name in matched}
    return KerasWeightPlan(assignments, probe, log_s, loaded, problems)


def load_keras_weights(model: PtychoPINN | CNNGenerator, weights: Mapping[str, Any]) -> dict:
    """Copy reference Keras weights into ``model`` (in place), strictly.

    Args:
      model: a :class:`PtychoPINN` (or a bare :class:`CNNGenerator`) of the same configuration
        as the reference model.
      weights: ``'<conv layer name>/kernel'`` ``(3, 3, in, out)`` and ``'/bias'`` ``(out,)``
        arrays for every Conv2D, plus optionally ``'__log_scale__'`` and
        ``'__probe_variable__'`` (PtychoPINN only).

    Keras numbers layers per session; if the model was not the first one built, all names are
    shifted by the same amount, which is detected (the smallest index present is the first
    encoder convolution).

    Returns ``{keras layer name: our module path}`` for the layers loaded.

    Raises ``ValueError`` (before anything is modified) naming every unmatched key, missing
    layer and shape mismatch. The matching is :func:`plan_keras_weights` (pure); this applies it.
    """
    plan = plan_keras_weights(model, weights)
    if plan.problems:
        raise ValueError("load_keras_weights: " + "; ".join(plan.problems))
    for target, arr in plan.assignments:
        target.set_value(jnp.asarray(arr))
    if plan.probe is not None:
        model.set_probe(plan.probe.reshape(model.spec.N, model.spec.N))
    if plan.log_s is not None:
        model.log_s.set_value(jnp.asarray(np.asarray(plan.log_s, np.float32).reshape(())))
    return plan.loaded


def read_keras_weights(source: str | Path | bytes) -> dict[str, np.ndarray]:
    """Read a Keras-3 ``model.keras`` (a zip) or its ``model.weights.h5`` with h5py.

    Returns ``{'<layer name>/kernel': ..., '<layer name>/bias': ...}`` for every layer that has
    weights, the layer name being the ``name`` attribute of ``layers/<group>/vars`` (the HDF5
    group names are not the layer names). Only Conv2D layers (2 variables: kernel, bias) are
    expected in a PtychoPINN model; any other layer with weights is returned as
    ``'<name>/<index>'`` so that :func:`load_keras_weights` reports it as unmatched.
    Optimizer variables are ignored.
    """
    import h5py

    data = Path(source).read_bytes() if not isinstance(source, (bytes, bytearray)) else bytes(source)
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as kz:
            if "model.weights.h5" not in kz.namelist():
                raise ValueError(f"model.keras: no model.weights.h5 member (members: {kz.namelist()})")
            data = kz.read("model.weights.h5")
    out: dict[str, np.ndarray] = {}
    with h5py.File(io.BytesIO(data), "r") as h:
        if "layers" not in h:
            raise ValueError("model.weights.h5: no 'layers' group (not a Keras 3 weights file)")
        for group in h["layers"]:
            vars_ = h["layers"][group].get("vars")
            if vars_ is None or len(vars_) == 0:
                continue
            name = vars_.attrs.get("name", group)
            name = name.decode() if isinstance(name, bytes) else str(name)
            arrays = [vars_[str(i)][()] for i in range(len(vars_))]
            if _conv_index(name) is not None and len(arrays) == 2:
                out[f"{name}/kernel"], out[f"{name}/bias"] = arrays
            else:
                for i, a in enumerate(arrays):
                    out[f"{name}/{i}"] = a
    return out


def empty_model(
    model_config: Any,
    probe: Any,
    intensity_scale: float,
    *,
    probe_trainable: bool = False,
    intensity_scale_trainable: bool = False,
) -> PtychoPINN:
    """A :class:`PtychoPINN` whose generator weights are unallocated placeholders.

    Built with ``nnx.eval_shape`` (no random initialisation, which is slow on CPU for the
    ~26 convolutions); the probe and ``log_s`` are set concretely. Fill it with
    :func:`load_keras_weights`; :func:`check_fully_loaded` says whether anything is missing.
    """
    model = nnx.eval_shape(
        lambda: PtychoPINN(
            model_config,
            np.zeros((ModelSpec.from_config(model_config).N,) * 2, np.complex64),
            1.0,
            probe_trainable=probe_trainable,
            intensity_scale_trainable=intensity_scale_trainable,
            rngs=nnx.Rngs(0),
        )
    )
    model.set_probe(probe)
    model.set_intensity_scale(intensity_scale)
    return model


def check_fully_loaded(model: PtychoPINN | CNNGenerator) -> None:
    """Raise ``ValueError`` naming every state entry that is still a placeholder."""
    flat = nnx.to_flat_state(nnx.state(model))
    missing = [".".join(map(str, path)) for path, v in flat
               if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"model state not loaded (still placeholders): {missing}")


def _flag(params: Mapping[str, Any], *keys: str, default: Any) -> Any:
    for k in keys:
        if k in params and params[k] is not None:
            return params[k]
    return default


def spec_from_tf_params(params: Mapping[str, Any]) -> ModelSpec:
    """The :class:`ModelSpec` of a reference ``params.cfg`` snapshot (legacy dotted keys)."""
    arch = params.get("architecture", "cnn") or "cnn"
    return ModelSpec.from_config(
        {
            "architecture": arch,
            "N": int(params["N"]),
            "gridsize": int(params["gridsize"]),
            "n_filters_scale": int(_flag(params, "n_filters_scale", default=2)),
            "amp_activation": str(_flag(params, "amp_activation", default="sigmoid")),
            "object_big": bool(_flag(params, "object.big", "object_big", default=True)),
            "probe_big": bool(_flag(params, "probe.big", "probe_big", default=False)),
            "probe_mask": bool(_flag(params, "probe.mask", "probe_mask", default=True)),
            "pad_object": bool(_flag(params, "pad_object", default=True)),
            "gaussian_smoothing_sigma": float(_flag(params, "gaussian_smoothing_sigma", default=0.0)),
            "offset": int(_flag(params, "offset", default=4)),
            "max_position_jitter": int(_flag(params, "max_position_jitter", default=10)),
        }
    )


def load_tf_archive(
    path: str | Path,
    *,
    model_name: str | None = None,
    probe_trainable: bool = False,
    intensity_scale_trainable: bool = False,
) -> tuple[PtychoPINN, dict]:
    """Build a :class:`PtychoPINN` from a reference TensorFlow ``wts.h5.zip`` (or its folder).

    Reads ``manifest.dill`` and the model's ``params.dill`` through
    :func:`backend_api.archive.read_archive` (restricted unpickler; the TF ``EagerTensor`` probe
    becomes a numpy array), the Conv2D weights from ``<model>/model.keras`` with h5py.
    ``model_name`` defaults to ``'diffraction_to_obj'`` (no optimizer state, smaller), else
    ``'autoencoder'``; both hold the same layer weights.

    The probe is ``params['probe']`` as stored (already normalised by the reference); the scale
    is ``params['intensity_scale']`` and ``log_s = float32(log(s))`` exactly as the reference
    rebuilds it. The trainable switches default to frozen (the reference under Keras 3).

    Returns ``(model, params)``, ``params`` being the archive's params snapshot (a dict).
    Raises ``ArchiveBackendError`` (a ValueError) for a non-TensorFlow archive and ValueError
    for any weight that does not match the architecture the params describe.
    """
    from backend_api import archive as _archive

    with tempfile.TemporaryDirectory(prefix="pinn_jax_tf_import_") as tmp:
        contents = _archive.read_archive(path, tmp, expected_backend="tensorflow")
        if model_name is None:
            for candidate in ("diffraction_to_obj", "autoencoder"):
                if candidate in contents.models:
                    model_name = candidate
                    break
            else:
                raise ValueError(
                    f"{path}: archive models {list(contents.models)} include neither "
                    "'diffraction_to_obj' nor 'autoencoder'"
                )
        if model_name not in contents.models:
            raise ValueError(f"{path}: model {model_name!r} not in archive models {list(contents.models)}")
        entry = contents.models[model_name]
        keras_file = entry.dir / "model.keras"
        if not keras_file.is_file():
            raise ValueError(f"{path}: model {model_name!r} has no model.keras (a Keras-3 TF archive is expected)")
        weights = read_keras_weights(keras_file)
        params = dict(entry.params)

    spec = spec_from_tf_params(params)
    probe = params.get("probe")
    if probe is None:
        raise ValueError(f"{path}: params snapshot has no 'probe'; cannot rebuild the in-model probe")
    probe = np.asarray(probe)
    if probe.size != spec.N * spec.N:
        raise ValueError(f"{path}: params 'probe' has shape {probe.shape}, expected ({spec.N}, {spec.N}, 1)")
    scale = params.get("intensity_scale")
    if scale is None:
        raise ValueError(f"{path}: params snapshot has no 'intensity_scale'")
    model = empty_model(
        spec,
        probe.reshape(spec.N, spec.N),
        float(np.asarray(scale)),
        probe_trainable=probe_trainable,
        intensity_scale_trainable=intensity_scale_trainable,
    )
    load_keras_weights(model, weights)
    check_fully_loaded(model)
    return model, params
