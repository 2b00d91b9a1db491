"""backend_api.workflows: CONFIG-001, dispatch on config.backend / the archive tag, outputs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

import backend_api.config as config_mod
from backend_api import archive, params, workflows
from backend_api import backends as B
from backend_api.config import ModelConfig, TrainingConfig

TF_SMALL = Path(__file__).parent / "fixtures" / "tf_archive_small" / "tf_meta_only.zip"
NAME = "wftest"


class _Model:
    def __init__(self, scale):
        self.scale = scale

    def predict(self, inputs):
        x, _ = inputs
        return np.ones(x.shape[:3] + (1,), np.complex64)


class _RecordingBackend:
    """A tiny backend that records what it saw; saves/loads real archives tagged NAME."""

    name = NAME

    def __init__(self):
        self.calls = []

    def train_cdi_model(self, train_data, test_data, config):
        self.calls.append(("train", dict(params.cfg)))
        return {"history": {"loss": [1.0]}, "model_instance": _Model(3.5)}

    def run_cdi_example(self, train_data, test_data, config, *, flip_x=False, flip_y=False,
                        transpose=False, M=20, do_stitching=False):
        self.calls.append(("run", dict(params.cfg), dict(flip_x=flip_x, M=M, do_stitching=do_stitching)))
        results = self.train_cdi_model(train_data, test_data, config)
        amp = np.ones((5, 5)) if do_stitching else None
        return amp, amp, results

    def save_model(self, model, output_dir, config):
        self.calls.append(("save", model))
        snapshot = dict(params.cfg, intensity_scale=model.scale, probe=np.eye(4, dtype=np.complex64))
        entry = archive.ModelEntry(snapshot, {"weights.bin": b"w"})
        return archive.write_archive(
            Path(output_dir) / archive.ARCHIVE_NAME,
            {"autoencoder": entry, "diffraction_to_obj": entry},
            backend=self.name,
            version="test-1",
        )

    def load_inference_bundle(self, model_dir):
        with tempfile.TemporaryDirectory() as tmp:
            contents = archive.read_archive(model_dir, tmp, expected_backend=self.name)
            m = contents.models["diffraction_to_obj"]
            assert (m.dir / "weights.bin").read_bytes() == b"w"
            self.calls.append(("load", Path(model_dir)))
            return _Model(m.params["intensity_scale"]), m.params

    def reconstruct(self, model, data, *, config=None, M=20, **kw):
        self.calls.append(("reconstruct", M, kw))
        return np.ones((3, 3)), np.zeros((3, 3)), {"obj_tensor_full": np.zeros((1, 4, 4, 1))}


@pytest.fixture
def backend():
    params.reset()
    b = _RecordingBackend()
    B.register_backend(NAME, b)
    yield b
    B.unregister_backend(NAME)
    params.reset()


def _config(**kw):
    cfg = TrainingConfig(model=ModelConfig(N=64, gridsize=2), nphotons=1e8, **kw)
    cfg.backend = NAME  # third-party name, set after construction (the Literal knows 3 names)
    return cfg


def test_run_cdi_example_bridges_config_first_and_tags_results(backend, monkeypatch):
    seen = []
    real = config_mod.update_legacy_dict

    def spy(cfg_dict, cfg_obj):
        seen.append((cfg_dict, cfg_obj, list(backend.calls)))
        return real(cfg_dict, cfg_obj)

    monkeypatch.setattr(config_mod, "update_legacy_dict", spy)
    config = _config()
    amp, phase, results = workflows.run_cdi_example("train", "test", config, flip_x=True, M=12)
    assert len(seen) == 1 and seen[0][0] is params.cfg and seen[0][1] is config
    assert seen[0][2] == []  # before the backend was touched
    assert results["backend"] == NAME and amp is None and phase is None
    kind, cfg_at_call, kwargs = backend.calls[0]
    assert kind == "run" and cfg_at_call["N"] == 64 and cfg_at_call["gridsize"] == 2
    assert cfg_at_call["nphotons"] == 1e8
    assert kwargs == {"flip_x": True, "M": 12, "do_stitching": False}
    amp, _, _ = workflows.run_cdi_example("t", None, config, do_stitching=True)
    assert amp.shape == (5, 5)


def test_train_cdi_model_dispatches_and_tags(backend):
    results = workflows.train_cdi_model("train", None, _config())
    assert results["backend"] == NAME and backend.calls[0][0] == "train"
    assert backend.calls[0][1]["gridsize"] == 2


def test_unknown_backend_in_config_is_value_error():
    params.reset()
    config = _config()
    config.backend = "no-such-backend"
    with pytest.raises(ValueError, match="no-such-backend"):
        workflows.run_cdi_example(None, None, config)
    assert params.cfg["N"] == 64  # CONFIG-001 happened before the backend was looked up
    params.reset()


def test_save_then_load_dispatches_on_archive_tag_and_restores_cfg(backend, tmp_path):
    config = _config()
    _, _, results = workflows.run_cdi_example("train", None, config)
    path = workflows.save_model(results, tmp_path / "bundle", config)
    assert path == tmp_path / "bundle" / "wts.h5.zip" and path.is_file()
    assert backend.calls[-1] == ("save", results["model_instance"])
    assert archive.read_manifest(path)["backend"] == NAME

    params.reset()
    assert params.cfg["N"] == 128
    model, cfg = workflows.load_inference_bundle(str(tmp_path / "bundle"))
    assert backend.calls[-1] == ("load", tmp_path / "bundle")
    assert isinstance(model, _Model) and model.scale == 3.5
    assert params.cfg["N"] == 64 and params.cfg["gridsize"] == 2 and params.cfg["nphotons"] == 1e8
    assert params.cfg["intensity_scale"] == 3.5 and "_version" not in params.cfg
    np.testing.assert_array_equal(params.cfg["probe"], np.eye(4, dtype=np.complex64))
    assert cfg == params.cfg and cfg is not params.cfg


def test_load_inference_bundle_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        workflows.load_inference_bundle(tmp_path / "missing")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        workflows.load_inference_bundle(f)
    with pytest.raises(FileNotFoundError, match="wts.h5.zip"):
        workflows.load_inference_bundle(tmp_path)


def test_tf_bundle_goes_to_tensorflow_backend_never_silently_elsewhere(tmp_path):
    shutil.copy(TF_SMALL, tmp_path / "wts.h5.zip")
    if B.is_backend_installed("tensorflow"):
        pytest.skip("reference ptycho installed")
    with pytest.raises(RuntimeError, match="TensorFlow backend selected") as info:
        workflows.load_inference_bundle(tmp_path)
    assert "pinn-jax convert <in> <out>" in str(info.value)


def test_reassemble_cdi_image_forwards_only_set_options(backend):
    model = _Model(1.0)
    amp, phase, res = workflows.reassemble_cdi_image("test", _config(), M=7, model=model)
    assert backend.calls[-1] == ("reconstruct", 7, {})
    assert amp.shape == (3, 3) and "recon_amp" in res and "obj_tensor_full" in res
    workflows.reassemble_cdi_image("test", _config(), flip_x=True, coord_scale=2.0, model=model)
    assert backend.calls[-1] == ("reconstruct", 20, {"flip_x": True, "coord_scale": 2.0})
    with pytest.raises(ValueError, match="model"):
        workflows.reassemble_cdi_image("test", _config())


def test_save_outputs_writes_pngs_atomically(tmp_path):
    out = tmp_path / "o"
    workflows.save_outputs(None, None, {}, str(out))
    assert out.is_dir() and list(out.iterdir()) == []
    rng = np.random.default_rng(0)
    workflows.save_outputs(rng.random((1, 24, 24, 1)), rng.random((24, 24)), {}, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["reconstructed_amplitude.png", "reconstructed_phase.png"]
    for n in names:
        data = (out / n).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match="amplitude"):
        workflows.save_outputs(np.zeros((2, 3, 4)), np.zeros((3, 4)), {}, out)


def test_save_outputs_failure_keeps_previous_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    rng = np.random.default_rng(1)
    workflows.save_outputs(rng.random((16, 16)), rng.random((16, 16)), {}, tmp_path)
    before = (tmp_path / "reconstructed_amplitude.png").read_bytes()

    def broken_savefig(self, fh, **kw):
        fh.write(b"\x89PNG half a picture")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="simulated"):
        workflows.save_outputs(rng.random((16, 16)), rng.random((16, 16)), {}, tmp_path)
    assert (tmp_path / "reconstructed_amplitude.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "reconstructed_amplitude.png", "reconstructed_phase.png"]


def test_load_inference_bundle_untagged_unknown_archive(tmp_path):
    entry = archive.ModelEntry({"N": 8, "gridsize": 1, "intensity_scale": 1.0})
    archive.write_archive(tmp_path / "wts.h5.zip", {"diffraction_to_obj": entry}, backend="x", version="9")
    import zipfile

    with zipfile.ZipFile(tmp_path / "wts.h5.zip") as zin, zipfile.ZipFile(tmp_path / "u.zip", "w") as zout:
        for info in zin.infolist():
            if info.filename.startswith("manifest"):
                continue
            zout.writestr(info, zin.read(info))
        zout.writestr("manifest.json", '{"models": ["diffraction_to_obj"], "version": "9"}')
    (tmp_path / "u.zip").replace(tmp_path / "wts.h5.zip")
    with pytest.raises(ValueError, match="cannot tell which backend"):
        workflows.load_inference_bundle(tmp_path)


def test_reference_names_and_signatures():
    """The dispatchers keep the reference's names, parameter names/order and defaults."""
    import inspect

    def params_of(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    empty = inspect.Parameter.empty
    stitch = [("flip_x", False), ("flip_y", False), ("transpose", False), ("M", 20)]
    assert params_of(workflows.run_cdi_example) == [
        ("train_data", empty), ("test_data", empty), ("config", empty), *stitch,
        ("do_stitching", False)]
    # the reference's three positional parameters; our additions are keyword-only, default None
    sig = inspect.signature(workflows.train_cdi_model).parameters.values()
    assert [(p.name, p.default) for p in sig if p.kind is not p.KEYWORD_ONLY] == [
        ("train_data", empty), ("test_data", empty), ("config", empty)]
    assert [(p.name, p.default) for p in sig if p.kind is p.KEYWORD_ONLY] == [
        ("on_epoch_end", None), ("seed", None)]
    assert params_of(workflows.load_inference_bundle) == [("model_dir", empty)]
    assert params_of(workflows.save_outputs) == [
        ("amplitude", empty), ("phase", empty), ("results", empty), ("output_prefix", empty)]
    assert params_of(workflows.reassemble_cdi_image)[:7] == [
        ("test_data", empty), ("config", empty), *stitch, ("coord_scale", 1.0)]
    assert params_of(workflows.save_model)[1:] == [("output_dir", empty), ("config", empty)]
    assert set(workflows.__all__) == {"run_cdi_example", "train_cdi_model",
                                      "load_inference_bundle", "save_model", "save_outputs",
                                      "reassemble_cdi_image"}


def test_return_shapes_of_the_dispatchers(backend, tmp_path):
    """run_cdi_example -> 3-tuple (amp, phase, results dict); train -> dict;
    load_inference_bundle -> (model, dict); save_outputs -> None."""
    out = workflows.run_cdi_example("train", "test", _config(), do_stitching=True)
    assert isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], dict)
    assert out[0].shape == (5, 5) and out[2]["backend"] == NAME
    assert "model_instance" in out[2] and "history" in out[2]
    assert isinstance(workflows.train_cdi_model("train", None, _config()), dict)
    workflows.save_model(out[2], tmp_path, _config())
    loaded = workflows.load_inference_bundle(tmp_path)
    assert isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[1], dict)
    predicted = loaded[0].predict([np.zeros((2, 64, 64, 4), np.float32), np.zeros((2, 1, 2, 4))])
    assert predicted.shape == (2, 64, 64, 1) and predicted.dtype == np.complex64
    assert workflows.save_outputs(out[0], out[1], out[2], tmp_path / "png") is None
