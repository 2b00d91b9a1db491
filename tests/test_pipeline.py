"""One reconstruction path: the CLI, the demo, the ptychodus child and the quality benchmark all
reconstruct through pinn_jax.pipeline, so on one small data set and one model their objects on
the object grid are identical, bit for bit (no tolerance: the same arrays go through the same
jitted functions in the same order)."""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

from backend_api.canvas import STITCH_CROP
from backend_api.config import ModelConfig
from pinn_jax import checkpoint, pipeline
from pinn_jax.backend import JaxBackend
from pinn_jax.inference import load_inference_bundle
from pinn_jax.model import build_model
from pinn_jax.probe import default_probe

N = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A simulated test scan with ground truth (written as NPZ) and a saved untrained model:
    weights do not matter for equality, only that every path uses the same ones."""
    from pinn_jax import simulate

    root = tmp_path_factory.mktemp("pipeline")
    _, test = simulate.simulate_dataset(N=N, object_size=128, n_images=48, kind="lines", nphotons=1e9, seed=3)
    data = root / "test.npz"
    test.to_file(data)
    net = build_model(ModelConfig(N=N, gridsize=1, n_filters_scale=1), np.asarray(default_probe(N)), 988.2,
                      seed=1)
    checkpoint.save_model(net, root / "model", None)
    model, cfg = load_inference_bundle(root / "model")
    from backend_api.raw_data import RawData

    return {"root": root, "data": data, "raw": RawData.from_file(data), "model": model, "cfg": cfg}


def _pipeline_object(setup):
    raw = setup["raw"]
    _, _, res = pipeline.reconstruct(setup["model"], raw, grouping=pipeline.GroupingOptions(neighbor_count=4),
                                     M=STITCH_CROP, object_shape=np.shape(raw.objectGuess), seed=0,
                                     nphotons=setup["cfg"].get("nphotons", 1e9))
    return res


def test_cli_infer_gives_the_pipeline_object(setup, capsys):
    from pinn_jax.cli import main

    out = setup["root"] / "infer"
    rc = main(["infer", "--model_path", str(setup["root"] / "model"), "--test_data", str(setup["data"]),
               "--output_dir", str(out)])
    capsys.readouterr()
    assert rc == 0
    want = _pipeline_object(setup)
    with np.load(out / "reconstruction.npz") as z:
        np.testing.assert_array_equal(z["object_on_grid"], want["object_on_grid"].astype(np.complex64))
        np.testing.assert_array_equal(z["object_weights"], want["object_weights"].astype(np.float32))


def test_backend_protocol_and_demo_call_give_the_pipeline_object(setup):
    """JaxBackend.reconstruct (the Backend protocol, what workflows use) and the call run_demo
    makes (GroupingOptions with the config's neighbour count, the run's seed) are the pipeline."""
    from backend_api.config import TrainingConfig

    raw = setup["raw"]
    want = _pipeline_object(setup)
    cfg = TrainingConfig(model=ModelConfig(N=N), n_groups=len(raw.xcoords), neighbor_count=4,
                         nphotons=setup["cfg"].get("nphotons", 1e9))
    _, _, got = JaxBackend(seed=0).reconstruct(setup["model"], raw, config=cfg, M=STITCH_CROP,
                                               object_shape=np.shape(raw.objectGuess))
    np.testing.assert_array_equal(got["object_on_grid"], want["object_on_grid"])
    np.testing.assert_array_equal(got["object_weights"], want["object_weights"])


def test_ptychodus_child_stitch_gives_the_pipeline_object(setup):
    """The ptychodus child predicts with the bundle's model and stitches with the backend's
    on-grid stitcher (Backend protocol): on the pipeline's container, the pipeline's object."""
    from backend_api.ptychodus.child import _stitch

    raw = setup["raw"]
    want = _pipeline_object(setup)
    c = want["container"]
    s = np.float32(setup["model"].intensity_scale)
    patches = np.asarray(setup["model"].predict([np.asarray(c.X, np.float32) * s,
                                                 np.asarray(c.local_offsets, np.float32)]))[..., 0]
    centres = np.asarray(c.global_offsets, np.float64).reshape(-1, 2)
    obj, w = _stitch(JaxBackend(), patches, centres, tuple(np.shape(raw.objectGuess)), STITCH_CROP)
    np.testing.assert_array_equal(obj, want["object_on_grid"])
    np.testing.assert_array_equal(w, np.asarray(want["object_weights"], np.float64))


def test_quality_benchmark_gives_the_pipeline_object(setup):
    quality = load_benchmark("quality.py", "bench_quality")
    raw = setup["raw"]
    want = _pipeline_object(setup)
    _, _, got = quality.reconstruct_for_quality(setup["model"], raw, seed=0)
    np.testing.assert_array_equal(got["object_on_grid"], want["object_on_grid"])


def test_grouping_from_config_reads_only_the_grouping_fields():
    from backend_api.config import TrainingConfig

    g = pipeline.grouping_from_config(TrainingConfig(model=ModelConfig(N=N), n_groups=7, neighbor_count=5))
    assert (g.n_groups, g.neighbor_count, g.enable_oversampling) == (7, 5, False)
    assert pipeline.grouping_from_config(None) == pipeline.GroupingOptions()
