"""The legacy flat parameter dict (``ptycho.params`` of the reference), for legacy callers.

``cfg`` is a plain module-level ``dict`` holding the reference's defaults (:data:`DEFAULT_CFG`).
Workflows fill it with :func:`backend_api.config.update_legacy_dict`, archives store a snapshot
of it, and loading an archive writes the snapshot back. **No code in this project reads it to
decide anything**: configuration travels explicitly as dataclasses.

Because callers (and tests) may rebind ``backend_api.params.cfg`` to another dict, every
function here looks the module attribute up at call time instead of keeping a reference.

Semantics kept from the reference:

* :func:`get` computes and caches ``'bigN'``; a missing key without a default is a KeyError;
  any missing default key is re-inserted first (:func:`ensure_defaults`), so
  ``cfg.clear(); get('N')`` gives 128.
* :func:`set` validates before writing (``data_source`` known; ``realspace_weight > 0``
  whenever ``realspace_mae_weight > 0``). Deliberate difference: a violation raises
  ``ValueError`` (not an ``assert``, which ``python -O`` would drop) and nothing is written.
* After :func:`seal`, :func:`set` on a key outside :data:`SEAL_WHITELIST` logs a WARNING on
  the ``backend_api.params`` logger containing "post-seal params.cfg write" and the caller's
  ``file:line``; the write still happens. Direct ``cfg[key] = ...`` writes bypass this.
"""

from __future__ import annotations

import logging
import sys
from types import MappingProxyType
from typing import Any, Mapping

__all__ = [
    "DEFAULT_CFG",
    "DATA_SOURCES",
    "SEAL_WHITELIST",
    "cfg",
    "ensure_defaults",
    "get",
    "set",
    "params",
    "reset",
    "validate",
    "seal",
    "unseal",
    "is_sealed",
    "get_bigN",
    "get_padding_size",
    "get_padded_size",
]

logger = logging.getLogger(__name__)

#: The reference's legacy defaults, key for key. Read-only; ``cfg`` starts as a copy.
DEFAULT_CFG: Mapping[str, Any] = MappingProxyType(
    {
        "N": 128,
        "offset": 4,
        "gridsize": 2,
        "outer_offset_train": None,
        "outer_offset_test": None,
        "batch_size": 16,
        "nepochs": 60,
        "n_filters_scale": 2,
        "output_prefix": "outputs",
        "big_gridsize": 10,
        "max_position_jitter": 10,
        "sim_jitter_scale": 0.0,
        "default_probe_scale": 0.7,
        "mae_weight": 0.0,
        "nll_weight": 1.0,
        "tv_weight": 0.0,
        "realspace_mae_weight": 0.0,
        "realspace_weight": 0.0,
        "nphotons": 1e9,
        "nimgs_train": 9,
        "nimgs_test": 3,
        "data_source": "generic",
        "probe.trainable": False,
        "intensity_scale.trainable": False,
        "positions.provided": False,
        "object.big": True,
        "probe.big": False,
        "probe_scale": 10.0,
        "set_phi": False,
        "probe.mask": True,
        "pad_object": True,
        "model_type": "pinn",
        "label": "",
        "size": 392,
        "amp_activation": "sigmoid",
        "h5_path": "wts.h5",
        "npseed": 42,
        "debug": True,
        "gaussian_smoothing_sigma": 0.0,
        "use_xla_translate": True,
    }
)

#: Values the reference accepts for ``cfg['data_source']``.
DATA_SOURCES = frozenset(
    {"lines", "grf", "experimental", "points", "testimg", "diagonals", "xpp", "V", "generic"}
)

#: Keys that may be written with :func:`set` after :func:`seal` without a warning.
SEAL_WHITELIST = frozenset({"intensity_scale", "probe", "timestamp"})

#: The live legacy dict. Rebinding it is allowed; functions here look it up at call time.
cfg: dict[str, Any] = dict(DEFAULT_CFG)

_sealed = False
_MISSING = object()


def _live() -> dict[str, Any]:
    # Look the attribute up on the module object so a rebinding from outside
    # (``backend_api.params.cfg = snapshot``) is honoured.
    return sys.modules[__name__].cfg


def ensure_defaults() -> None:
    """Re-insert every :data:`DEFAULT_CFG` key missing from ``cfg`` (existing keys untouched)."""
    live = _live()
    for key, value in DEFAULT_CFG.items():
        if key not in live:
            live[key] = value


def reset() -> None:
    """Restore ``cfg`` to exactly :data:`DEFAULT_CFG` (same dict object) and unseal."""
    global _sealed
    live = _live()
    live.clear()
    live.update(DEFAULT_CFG)
    _sealed = False


def _int_key(mapping: Mapping[str, Any], key: str) -> int:
    value = mapping[key]
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if float(value) == int(value):
                return int(value)
        except (TypeError, ValueError):
            pass
        raise ValueError(f"params.cfg[{key!r}]={value!r} is invalid: expected an integer")
    return value


def _bigN(mapping: Mapping[str, Any]) -> int:
    n, gridsize, offset = (_int_key(mapping, k) for k in ("N", "gridsize", "offset"))
    return n + (gridsize - 1) * offset


def get_bigN() -> int:
    """``N + (gridsize - 1) * offset``: the side of a merged group canvas in pixels."""
    ensure_defaults()
    return _bigN(_live())


def get_padding_size() -> int:
    """``(gridsize - 1) * offset + max_position_jitter`` in pixels."""
    ensure_defaults()
    live = _live()
    return (_int_key(live, "gridsize") - 1) * _int_key(live, "offset") + _int_key(
        live, "max_position_jitter"
    )


def get_padded_size() -> int:
    """``bigN + max_position_jitter`` in pixels (74 for N=64, gridsize=1)."""
    ensure_defaults()
    live = _live()
    return _bigN(live) + _int_key(live, "max_position_jitter")


def _check(mapping: Mapping[str, Any]) -> None:
    source = mapping.get("data_source")
    if source not in DATA_SOURCES:
        raise ValueError(
            f"params.cfg['data_source']={source!r} is invalid: expected one of "
            f"{', '.join(sorted(DATA_SOURCES))}"
        )
    rs_mae = mapping.get("realspace_mae_weight", 0.0) or 0.0
    rs = mapping.get("realspace_weight", 0.0) or 0.0
    if rs_mae > 0 and not rs > 0:
        raise ValueError(
            f"params.cfg['realspace_weight']={rs!r} is invalid while "
            f"realspace_mae_weight={rs_mae!r} > 0: expected realspace_weight > 0"
        )


def validate() -> bool:
    """Check the cross-key rules on ``cfg``; return True or raise ``ValueError``."""
    ensure_defaults()
    _check(_live())
    return True


def get(key: str, default: Any = _MISSING) -> Any:
    """Return ``cfg[key]``.

    ``'bigN'`` is computed from N/gridsize/offset and cached into ``cfg``. A missing key
    raises ``KeyError`` unless ``default`` is given.
    """
    ensure_defaults()
    live = _live()
    if key == "bigN":
        live["bigN"] = _bigN(live)
        return live["bigN"]
    if key in live:
        return live[key]
    if default is _MISSING:
        raise KeyError(
            f"params.cfg has no key {key!r} (it may be a runtime key such as "
            f"'intensity_scale' that is only written after training or loading)"
        )
    return default


def _caller() -> str:
    frame = sys._getframe(2)  # _caller -> set -> the caller of set
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def set(key: str, value: Any) -> None:  # noqa: A001 - the reference's public name
    """Validate, then write ``cfg[key] = value``; warn (not raise) when sealed."""
    ensure_defaults()
    live = _live()
    candidate = dict(live)
    candidate[key] = value
    _check(candidate)
    if _sealed and key not in SEAL_WHITELIST:
        logger.warning(
            "post-seal params.cfg write: %r = %r from %s (configuration should be passed "
            "explicitly; writes after seal() are not seen by code that already ran)",
            key,
            value,
            _caller(),
        )
    live[key] = value


def params() -> dict[str, Any]:
    """A shallow copy of ``cfg`` plus the derived sizes.

    Added keys: ``'bigN'`` (as in the reference), ``'padded_size'`` and ``'padding_size'``.
    """
    ensure_defaults()
    out = dict(_live())
    out["bigN"] = get_bigN()
    out["padded_size"] = get_padded_size()
    out["padding_size"] = get_padding_size()
    return out


def seal() -> None:
    """From now on :func:`set` on a non-whitelisted key logs a warning."""
    global _sealed
    _sealed = True


def unseal() -> None:
    """Undo :func:`seal`."""
    global _sealed
    _sealed = False


def is_sealed() -> bool:
    return _sealed
