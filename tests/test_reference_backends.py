"""The reference adapters against the REAL reference packages (hoidn/PtychoPINN's ``ptycho`` on
TensorFlow and ``ptycho_torch`` on PyTorch/Lightning), through ``backend_api.workflows``.

Marked ``reference``: they run only where those packages import (a benchmark environment, see
benchmarks/README.md "Reference environments"); elsewhere every test skips with the reason.
Select them with ``python -m pytest -m reference tests/test_reference_backends.py``.

Per backend: one training of 1 epoch on 128 groups of the 512-position fixture scan, then save,
load, predict and stitch, each checked for the protocol's shapes, dtypes and finiteness, and the
loaded model against the trained one (the archive round trip must not change predictions).
"""

from __future__ import annotations

import dataclasses
import importlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from backend_api import archive, workflows
from backend_api.config import ModelConfig, TrainingConfig
from backend_api.container import PtychoDataContainer
from backend_api.raw_data import RawData

pytestmark = pytest.mark.reference

DATA = Path(__file__).parent / "fixtures" / "tf_reference" / "dataset_n64_lines.npz"

# backend -> modules the adapter needs (imported for real: a broken install skips with its error)
_NEEDS = {
    "tensorflow": ("tensorflow", "ptycho.workflows.components", "ptycho.model_manager"),
    "pytorch": ("torch", "lightning", "ptycho_torch.workflows.components", "ptycho_torch.model_manager"),
}


def _skip_reason(backend: str) -> str | None:
    for mod in _NEEDS[backend]:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # ImportError, or the port's RuntimeError on a partial install
            return f"reference backend {backend!r} not usable here: import {mod!r} failed ({exc})"
    return None


def _config(backend: str, out: Path) -> TrainingConfig:
    return TrainingConfig(model=ModelConfig(N=64, gridsize=1, n_filters_scale=2), n_groups=128,
                          nepochs=1, batch_size=16, nphotons=1e9, neighbor_count=4,
                          subsample_seed=42, output_dir=out, backend=backend)


def _flags_for_tensorflow() -> str:
    """XLA_FLAGS without the entries TensorFlow's XLA does not know: tests/conftest.py applies
    pinn_jax's CPU flags (jaxlib-only) to the whole session, and TF aborts on an unknown one.
    jax reads the variable once, when its backend starts, so the jax tests keep theirs."""
    import os
    import shlex

    from backend_api import reference_adapters as ra

    flags = os.environ.get("XLA_FLAGS", "")
    unknown = set(ra.xla_flags_unknown_to_tensorflow(flags))
    keep = [e for e in shlex.split(flags) if not (e.startswith("--") and e[2:].split("=", 1)[0] in unknown)]
    return " ".join(shlex.quote(e) for e in keep)


@pytest.fixture(scope="module", params=["tensorflow", "pytorch"])
def trained(request, tmp_path_factory):
    backend = request.param
    reason = _skip_reason(backend)
    if reason:
        pytest.skip(reason)
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    mp.setenv("XLA_FLAGS", _flags_for_tensorflow())
    raw = RawData.from_file(DATA)
    out = tmp_path_factory.mktemp(f"ref_{backend}")
    cfg = _config(backend, out)
    amp, phase, results = workflows.run_cdi_example(raw, raw, cfg)
    path = workflows.save_model(results, out, cfg)
    model, params_cfg = workflows.load_inference_bundle(out)
    return {"backend": backend, "raw": raw, "cfg": cfg, "out": out, "results": results,
            "archive": path, "model": model, "params": params_cfg}


def _inputs(t, n=32):
    """The protocol's predict inputs for n groups of the fixture scan, grouped by backend_api."""
    cont = PtychoDataContainer.from_raw_data(t["raw"].subsample(n, 0), dataclasses.replace(t["cfg"], n_groups=n), seed=0)
    scale = float(t["params"]["intensity_scale"])
    return [cont.X * scale, cont.local_offsets]


def test_train_one_epoch(trained):
    res = trained["results"]
    assert res["backend"] == trained["backend"]
    loss = np.asarray(res["history"]["loss"] if "loss" in res["history"] else res["history"]["train_loss"])
    assert loss.size >= 1 and np.all(np.isfinite(loss))
    assert res["model_instance"] is not None


def test_torch_port_trains_at_the_reference_probe_scale(trained):
    """The port's amplitude forward uses the raw probe / probe_scale; the adapter's
    amplitude_physics_gain makes it the reference's normalised probe. Without it the predicted
    intensity is ~100x too small for this probe and the sigmoid amplitude sits at 1 in the
    whole object region (benchmarks/README.md, the torch port's saturated amplitude)."""
    if trained["backend"] != "pytorch":
        pytest.skip("torch port only")
    from backend_api.reference_adapters import reference_probe_norm

    cfg, res = trained["cfg"], trained["results"]
    module = res["model_instance"].module
    s = cfg.model.probe_scale
    assert module.model_config.amplitude_physics_gain == pytest.approx(s / reference_probe_norm(trained["raw"].probeGuess, s))
    assert float(module.model.probe_scale) == s
    amp = np.abs(res["model_instance"].predict(_inputs(trained)))[:, 16:48, 16:48]  # inside the N/4 padding
    assert np.mean(amp > 0.999) < 0.5, f"amplitude saturated: {np.mean(amp > 0.999):.2f} of the pixels at 1"


def test_save_writes_a_tagged_archive(trained):
    path = trained["archive"]
    assert path == trained["out"] / "wts.h5.zip" and path.is_file()
    assert archive.read_manifest(path)["backend"] == trained["backend"]
    names = zipfile.ZipFile(path).namelist()
    assert any(n.startswith("diffraction_to_obj/") for n in names)
    if trained["backend"] == "pytorch":
        # the port's loader rebuilds the model from this; without it the load is refused
        assert "torch_scaling_metadata.pt" in names


def test_load_restores_the_training_scale(trained):
    s = float(trained["params"]["intensity_scale"])
    assert np.isfinite(s) and s > 0
    assert trained["params"]["N"] == 64 and trained["params"]["gridsize"] == 1


def test_predict_protocol_and_archive_round_trip(trained):
    x, off = _inputs(trained)
    loaded = np.asarray(trained["model"].predict([x, off]))
    assert loaded.shape == (32, 64, 64, 1) and loaded.dtype == np.complex64
    assert np.all(np.isfinite(loaded)) and np.abs(loaded).max() > 0
    # the TF reference's model_instance is its autoencoder; both adapters add diffraction_to_obj
    fresh = np.asarray(trained["results"]["diffraction_to_obj"].predict([x, off]))
    np.testing.assert_allclose(loaded, fresh, rtol=1e-4, atol=1e-5)


def test_stitch_through_workflows(trained):
    amp, phase, res = workflows.reassemble_cdi_image(trained["raw"], trained["cfg"], model=trained["model"])
    assert amp.ndim == 2 and amp.shape == phase.shape and min(amp.shape) > 64
    assert np.all(np.isfinite(amp)) and np.all(np.isfinite(phase)) and amp.max() > 0
    obj = np.asarray(res["obj_tensor_full"])
    assert obj.shape == (128, 64, 64, 1) and np.iscomplexobj(obj)
    assert np.asarray(res["global_offsets"]).shape == (128, 1, 2, 1)


def test_stitch_options_reach_the_reference(trained):
    """transpose / flip_x act on what is stitched (and M changes the canvas), none is dropped."""
    raw, cfg, model = trained["raw"], trained["cfg"], trained["model"]
    # sequential grouping: the same groups in both calls, so only the options differ
    cfg = dataclasses.replace(cfg, sequential_sampling=True)
    _, _, plain = workflows.reassemble_cdi_image(raw, cfg, model=model)
    _, _, opts = workflows.reassemble_cdi_image(raw, cfg, model=model, transpose=True, flip_x=True)
    np.testing.assert_allclose(opts["obj_tensor_full"], np.transpose(plain["obj_tensor_full"], (0, 2, 1, 3)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(opts["global_offsets"][:, 0, 0], -plain["global_offsets"][:, 0, 0])
    np.testing.assert_allclose(opts["global_offsets"][:, 0, 1], plain["global_offsets"][:, 0, 1])
    a20, _, _ = workflows.reassemble_cdi_image(raw, cfg, model=model, M=20)
    a32, _, _ = workflows.reassemble_cdi_image(raw, cfg, model=model, M=32)
    assert a20.shape != a32.shape or not np.allclose(a20, a32)


def test_options_the_reference_lacks_are_refused(trained):
    raw, cfg, model = trained["raw"], trained["cfg"], trained["model"]
    backend = workflows.get_backend(trained["backend"])
    with pytest.raises(ValueError, match="object_shape="):
        backend.reconstruct(model, raw, config=cfg, object_shape=(224, 224))
    if trained["backend"] == "pytorch":
        with pytest.raises(ValueError, match="coord_scale="):
            workflows.reassemble_cdi_image(raw, cfg, model=model, coord_scale=2.0)


def test_torch_predict_matches_the_ports_own_stitcher(trained):
    """The adapter's predict (the protocol's X * s call) gives the patches the port's own
    stitching path computes from its container (forward_predict on the normalised X)."""
    if trained["backend"] != "pytorch":
        pytest.skip("torch wrapper only")
    _, _, res = workflows.reassemble_cdi_image(trained["raw"], trained["cfg"], model=trained["model"])
    cont = res["containers"]["test"]
    x = cont.X.numpy()[:32]
    s = float(trained["params"]["intensity_scale"])
    off = np.zeros((32, 1, 2, 1), np.float32)  # forward_predict does not read the offsets
    pred = trained["model"].predict([x * s, off])
    np.testing.assert_allclose(pred, res["obj_tensor_full"][:32], rtol=1e-4, atol=1e-5)
