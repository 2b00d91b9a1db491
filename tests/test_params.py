"""Tests for backend_api.params: the legacy flat dict, its accessors, derived keys and seal."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend_api import params
from backend_api.config import ModelConfig, TrainingConfig, update_legacy_dict

# The reference DEFAULT_CFG (brief §1.7 / model_physics §7.1), all 40 keys.
REFERENCE_DEFAULTS = {
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


@pytest.fixture(autouse=True)
def clean_params():
    original = params.cfg
    params.reset()
    yield
    params.cfg = original  # undo any rebinding a test did
    params.reset()


def test_defaults_match_reference_exactly():
    assert len(REFERENCE_DEFAULTS) == 40
    assert dict(params.DEFAULT_CFG) == REFERENCE_DEFAULTS
    assert params.cfg == REFERENCE_DEFAULTS
    for key, value in REFERENCE_DEFAULTS.items():
        assert type(params.cfg[key]) is type(value), key


def test_cfg_is_a_plain_dict_and_defaults_are_read_only():
    assert type(params.cfg) is dict
    with pytest.raises(TypeError):
        params.DEFAULT_CFG["N"] = 64


def test_reset_restores_defaults_in_place():
    live = params.cfg
    live["N"] = 64
    live["intensity_scale"] = 123.0
    del live["offset"]
    params.seal()
    params.reset()
    assert params.cfg is live
    assert live == REFERENCE_DEFAULTS
    assert not params.is_sealed()


# --- get ------------------------------------------------------------------------------------


def test_get_existing_and_missing_keys():
    assert params.get("N") == 128
    with pytest.raises(KeyError, match="intensity_scale"):
        params.get("intensity_scale")
    assert params.get("intensity_scale", None) is None
    assert params.get("intensity_scale", 2.5) == 2.5


def test_get_bigN_is_computed_and_cached():
    assert "bigN" not in params.cfg
    assert params.get("bigN") == 128 + (2 - 1) * 4
    assert params.cfg["bigN"] == 132
    params.cfg["gridsize"] = 1
    assert params.get("bigN") == 128  # recomputed, not served stale
    assert params.cfg["bigN"] == 128


def test_cleared_cfg_refills_defaults_on_access():
    params.cfg.clear()
    assert params.get("N") == 128
    assert params.cfg == REFERENCE_DEFAULTS


def test_ensure_defaults_keeps_existing_values():
    params.cfg["N"] = 64
    del params.cfg["gridsize"]
    params.ensure_defaults()
    assert params.cfg["N"] == 64 and params.cfg["gridsize"] == 2


def test_rebound_cfg_is_looked_up_at_call_time():
    snapshot = {"N": 256, "gridsize": 1, "custom": "x"}
    params.cfg = snapshot
    assert params.get("N") == 256
    assert params.get("custom") == "x"
    assert params.get("bigN") == 256
    assert snapshot["offset"] == 4  # defaults filled into the new dict
    params.set("nepochs", 3)
    assert snapshot["nepochs"] == 3
    assert params.params()["N"] == 256


# --- derived sizes / params() ----------------------------------------------------------------


@pytest.mark.parametrize(
    "N,gridsize,bigN,padded,padding",
    [(64, 1, 64, 74, 10), (64, 2, 68, 78, 14), (128, 2, 132, 142, 14), (128, 3, 136, 146, 18)],
)
def test_derived_sizes(N, gridsize, bigN, padded, padding):
    params.cfg.update(N=N, gridsize=gridsize)
    assert params.get_bigN() == bigN
    assert params.get_padded_size() == padded
    assert params.get_padding_size() == padding
    out = params.params()
    assert (out["bigN"], out["padded_size"], out["padding_size"]) == (bigN, padded, padding)


def test_params_returns_a_copy_plus_derived_keys():
    out = params.params()
    assert set(out) == set(REFERENCE_DEFAULTS) | {"bigN", "padded_size", "padding_size"}
    out["N"] = 1
    out["new"] = 2
    assert params.cfg["N"] == 128 and "new" not in params.cfg
    assert "padded_size" not in params.cfg  # params() does not write derived keys back


def test_params_after_bridge_reflects_dataclass():
    update_legacy_dict(params.cfg, TrainingConfig(model=ModelConfig(N=64, gridsize=2)))
    out = params.params()
    assert (out["N"], out["gridsize"], out["bigN"], out["padded_size"]) == (64, 2, 68, 78)


def test_derived_sizes_reject_non_integer_inputs():
    params.cfg["gridsize"] = "two"
    with pytest.raises(ValueError, match=r"gridsize.*'two'"):
        params.get_bigN()


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    N=st.integers(1, 1024),
    gridsize=st.integers(1, 8),
    offset=st.integers(0, 32),
    jitter=st.integers(0, 64),
)
def test_derived_size_formulas(N, gridsize, offset, jitter):
    params.reset()
    params.cfg.update(N=N, gridsize=gridsize, offset=offset, max_position_jitter=jitter)
    bigN = N + (gridsize - 1) * offset
    assert params.get("bigN") == bigN
    assert params.get_padded_size() == bigN + jitter
    assert params.get_padding_size() == (gridsize - 1) * offset + jitter


# --- set / validate -------------------------------------------------------------------------


def test_set_writes_value():
    params.set("nepochs", 5)
    assert params.cfg["nepochs"] == 5
    params.set("intensity_scale", 3.5)
    assert params.get("intensity_scale") == 3.5


@pytest.mark.parametrize("source", sorted(params.DATA_SOURCES))
def test_set_accepts_known_data_sources(source):
    params.set("data_source", source)
    assert params.cfg["data_source"] == source


def test_set_rejects_unknown_data_source_without_writing():
    with pytest.raises(ValueError, match=r"data_source.*'bogus'.*expected one of"):
        params.set("data_source", "bogus")
    assert params.cfg["data_source"] == "generic"


def test_set_realspace_rule():
    with pytest.raises(ValueError, match=r"realspace_weight'\]=0\.0.*realspace_mae_weight=0\.5"):
        params.set("realspace_mae_weight", 0.5)
    assert params.cfg["realspace_mae_weight"] == 0.0
    params.set("realspace_weight", 1.0)
    params.set("realspace_mae_weight", 0.5)
    assert params.validate() is True


def test_validate_reports_bad_state_written_directly():
    params.cfg["data_source"] = "nope"  # direct writes are not checked...
    with pytest.raises(ValueError, match="'nope'"):
        params.validate()  # ...until someone validates


# --- seal -----------------------------------------------------------------------------------


def test_post_seal_nonwhitelisted_write_warns(caplog):
    params.seal()
    with caplog.at_level(logging.WARNING, logger="backend_api.params"):
        params.set("gridsize", 1)
    assert params.cfg["gridsize"] == 1  # the write still happens
    records = [r for r in caplog.records if r.name == "backend_api.params"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "post-seal params.cfg write" in message
    assert "'gridsize'" in message
    assert "test_params.py:" in message  # names the caller's file:line


@pytest.mark.parametrize("key", sorted(params.SEAL_WHITELIST))
def test_post_seal_whitelisted_write_silent(caplog, key):
    params.seal()
    with caplog.at_level(logging.DEBUG, logger="backend_api.params"):
        params.set(key, 1.0)
    assert params.cfg[key] == 1.0
    assert not caplog.records


def test_unsealed_writes_silent(caplog):
    params.seal()
    params.unseal()
    with caplog.at_level(logging.DEBUG, logger="backend_api.params"):
        params.set("gridsize", 1)
    assert not caplog.records


def test_direct_writes_bypass_seal(caplog):
    params.seal()
    with caplog.at_level(logging.DEBUG, logger="backend_api.params"):
        params.cfg["gridsize"] = 1
        update_legacy_dict(params.cfg, TrainingConfig(model=ModelConfig()))
    assert not caplog.records
    assert params.is_sealed()
