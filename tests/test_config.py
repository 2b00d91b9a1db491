"""Tests for backend_api.config: dataclass fields/defaults, validation, n_images alias and the
legacy-dict bridge (KEY_MAPPINGS, dataclass_to_legacy_dict, update_legacy_dict)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend_api import params
from backend_api.config import (
    BACKENDS,
    DEFAULT_N_GROUPS,
    DIFFRACTION_KINDS,
    KEY_MAPPINGS,
    SUPPORTED_N,
    InferenceConfig,
    ModelConfig,
    TrainingConfig,
    dataclass_to_legacy_dict,
    update_legacy_dict,
    validate_inference_config,
    validate_model_config,
    validate_training_config,
)


def _training(**kw):
    return TrainingConfig(model=kw.pop("model", ModelConfig()), **kw)


def _inference(**kw):
    kw.setdefault("model_path", Path("model_dir"))
    kw.setdefault("test_data_file", Path("test.npz"))
    return InferenceConfig(model=kw.pop("model", ModelConfig()), **kw)


BUILDERS = {"model": ModelConfig, "training": _training, "inference": _inference}

# ---------------------------------------------------------------------------------------------
# Reference defaults (brief §1.1-1.3), field by field.

MODEL_DEFAULTS = {
    "N": 64,
    "gridsize": 1,
    "n_filters_scale": 2,
    "model_type": "pinn",
    "architecture": "cnn",
    "fno_modes": 12,
    "fno_width": 32,
    "fno_blocks": 4,
    "fno_cnn_blocks": 2,
    "learned_input_channels": 1,
    "max_hidden_channels": None,
    "resnet_width": None,
    "fno_input_transform": "none",
    "generator_output_mode": "real_imag",
    "amp_activation": "sigmoid",
    "object_big": True,
    "probe_big": True,
    "probe_mask": False,
    "probe_mask_sigma": 1.0,
    "probe_mask_diameter": None,
    "pad_object": True,
    "probe_scale": 4.0,
    "gaussian_smoothing_sigma": 0.0,
}

TRAINING_DEFAULTS = {
    "train_data_file": None,
    "test_data_file": None,
    "batch_size": 16,
    "nepochs": 50,
    "mae_weight": 0.0,
    "nll_weight": 1.0,
    "realspace_mae_weight": 0.0,
    "realspace_weight": 0.0,
    "nphotons": 1e9,
    "n_groups": 512,
    "n_images": None,
    "n_subsample": None,
    "subsample_seed": None,
    "neighbor_count": 4,
    "enable_oversampling": False,
    "neighbor_pool_size": None,
    "positions_provided": True,
    "probe_trainable": False,
    "intensity_scale_trainable": True,
    "output_dir": Path("training_outputs"),
    "sequential_sampling": False,
    "backend": "jax",
    "torch_loss_mode": "poisson",
    "torch_mae_pred_l2_match_target": False,
    "gradient_clip_val": None,
    "gradient_clip_algorithm": "norm",
    "optimizer": "adam",
    "momentum": 0.9,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "scheduler": "Default",
    "lr_warmup_epochs": 0,
    "lr_min_ratio": 0.1,
    "plateau_factor": 0.5,
    "plateau_patience": 2,
    "plateau_min_lr": 5e-5,
    "plateau_threshold": 0.0,
    "diffraction_kind": "auto",
}

INFERENCE_DEFAULTS = {
    "n_groups": None,
    "n_images": None,
    "n_subsample": None,
    "subsample_seed": None,
    "neighbor_count": 4,
    "enable_oversampling": False,
    "neighbor_pool_size": None,
    "debug": False,
    "output_dir": Path("inference_outputs"),
    "backend": "jax",
    "diffraction_kind": "auto",
}


def test_field_sets_are_exactly_the_reference_ones():
    assert [f.name for f in dataclasses.fields(ModelConfig)] == list(MODEL_DEFAULTS)
    assert [f.name for f in dataclasses.fields(TrainingConfig)] == ["model", *TRAINING_DEFAULTS]
    assert [f.name for f in dataclasses.fields(InferenceConfig)] == [
        "model",
        "model_path",
        "test_data_file",
        *INFERENCE_DEFAULTS,
    ]


@pytest.mark.parametrize(
    "kind,name,expected",
    [("model", k, v) for k, v in MODEL_DEFAULTS.items()]
    + [("training", k, v) for k, v in TRAINING_DEFAULTS.items()]
    + [("inference", k, v) for k, v in INFERENCE_DEFAULTS.items()],
)
def test_defaults(kind, name, expected):
    value = getattr(BUILDERS[kind](), name)
    assert value == expected
    assert type(value) is type(expected)


def test_model_and_inference_paths_are_required():
    with pytest.raises(TypeError):
        TrainingConfig()  # model is required, as in the reference
    with pytest.raises(TypeError):
        InferenceConfig(model=ModelConfig())


def test_exported_constants():
    assert BACKENDS == ("jax", "tensorflow", "pytorch")
    assert DIFFRACTION_KINDS == ("auto", "amplitude", "intensity")
    assert tuple(SUPPORTED_N["cnn"]) == (64, 128, 256)
    assert DEFAULT_N_GROUPS == 512


# ---------------------------------------------------------------------------------------------
# Bridge round trip for every field: set one non-default value, bridge, check key and value.

MODEL_NON_DEFAULT = {
    "N": (128, "N", 128),
    "gridsize": (2, "gridsize", 2),
    "n_filters_scale": (3, "n_filters_scale", 3),
    "model_type": ("supervised", "model_type", "supervised"),
    "architecture": ("fno", "architecture", "fno"),
    "fno_modes": (8, "fno_modes", 8),
    "fno_width": (16, "fno_width", 16),
    "fno_blocks": (2, "fno_blocks", 2),
    "fno_cnn_blocks": (0, "fno_cnn_blocks", 0),
    "learned_input_channels": (2, "learned_input_channels", 2),
    "max_hidden_channels": (256, "max_hidden_channels", 256),
    "resnet_width": (64, "resnet_width", 64),
    "fno_input_transform": ("sqrt", "fno_input_transform", "sqrt"),
    "generator_output_mode": ("amp_phase", "generator_output_mode", "amp_phase"),
    "amp_activation": ("swish", "amp_activation", "swish"),
    "object_big": (False, "object.big", False),
    "probe_big": (False, "probe.big", False),
    "probe_mask": (True, "probe.mask", True),
    "probe_mask_sigma": (2.5, "probe_mask_sigma", 2.5),
    "probe_mask_diameter": (30.0, "probe_mask_diameter", 30.0),
    "pad_object": (False, "pad_object", False),
    "probe_scale": (7.5, "probe_scale", 7.5),
    "gaussian_smoothing_sigma": (0.5, "gaussian_smoothing_sigma", 0.5),
}

TRAINING_NON_DEFAULT = {
    "train_data_file": ("data/train.npz", "train_data_file_path", "data/train.npz"),
    "test_data_file": (Path("data/test.npz"), "test_data_file_path", "data/test.npz"),
    "batch_size": (32, "batch_size", 32),
    "nepochs": (3, "nepochs", 3),
    "mae_weight": (0.5, "mae_weight", 0.5),
    "nll_weight": (0.25, "nll_weight", 0.25),
    "realspace_mae_weight": (0.1, "realspace_mae_weight", 0.1),
    "realspace_weight": (0.2, "realspace_weight", 0.2),
    "nphotons": (1e6, "nphotons", 1e6),
    "n_groups": (64, "n_groups", 64),
    "n_images": (100, "n_images", 100),
    "n_subsample": (10, "n_subsample", 10),
    "subsample_seed": (7, "subsample_seed", 7),
    "neighbor_count": (7, "neighbor_count", 7),
    "enable_oversampling": (True, "enable_oversampling", True),
    "neighbor_pool_size": (9, "neighbor_pool_size", 9),
    "positions_provided": (False, "positions.provided", False),
    "probe_trainable": (True, "probe.trainable", True),
    "intensity_scale_trainable": (False, "intensity_scale.trainable", False),
    "output_dir": (Path("out/run1"), "output_prefix", "out/run1"),
    "sequential_sampling": (True, "sequential_sampling", True),
    "backend": ("pytorch", "backend", "pytorch"),
    "torch_loss_mode": ("mae", "torch_loss_mode", "mae"),
    "torch_mae_pred_l2_match_target": (True, "torch_mae_pred_l2_match_target", True),
    "gradient_clip_val": (1.0, "gradient_clip_val", 1.0),
    "gradient_clip_algorithm": ("value", "gradient_clip_algorithm", "value"),
    "optimizer": ("adamw", "optimizer", "adamw"),
    "momentum": (0.8, "momentum", 0.8),
    "weight_decay": (0.01, "weight_decay", 0.01),
    "adam_beta1": (0.8, "adam_beta1", 0.8),
    "adam_beta2": (0.99, "adam_beta2", 0.99),
    "scheduler": ("WarmupCosine", "scheduler", "WarmupCosine"),
    "lr_warmup_epochs": (2, "lr_warmup_epochs", 2),
    "lr_min_ratio": (0.2, "lr_min_ratio", 0.2),
    "plateau_factor": (0.25, "plateau_factor", 0.25),
    "plateau_patience": (5, "plateau_patience", 5),
    "plateau_min_lr": (1e-6, "plateau_min_lr", 1e-6),
    "plateau_threshold": (1e-3, "plateau_threshold", 1e-3),
    "diffraction_kind": ("intensity", "diffraction_kind", "intensity"),
}

INFERENCE_NON_DEFAULT = {
    "model_path": ("models/run1", "model_path", "models/run1"),
    "test_data_file": ("data/other.npz", "test_data_file_path", "data/other.npz"),
    "n_groups": (32, "n_groups", 32),
    "n_images": (16, "n_images", 16),
    "n_subsample": (10, "n_subsample", 10),
    "subsample_seed": (3, "subsample_seed", 3),
    "neighbor_count": (7, "neighbor_count", 7),
    "enable_oversampling": (True, "enable_oversampling", True),
    "neighbor_pool_size": (9, "neighbor_pool_size", 9),
    "debug": (True, "debug", True),
    "output_dir": ("out/inf", "output_prefix", "out/inf"),
    "backend": ("tensorflow", "backend", "tensorflow"),
    "diffraction_kind": ("amplitude", "diffraction_kind", "amplitude"),
}


def test_non_default_tables_cover_every_field():
    assert set(MODEL_NON_DEFAULT) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(TRAINING_NON_DEFAULT) | {"model"} == {
        f.name for f in dataclasses.fields(TrainingConfig)
    }
    assert set(INFERENCE_NON_DEFAULT) | {"model"} == {
        f.name for f in dataclasses.fields(InferenceConfig)
    }
    for table, defaults in [
        (MODEL_NON_DEFAULT, MODEL_DEFAULTS),
        (TRAINING_NON_DEFAULT, TRAINING_DEFAULTS),
        (INFERENCE_NON_DEFAULT, INFERENCE_DEFAULTS),
    ]:
        for name, (value, _, _) in table.items():
            if name in defaults:
                assert value != defaults[name], name


def _build_with(kind, name, value):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the n_images row
        if kind == "training":
            return _training(**{name: value})
        return _inference(**{name: value})


BRIDGE_CASES = (
    [("training", "model." + k, *v) for k, v in MODEL_NON_DEFAULT.items()]
    + [("inference", "model." + k, *v) for k, v in MODEL_NON_DEFAULT.items()]
    + [("training", k, *v) for k, v in TRAINING_NON_DEFAULT.items()]
    + [("inference", k, *v) for k, v in INFERENCE_NON_DEFAULT.items()]
)


@pytest.mark.parametrize("kind,name,value,legacy_key,legacy_value", BRIDGE_CASES)
def test_bridge_every_field(kind, name, value, legacy_key, legacy_value):
    if name.startswith("model."):
        config = BUILDERS[kind](model=ModelConfig(**{name[6:]: value}))
    else:
        config = _build_with(kind, name, value)

    flat = dataclass_to_legacy_dict(config)
    assert flat[legacy_key] == legacy_value
    assert type(flat[legacy_key]) is type(legacy_value)

    cfg = dict(params.DEFAULT_CFG)
    update_legacy_dict(cfg, config)
    assert cfg[legacy_key] == legacy_value
    assert type(cfg[legacy_key]) is type(legacy_value)
    # Mapped fields appear only under their legacy name.
    field_name = name.split(".")[-1]
    if field_name in KEY_MAPPINGS:
        assert field_name not in flat and field_name not in cfg


def test_legacy_dict_is_flat_and_json_serialisable():
    for config in (_training(), _inference()):
        flat = dataclass_to_legacy_dict(config)
        assert "model" not in flat
        assert set(MODEL_DEFAULTS) - set(KEY_MAPPINGS) <= set(flat)
        json.dumps(flat)  # no Path, no numpy scalars
    assert len(dataclass_to_legacy_dict(_training())) == len(MODEL_DEFAULTS) + len(
        TRAINING_DEFAULTS
    )


def test_dataclass_to_legacy_dict_keeps_none_and_does_not_mutate():
    config = _training()
    before = dataclasses.asdict(config)
    flat = dataclass_to_legacy_dict(config)
    assert flat["train_data_file_path"] is None
    assert flat["max_hidden_channels"] is None
    assert dataclasses.asdict(config) == before
    flat["N"] = 999
    assert config.model.N == 64


def test_dataclass_to_legacy_dict_rejects_non_dataclass():
    with pytest.raises(ValueError, match="dataclass"):
        dataclass_to_legacy_dict({"N": 64})
    with pytest.raises(ValueError, match="dataclass"):
        dataclass_to_legacy_dict(ModelConfig)


def test_key_mappings_exactly_the_reference_nine():
    assert dict(KEY_MAPPINGS) == {
        "object_big": "object.big",
        "probe_big": "probe.big",
        "probe_mask": "probe.mask",
        "probe_trainable": "probe.trainable",
        "intensity_scale_trainable": "intensity_scale.trainable",
        "positions_provided": "positions.provided",
        "output_dir": "output_prefix",
        "train_data_file": "train_data_file_path",
        "test_data_file": "test_data_file_path",
    }
    assert len(KEY_MAPPINGS) == 9
    with pytest.raises(TypeError):
        KEY_MAPPINGS["N"] = "n"  # read-only


# ---------------------------------------------------------------------------------------------
# update_legacy_dict semantics


def test_update_skips_none_and_never_deletes():
    cfg = {"test_data_file_path": "old.npz", "custom_key": 1, "n_groups": 99}
    update_legacy_dict(cfg, _training(test_data_file=None))
    assert cfg["test_data_file_path"] == "old.npz"  # None never overwrites
    assert cfg["custom_key"] == 1  # unrelated keys survive
    assert cfg["n_groups"] == 512  # non-None values overwrite
    assert "train_data_file_path" not in cfg  # None is not inserted either
    assert "max_hidden_channels" not in cfg


def test_update_converts_paths_to_str():
    cfg: dict = {}
    update_legacy_dict(
        cfg, _inference(model_path=Path("a/b"), test_data_file=Path("t.npz"), output_dir="o")
    )
    for key, expected in [
        ("model_path", "a/b"),
        ("test_data_file_path", "t.npz"),
        ("output_prefix", "o"),
    ]:
        assert cfg[key] == expected and type(cfg[key]) is str
    assert not any(isinstance(v, Path) for v in cfg.values())


def test_update_returns_none_and_writes_directly_without_seal_warning(caplog):
    params.reset()
    try:
        params.seal()
        with caplog.at_level("WARNING"):
            assert update_legacy_dict(params.cfg, _training(nepochs=7)) is None
        assert params.cfg["nepochs"] == 7
        assert "post-seal" not in caplog.text
    finally:
        params.reset()


def test_update_order_inference_wins_for_shared_keys():
    train = _training(
        train_data_file="train.npz",
        test_data_file="train_test.npz",
        output_dir="train_out",
        n_groups=256,
        n_subsample=100,
        subsample_seed=1,
    )
    infer = _inference(
        test_data_file="infer_test.npz",
        output_dir="infer_out",
        n_groups=64,
        n_subsample=50,
        subsample_seed=2,
    )
    cfg = dict(params.DEFAULT_CFG)
    update_legacy_dict(cfg, train)
    update_legacy_dict(cfg, infer)
    assert cfg["output_prefix"] == "infer_out"
    assert cfg["test_data_file_path"] == "infer_test.npz"
    assert cfg["n_groups"] == 64
    assert cfg["n_subsample"] == 50
    assert cfg["subsample_seed"] == 2
    assert cfg["train_data_file_path"] == "train.npz"  # inference has no such field
    assert cfg["nepochs"] == 50  # training-only keys keep the training value


def test_mvp_config_bridge_populates_params_cfg():
    """Reference test_mvp_config_bridge_populates_params_cfg, on our own classes."""
    params.reset()
    try:
        model = ModelConfig(N=128, gridsize=2, model_type="pinn")
        train = TrainingConfig(
            model=model,
            train_data_file=Path("train.npz"),
            test_data_file=Path("test.npz"),
            n_groups=512,
            neighbor_count=7,
            nphotons=1e9,
        )
        infer = InferenceConfig(
            model=model,
            model_path=Path("model_dir"),
            test_data_file=Path("test.npz"),
            neighbor_count=7,
        )
        update_legacy_dict(params.cfg, train)
        update_legacy_dict(params.cfg, infer)
        cfg = params.cfg
        assert cfg["N"] == 128
        assert cfg["gridsize"] == 2
        assert cfg["model_type"] == "pinn"
        assert cfg["train_data_file_path"] == "train.npz"
        assert cfg["test_data_file_path"] == "test.npz"
        assert cfg["model_path"] == "model_dir" and isinstance(cfg["model_path"], str)
        assert cfg["n_groups"] == 512  # inference n_groups is None: training value survives
        assert cfg["neighbor_count"] == 7
        assert cfg["nphotons"] == 1e9
        assert params.get("bigN") == 128 + 4
    finally:
        params.reset()


def test_default_training_bridge_overrides_legacy_defaults():
    """The dataclass defaults are the effective ones once bridged (brief §1.7 table)."""
    cfg = dict(params.DEFAULT_CFG)
    update_legacy_dict(cfg, _training())
    expected = {
        "N": 64,
        "gridsize": 1,
        "nepochs": 50,
        "probe.big": True,
        "probe.mask": False,
        "probe_scale": 4.0,
        "intensity_scale.trainable": True,
        "positions.provided": True,
        "output_prefix": "training_outputs",
        "backend": "jax",
    }
    for key, value in expected.items():
        assert cfg[key] == value, key
    # keys the dataclasses do not carry keep the legacy defaults
    for key in ("offset", "max_position_jitter", "tv_weight", "default_probe_scale"):
        assert cfg[key] == params.DEFAULT_CFG[key]


# ---------------------------------------------------------------------------------------------
# Validation

VALIDATION_CASES = [
    # ModelConfig
    ("model", "N", 100),
    ("model", "N", 32),
    ("model", "N", 0),
    ("model", "N", -64),
    ("model", "N", True),
    ("model", "N", 64.5),
    ("model", "N", "64"),
    ("model", "gridsize", 0),
    ("model", "gridsize", -1),
    ("model", "n_filters_scale", 0),
    ("model", "fno_modes", 0),
    ("model", "fno_width", -32),
    ("model", "fno_blocks", 0),
    ("model", "fno_cnn_blocks", -1),
    ("model", "learned_input_channels", 0),
    ("model", "max_hidden_channels", 0),
    ("model", "resnet_width", -1),
    ("model", "model_type", "gan"),
    ("model", "architecture", "unet"),
    ("model", "fno_input_transform", "exp"),
    ("model", "generator_output_mode", "complex"),
    ("model", "amp_activation", "tanh"),
    ("model", "amp_activation", None),
    ("model", "object_big", 1),
    ("model", "probe_big", "yes"),
    ("model", "probe_mask", None),
    ("model", "pad_object", 0.0),
    ("model", "probe_mask_sigma", 0.0),
    ("model", "probe_mask_diameter", -1.0),
    ("model", "probe_scale", 0.0),
    ("model", "probe_scale", -4.0),
    ("model", "probe_scale", float("nan")),
    ("model", "gaussian_smoothing_sigma", -0.1),
    # TrainingConfig
    ("training", "batch_size", 0),
    ("training", "batch_size", -16),
    ("training", "batch_size", 16.5),
    ("training", "nepochs", 0),
    ("training", "mae_weight", -0.1),
    ("training", "nll_weight", -1.0),
    ("training", "realspace_mae_weight", -1.0),
    ("training", "realspace_weight", -0.5),
    ("training", "nphotons", 0),
    ("training", "nphotons", -1e6),
    ("training", "nphotons", float("inf")),
    ("training", "n_groups", 0),
    ("training", "n_images", 0),
    ("training", "n_subsample", -1),
    ("training", "subsample_seed", -1),
    ("training", "neighbor_count", 0),
    ("training", "neighbor_pool_size", 0),
    ("training", "enable_oversampling", "true"),
    ("training", "probe_trainable", 1),
    ("training", "backend", "jaxx"),
    ("training", "backend", "torch"),
    ("training", "backend", None),
    ("training", "torch_loss_mode", "l1"),
    ("training", "gradient_clip_val", -1.0),
    ("training", "gradient_clip_algorithm", "l2"),
    ("training", "optimizer", "lamb"),
    ("training", "momentum", -0.1),
    ("training", "weight_decay", -0.1),
    ("training", "adam_beta1", 1.0),
    ("training", "adam_beta2", -0.1),
    ("training", "scheduler", "cosine"),
    ("training", "lr_warmup_epochs", -1),
    ("training", "lr_min_ratio", -0.1),
    ("training", "plateau_factor", 1.5),
    ("training", "plateau_patience", -1),
    ("training", "plateau_min_lr", -1e-5),
    ("training", "plateau_threshold", -1.0),
    ("training", "diffraction_kind", "counts"),
    ("training", "diffraction_kind", None),
    ("training", "train_data_file", 123),
    ("training", "output_dir", None),
    ("training", "model", "not-a-model"),
    # InferenceConfig
    ("inference", "model_path", None),
    ("inference", "model_path", 5),
    ("inference", "test_data_file", None),
    ("inference", "n_groups", 0),
    ("inference", "n_images", -3),
    ("inference", "n_subsample", -1),
    ("inference", "neighbor_count", -1),
    ("inference", "neighbor_pool_size", 0),
    ("inference", "debug", "no"),
    ("inference", "backend", "keras"),
    ("inference", "output_dir", 1.5),
    ("inference", "diffraction_kind", "Amplitude"),
    ("inference", "model", {"N": 64}),
]

_OWNER = {"model": "ModelConfig", "training": "TrainingConfig", "inference": "InferenceConfig"}


def _case_id(case):
    return f"{case[0]}.{case[1]}={case[2]!r}"


@pytest.mark.parametrize("kind,name,bad", VALIDATION_CASES, ids=map(_case_id, VALIDATION_CASES))
def test_construction_rejects(kind, name, bad):
    with pytest.raises(ValueError) as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            BUILDERS[kind](**{name: bad})
    message = str(info.value)
    assert f"{_OWNER[kind]}.{name}=" in message
    assert repr(bad) in message
    assert "expected" in message


@pytest.mark.parametrize("kind,name,bad", VALIDATION_CASES, ids=map(_case_id, VALIDATION_CASES))
def test_validate_after_mutation_rejects(kind, name, bad):
    config = BUILDERS[kind]()
    setattr(config, name, bad)  # configs are mutable; nothing checks at assignment time
    with pytest.raises(ValueError) as info:
        config.validate()
    message = str(info.value)
    assert f"{_OWNER[kind]}.{name}=" in message and repr(bad) in message


def test_n_message_lists_what_the_architecture_allows():
    with pytest.raises(ValueError, match=r"N=100.*'cnn'.*64, 128, 256"):
        ModelConfig(N=100)


def test_non_cnn_architectures_accept_other_even_sizes():
    assert ModelConfig(architecture="fno", N=96).N == 96
    with pytest.raises(ValueError, match=r"ModelConfig\.N=65"):
        ModelConfig(architecture="fno", N=65)


def test_unknown_literal_message_lists_allowed_values():
    with pytest.raises(ValueError) as info:
        _training(backend="torch")
    for allowed in BACKENDS:
        assert repr(allowed) in str(info.value)


def test_nested_model_mutation_is_caught_by_parent_validate():
    config = _training()
    config.model.N = 100
    with pytest.raises(ValueError, match=r"ModelConfig\.N=100"):
        config.validate()
    config.model.N = 128
    assert config.validate() is config
    with pytest.raises(ValueError, match=r"ModelConfig\.N=100"):
        m = ModelConfig()
        m.N = 100
        _inference(model=m)


def test_ptychodus_pattern_mutating_model_N():
    model = ModelConfig(gridsize=2, amp_activation="swish")
    model.N = 128  # ptychodus sets the size from the data after construction
    assert model.validate() is model
    config = _training(model=model)
    assert dataclass_to_legacy_dict(config)["N"] == 128
    assert dataclasses.replace(model, N=256).N == 256


def test_model_config_is_mutable_and_hashable_by_value():
    a, b = ModelConfig(N=128), ModelConfig(N=128)
    assert a == b and hash(a) == hash(b)
    a.gridsize = 2
    assert a != b
    with pytest.raises(TypeError):
        hash(_training())  # the reference's TrainingConfig is not hashable either


def test_validate_normalises_paths_and_numpy_scalars():
    config = _training(
        model=ModelConfig(N=np.int64(128), probe_scale=np.float32(2.0), object_big=np.bool_(False)),
        batch_size=np.int32(8),
        nphotons=np.float64(1e6),
        train_data_file="x/train.npz",
    )
    assert type(config.model.N) is int and config.model.N == 128
    assert type(config.model.probe_scale) is float
    assert config.model.object_big is False
    assert type(config.batch_size) is int
    assert type(config.nphotons) is float
    assert config.train_data_file == Path("x/train.npz")
    config.output_dir = "elsewhere"
    config.validate()
    assert config.output_dir == Path("elsewhere")
    json.dumps(dataclass_to_legacy_dict(config))


def test_integral_float_accepted_for_int_fields():
    assert _training(n_groups=64.0).n_groups == 64
    assert type(_training(n_groups=64.0).n_groups) is int


def test_int_accepted_for_float_fields():
    config = _training(nphotons=1000000, mae_weight=1)
    assert config.nphotons == 1e6 and type(config.nphotons) is float


def test_reference_named_validators():
    validate_model_config(ModelConfig())
    validate_training_config(_training())
    with pytest.raises(ValueError):
        validate_model_config("cnn")
    with pytest.raises(ValueError):
        validate_training_config(ModelConfig())
    config = _training()
    config.nphotons = -1
    with pytest.raises(ValueError, match="nphotons=-1"):
        validate_training_config(config)


def test_validate_inference_config_checks_archive(tmp_path):
    missing_dir = tmp_path / "run"
    missing_dir.mkdir()
    with pytest.raises(ValueError, match="wts.h5.zip"):
        validate_inference_config(_inference(model_path=missing_dir))
    (missing_dir / "wts.h5.zip").write_bytes(b"")
    validate_inference_config(_inference(model_path=missing_dir))
    # a file path, or the same path without the .zip suffix
    validate_inference_config(_inference(model_path=missing_dir / "wts.h5.zip"))
    validate_inference_config(_inference(model_path=missing_dir / "wts.h5"))
    with pytest.raises(ValueError, match="does not exist"):
        validate_inference_config(_inference(model_path=tmp_path / "nope"))
    with pytest.raises(ValueError):
        validate_inference_config(_training())


# ---------------------------------------------------------------------------------------------
# n_images: the deprecated alias of n_groups


def test_training_n_images_alias_warns_and_copies():
    with pytest.warns(DeprecationWarning, match="n_images") as record:
        config = _training(n_images=100)
    assert config.n_groups == 100 and config.n_images == 100
    # stacklevel points at the caller's line, not into config.py
    assert record[0].filename == __file__ or record[0].filename.endswith("test_config.py")
    flat = dataclass_to_legacy_dict(config)
    assert flat["n_images"] == 100 and flat["n_groups"] == 100


def test_inference_n_images_alias_warns_and_copies():
    with pytest.warns(DeprecationWarning, match="n_groups"):
        config = _inference(n_images=16)
    assert config.n_groups == 16


def test_n_groups_wins_silently_when_both_given():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = _training(n_groups=64, n_images=100)
        infer = _inference(n_groups=8, n_images=100)
    assert (config.n_groups, config.n_images) == (64, 100)
    assert (infer.n_groups, infer.n_images) == (8, 100)
    cfg: dict = {}
    update_legacy_dict(cfg, config)
    assert cfg["n_groups"] == 64 and cfg["n_images"] == 100


def test_n_groups_defaults_differ_between_training_and_inference():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _training().n_groups == 512
        assert _inference().n_groups is None
    cfg = {"n_groups": 77}
    update_legacy_dict(cfg, _inference())
    assert cfg["n_groups"] == 77  # None is skipped
    assert "n_images" not in cfg


# ---------------------------------------------------------------------------------------------
# Property tests

positive = st.integers(min_value=1, max_value=2**31)
weights = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    batch_size=positive,
    nepochs=positive,
    n_groups=positive,
    neighbor_count=positive,
    gridsize=st.integers(1, 10),
    n_filters_scale=st.integers(1, 8),
    N=st.sampled_from(SUPPORTED_N["cnn"]),
    mae=weights,
    nll=weights,
    nphotons=st.floats(min_value=1e-3, max_value=1e15),
)
def test_valid_values_round_trip(
    batch_size, nepochs, n_groups, neighbor_count, gridsize, n_filters_scale, N, mae, nll, nphotons
):
    config = _training(
        model=ModelConfig(N=N, gridsize=gridsize, n_filters_scale=n_filters_scale),
        batch_size=batch_size,
        nepochs=nepochs,
        n_groups=n_groups,
        neighbor_count=neighbor_count,
        mae_weight=mae,
        nll_weight=nll,
        nphotons=nphotons,
    )
    cfg: dict = {}
    update_legacy_dict(cfg, config)
    assert (cfg["batch_size"], cfg["nepochs"], cfg["n_groups"], cfg["neighbor_count"]) == (
        batch_size,
        nepochs,
        n_groups,
        neighbor_count,
    )
    assert (cfg["N"], cfg["gridsize"], cfg["n_filters_scale"]) == (N, gridsize, n_filters_scale)
    assert (cfg["mae_weight"], cfg["nll_weight"], cfg["nphotons"]) == (mae, nll, nphotons)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["batch_size", "nepochs", "n_groups", "neighbor_count"]),
    value=st.integers(max_value=0),
)
def test_non_positive_counts_always_rejected(name, value):
    with pytest.raises(ValueError, match=rf"TrainingConfig\.{name}={value}"):
        _training(**{name: value})


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["mae_weight", "nll_weight", "realspace_mae_weight", "realspace_weight"]),
    value=st.floats(max_value=-1e-12, allow_nan=False),
)
def test_negative_weights_always_rejected(name, value):
    with pytest.raises(ValueError, match=rf"TrainingConfig\.{name}="):
        _training(**{name: value})


@settings(max_examples=40, deadline=None)
@given(N=st.integers(min_value=1, max_value=4096).filter(lambda n: n not in (64, 128, 256)))
def test_cnn_rejects_every_other_N(N):
    with pytest.raises(ValueError, match=rf"ModelConfig\.N={N}\b"):
        ModelConfig(N=N)


@settings(max_examples=40, deadline=None)
@given(
    path=st.text(
        alphabet=st.characters(
            whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters="_-/."
        ),
        min_size=1,
        max_size=30,
    )
)
def test_paths_given_as_str_bridge_as_str(path):
    config = _training(output_dir=path, train_data_file=path)
    assert isinstance(config.output_dir, Path)
    cfg: dict = {}
    update_legacy_dict(cfg, config)
    assert cfg["output_prefix"] == str(Path(path))
    assert cfg["train_data_file_path"] == str(Path(path))


def test_config_module_imports_no_backend():
    code = (
        "import sys, backend_api.config, backend_api.params; "
        "bad = [m for m in ('jax', 'flax', 'torch', 'tensorflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_math_sanity_of_float_defaults():
    # guard against someone "fixing" a default to an int: the bridge keeps types
    assert math.isclose(TrainingConfig(model=ModelConfig()).plateau_min_lr, 5e-5)


# ---------------------------------------------------------------------------------------------
# Full round trip: config -> legacy dict (-> archive params JSON) -> config, every field at once.
# The bridge is one-way in the reference; this checks it loses nothing, so a backend can rebuild
# the exact dataclasses from a params snapshot.


def _from_legacy(flat: dict, cls):
    inverse = {legacy: name for name, legacy in KEY_MAPPINGS.items()}
    plain = {inverse.get(k, k): v for k, v in flat.items()}
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in plain.items() if k in model_names})
    own = {f.name for f in dataclasses.fields(cls)} - {"model"}
    return cls(model=model, **{k: v for k, v in plain.items() if k in own})


def _all_non_default(kind):
    model = ModelConfig(**{k: v[0] for k, v in MODEL_NON_DEFAULT.items()})
    table = TRAINING_NON_DEFAULT if kind == "training" else INFERENCE_NON_DEFAULT
    return BUILDERS[kind](model=model, **{k: v[0] for k, v in table.items()})


@pytest.mark.parametrize("kind", ["training", "inference"])
@pytest.mark.parametrize("variant", ["defaults", "every_field_non_default"])
def test_bridge_round_trips_every_field(kind, variant):
    from backend_api.archive import params_from_json, params_to_json

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # n_groups and n_images both given: no warning
        config = BUILDERS[kind]() if variant == "defaults" else _all_non_default(kind)
    cls = type(config)
    flat = dataclass_to_legacy_dict(config)
    assert _from_legacy(flat, cls) == config
    # through update_legacy_dict into a fresh dict and through an archive params snapshot
    cfg: dict = {}
    update_legacy_dict(cfg, config)
    snapshot = params_from_json(params_to_json(cfg))
    back = _from_legacy(snapshot, cls)
    assert back == config
    for f in dataclasses.fields(cls):
        if f.name != "model":
            assert type(getattr(back, f.name)) is type(getattr(config, f.name)), f.name
    for f in dataclasses.fields(ModelConfig):
        assert type(getattr(back.model, f.name)) is type(getattr(config.model, f.name)), f.name
    if variant == "every_field_non_default":
        defaults = BUILDERS[kind]()
        own = [f.name for f in dataclasses.fields(cls) if f.name != "model"]
        assert [n for n in own if getattr(config, n) == getattr(defaults, n)] == []
        assert [f.name for f in dataclasses.fields(ModelConfig)
                if getattr(config.model, f.name) == getattr(defaults.model, f.name)] == []


# ---------------------------------------------------------------------------------------------
# Torch-only fields under backend='jax': a warning naming them, not silence


def test_torch_only_fields_are_training_fields_and_exclude_what_jax_reads():
    from backend_api.config import TORCH_ONLY_FIELDS

    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert set(TORCH_ONLY_FIELDS) <= names
    # what the jax backend does read (fit_options_from_config, the loss, the grouping)
    assert not {"adam_beta1", "adam_beta2", "nepochs", "batch_size", "nll_weight",
                "mae_weight"} & set(TORCH_ONLY_FIELDS)


@pytest.mark.parametrize("name", ["optimizer", "scheduler", "gradient_clip_val", "weight_decay",
                                  "plateau_patience", "torch_loss_mode", "momentum"])
def test_jax_backend_warns_naming_each_torch_only_field(name):
    value = TRAINING_NON_DEFAULT[name][0]
    with pytest.warns(UserWarning, match=rf"backend='jax' ignores .*\b{name}=") as rec:
        config = _training(**{name: value})
    assert getattr(config, name) == value  # kept, only ignored by the jax backend
    assert len([w for w in rec if issubclass(w.category, UserWarning)]) == 1


def test_torch_only_warning_names_all_fields_once_and_not_for_other_backends():
    with pytest.warns(UserWarning) as rec:
        _training(optimizer="sgd", plateau_min_lr=1e-6)
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1 and "optimizer='sgd'" in msgs[0] and "plateau_min_lr=1e-06" in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _training(backend="pytorch", optimizer="sgd", plateau_min_lr=1e-6)
        _training(adam_beta1=0.8, nepochs=3)  # jax fields: no warning
        _training()
