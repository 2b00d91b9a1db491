"""ptychodus 1.7 integration (backend_api.ptychodus) with a deterministic stand-in backend.

The stand-in (tests/test_ptychodus_support.py) replaces the 'jax' backend inside the spawned
child processes, so these tests exercise everything ptychodus-facing — settings, data
conversion, child processes, Product building and geometry, model files, training-data
export, registration and ptychodus's own batch mode — without training a network. The real
JAX backend is exercised in tests/test_ptychodus_jax.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("ptychodus")

from ptychodus.api.assemble import AssembledDiffractionData  # noqa: E402
from ptychodus.api.constants import energy_eV_to_wavelength_m  # noqa: E402
from ptychodus.api.geometry import PixelGeometry  # noqa: E402
from ptychodus.api.io import load_product, save_diffraction_data, save_product  # noqa: E402
from ptychodus.api.object import Object, ObjectCenter  # noqa: E402
from ptychodus.api.probe import ProbeSequence  # noqa: E402
from ptychodus.api.probe_positions import ProbePosition, ProbePositionSequence  # noqa: E402
from ptychodus.api.product import Product, ProductMetadata  # noqa: E402
from ptychodus.api.reconstruct import (  # noqa: E402
    ReconstructInput,
    ReconstructorLibrary,
    TrainableReconstructor,
    TrainOutput,
    prepare_reconstruct_input,
)
from ptychodus.api.settings import SettingsRegistry  # noqa: E402

from backend_api.ptychodus import PtychoPINNJaxReconstructorLibrary  # noqa: E402
from backend_api.ptychodus.convert import (  # noqa: E402
    compose_object,
    intensity_to_amplitude,
    stitch_on_grid,
)
from test_ptychodus_support import STANDIN_TARGET, make_scan  # noqa: E402

STANDIN = {"jax": STANDIN_TARGET}
PHOTON_ENERGY_EV = 10_000.0
DETECTOR_DISTANCE_M = 1.0


# ------------------------------------------------------------------------------ builders


def build_product(scan, *, center=(2e-7, -1e-7), object_init=None) -> Product:
    """A ptychodus Product for ``scan`` (positions in metres, object on its own grid)."""
    H, W = scan.obj.shape
    dx = scan.pixel_size_m
    cx, cy = center
    points = [
        ProbePosition(i, cx + (x - (W - 1) / 2) * dx, cy + (y - (H - 1) / 2) * dx)
        for i, (x, y) in enumerate(zip(scan.x_px, scan.y_px))
    ]
    obj0 = np.ones((H, W), dtype=np.complex64) if object_init is None else object_init
    metadata = ProductMetadata(
        name="synthetic",
        comments="",
        detector_distance_m=DETECTOR_DISTANCE_M,
        photon_energy_eV=PHOTON_ENERGY_EV,
        probe_photon_count=0.0,
        exposure_time_s=1.0,
        mass_attenuation_m2_per_kg=0.0,
        tomography_angle_deg=0.0,
    )
    return Product(
        metadata=metadata,
        probe_positions=ProbePositionSequence(points),
        probes=ProbeSequence(scan.probe[np.newaxis].astype(np.complex64), None,
                             PixelGeometry(dx, dx)),
        object_=Object(obj0, PixelGeometry(dx, dx), ObjectCenter(cx, cy)),
        losses=[],
    )


def detector_pixel_geometry(scan) -> PixelGeometry:
    # Far-field sampling consistent with the object pixel: dx = lambda z / (N p).
    n = scan.probe.shape[-1]
    p = energy_eV_to_wavelength_m(PHOTON_ENERGY_EV) * DETECTOR_DISTANCE_M / (n * scan.pixel_size_m)
    return PixelGeometry(p, p)


def build_assembled(scan, indexes=None) -> AssembledDiffractionData:
    idx = np.arange(len(scan.x_px)) if indexes is None else np.asarray(indexes)
    patterns = scan.patterns[idx]
    patterns.flags.writeable = False  # ptychodus may hand over read-only views
    return AssembledDiffractionData(idx, patterns, detector_pixel_geometry(scan), scan.bad_pixels)


def build_input(scan, *, parity=None, **kw) -> ReconstructInput:
    from ptychodus.api.reconstruct import PositionIndexFilter

    product = build_product(scan, **kw)
    flt = {None: PositionIndexFilter.ALL, "odd": PositionIndexFilter.ODD,
           "even": PositionIndexFilter.EVEN}[parity]
    return prepare_reconstruct_input(build_assembled(scan), product, index_filter=flt)


def make_library(registry=None, **kw) -> PtychoPINNJaxReconstructorLibrary:
    registry = SettingsRegistry() if registry is None else registry
    lib = PtychoPINNJaxReconstructorLibrary(registry, False, backend_registrations=STANDIN, **kw)
    lib.settings.parameter("training", "NumEpochs").set_value(2)
    # the stand-in network has no physics refinement (and stands in for 'jax' itself)
    lib.settings.parameter("own", "RefineIterations").set_value(0)
    return lib


@pytest.fixture(scope="module")
def scan():
    return make_scan(N=64, n_side=5, step=8, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scan):
    """Export train/test data, train 2 epochs with the stand-in, reconstruct once."""
    work = tmp_path_factory.mktemp("ptychodus_standin")
    lib = make_library()
    pinn = lib["PINN"]
    pinn.export_training_data(work / "train_data.npz", build_input(scan, parity="even"))
    pinn.export_training_data(work / "test_data.npz", build_input(scan, parity="odd"))
    outputs = list(pinn.train(work, work))
    parameters = build_input(scan)
    products = [out.product for out in pinn.reconstruct(parameters)]
    return {"work": work, "lib": lib, "pinn": pinn, "outputs": outputs,
            "input": parameters, "products": products}


# ------------------------------------------------------------------------------ structure


def test_importing_backend_api_ptychodus_imports_neither_jax_nor_ptychodus():
    code = textwrap.dedent(
        """
        import sys
        import backend_api.ptychodus
        import backend_api.ptychodus.child, backend_api.ptychodus.convert
        assert 'jax' not in sys.modules and 'ptychodus' not in sys.modules, 'eager import'
        backend_api.ptychodus.PtychoPINNJaxReconstructorLibrary
        import backend_api.ptychodus.launcher
        backend_api.ptychodus.register(); backend_api.ptychodus.unregister()
        assert 'ptychodus' in sys.modules
        assert 'jax' not in sys.modules and 'pinn_jax' not in sys.modules, 'jax imported'
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_register_without_pyqt5_lists_the_library_and_skips_the_panel():
    """Batch mode and headless use need no Qt: with PyQt5 unimportable, register() still adds
    the library (and its training path) and leaves ptychodus's GUI controllers alone."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules['PyQt5'] = None  # as if PyQt5 were not installed
        import backend_api.ptychodus as bp
        from backend_api.ptychodus.registration import gui_available
        assert gui_available() is not None and 'PyQt5' in gui_available()
        bp.register()
        assert 'backend_api.ptychodus.gui' not in sys.modules
        from ptychodus.model import ModelCore
        with ModelCore() as model:
            keys = set(model.processing_core.algorithm_parameter.available_reconstructors())
            api = model.processing_core.processing_api
        assert {'ptychopinn-jax_pinn', 'ptychopinn-jax_supervised'} <= keys, keys
        assert api.ptychopinn_jax_library is model.processing_core.ptychopinn_jax_library
        bp.unregister()
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_library_implements_the_1_7_interface():
    lib = make_library()
    assert isinstance(lib, ReconstructorLibrary)
    assert lib.name == "PtychoPINN-JAX" and "_" not in lib.name
    names = [r.name for r in lib]
    assert names == ["PINN", "Supervised"]
    for r in lib:
        assert isinstance(r, TrainableReconstructor)
        assert not r.is_model_loaded()
        assert r.get_model_file_extension() == ".zip"
        assert "*.zip" in r.get_model_file_filter()
        assert "*.npz" in r.get_training_data_file_filter()
        assert r.get_progress_goal() == 2


def test_settings_are_read_at_call_time_and_groups_are_reused():
    from ptychodus.model.ptychopinn import PtychoPINNReconstructorLibrary

    bare = SettingsRegistry()
    lib = PtychoPINNJaxReconstructorLibrary(bare, False)
    assert not lib.settings.shares_ptychodus_groups
    assert {"PtychoPINNJaxModel", "PtychoPINNJaxTraining", "PtychoPINNJaxInference",
            "PtychoPINNJax"} <= set(bare)
    # ptychodus's own library can still be built on the same registry afterwards.
    PtychoPINNReconstructorLibrary(bare, False)

    shared = SettingsRegistry()
    PtychoPINNReconstructorLibrary(shared, False)
    lib = PtychoPINNJaxReconstructorLibrary(shared, False)
    assert lib.settings.shares_ptychodus_groups
    assert lib.settings.backend() == "jax"
    shared["PtychoPINNTraining"].parameters()["NumEpochs"].set_value(7)
    assert lib["PINN"].get_progress_goal() == 7  # no caching
    shared["PtychoPINNModel"].parameters()["AmpActivation"].set_value("bogus")
    with pytest.raises(ValueError, match="AmpActivation"):
        lib.settings.snapshot_model()


def test_refinement_settings():
    """RefineIterations/RefineNoise/RefineProbe/RefinePositions live in the PtychoPINNJax group
    (defaults 20 / gaussian / off / off), reach the reconstruct job, are added to a group saved
    before they existed, and a bad noise model or a negative count is named."""
    registry = SettingsRegistry()
    lib = PtychoPINNJaxReconstructorLibrary(registry, False)
    snap = lib.settings.snapshot_inference()
    assert (snap.refine_iterations, snap.refine_noise, snap.refine_probe, snap.refine_positions) == \
        (20, "gaussian", False, False)
    lib.settings.parameter("own", "RefineNoise").set_value("Poisson")
    lib.settings.parameter("own", "RefinePositions").set_value(True)
    snap = lib.settings.snapshot_inference()
    assert snap.refine_noise == "poisson" and snap.refine_positions
    lib.settings.parameter("own", "RefineNoise").set_value("laplace")
    with pytest.raises(ValueError, match="RefineNoise"):
        lib.settings.snapshot_inference()
    lib.settings.parameter("own", "RefineNoise").set_value("poisson")
    # the low-dose options: off by default (no prior, minibatch passes only)
    assert (snap.refine_tv_weight, snap.refine_full_batch_from) == (0.0, -1)
    lib.settings.parameter("own", "RefineTVWeight").set_value(0.05)
    lib.settings.parameter("own", "RefineFullBatchFrom").set_value(3)
    snap = lib.settings.snapshot_inference()
    assert (snap.refine_tv_weight, snap.refine_full_batch_from) == (0.05, 3)

    old = SettingsRegistry()
    group = old.create_group("PtychoPINNJax")
    group.create_string_parameter("Backend", "jax")
    group.create_integer_parameter("Seed", 0, minimum=0)
    group.create_integer_parameter("NumGroups", 512, minimum=1)
    group.create_integer_parameter("StitchCropSize", 20, minimum=2)
    lib = PtychoPINNJaxReconstructorLibrary(old, False)
    assert lib.settings.snapshot_inference().refine_iterations == 20


def test_reconstruct_job_carries_the_refinement_settings(scan):
    lib = make_library()
    lib.settings.parameter("own", "RefineIterations").set_value(7)
    lib.settings.parameter("own", "RefineProbe").set_value(True)
    pinn = lib["PINN"]
    pinn._model_path = Path("/nonexistent/model.zip")  # the job is only built, not run
    job = pinn._make_reconstruct_job(build_input(scan))
    assert (job.refine_iterations, job.refine_probe, job.refine_positions, job.refine_noise) == \
        (7, True, False, "gaussian")
    assert (job.refine_tv_weight, job.refine_full_batch_from) == (0.0, -1)
    lib.settings.parameter("own", "RefineTVWeight").set_value(0.05)
    lib.settings.parameter("own", "RefineFullBatchFrom").set_value(3)
    job = pinn._make_reconstruct_job(build_input(scan))
    assert (job.refine_tv_weight, job.refine_full_batch_from) == (0.05, 3)


def test_child_passes_the_low_dose_options_only_when_set():
    """A backend's own refine_on_grid from before the low-dose options still serves the default
    settings; set, they reach it as tv_weight / full_batch_from."""
    from backend_api.ptychodus.child import ReconstructJob, _refine

    calls = []

    class Old:
        name = "other"

        @staticmethod
        def refine_on_grid(amplitudes, positions, probe, initial, *, iterations, noise, refine_probe,
                           refine_positions, seed):
            calls.append("old")
            return initial, np.ones(initial.shape), {}

    class New(Old):
        @staticmethod
        def refine_on_grid(amplitudes, positions, probe, initial, **kw):
            calls.append(kw)
            return initial, np.ones(initial.shape), {}

    base = dict(model_file=Path("m.zip"), backend="other", amplitude=np.ones((2, 8, 8), np.float32),
                xcoords=np.array([4.0, 5.0]), ycoords=np.array([4.0, 5.0]), probe=np.ones((8, 8), np.complex64),
                object_shape=(16, 16), n_nearest_neighbors=4, n_samples=1, stitch_crop_size=4, refine_iterations=2)
    obj, weight = np.ones((16, 16), np.complex64), np.ones((16, 16))
    _refine(Old(), "other", ReconstructJob(**base), obj, weight)
    _refine(New(), "other", ReconstructJob(**base, refine_tv_weight=0.05, refine_full_batch_from=3), obj, weight)
    assert calls[0] == "old" and calls[1]["tv_weight"] == 0.05 and calls[1]["full_batch_from"] == 3


def test_child_refuses_refinement_for_a_backend_without_one():
    from backend_api.ptychodus.child import _refine

    class NoRefine:
        name = "jax"

    job = SimpleNamespace(refine_iterations=5)
    with pytest.raises(ValueError, match="RefineIterations is 5, but the 'jax' backend has no physics refinement"):
        _refine(NoRefine(), "jax", job, np.ones((4, 4), np.complex64), np.ones((4, 4)))


def test_intensity_to_amplitude_and_errors():
    counts = np.array([[[0, 4], [9, 16]]], dtype=np.uint16)
    counts.flags.writeable = False
    np.testing.assert_array_equal(intensity_to_amplitude(counts), [[[0, 2], [3, 4]]])
    assert intensity_to_amplitude(counts).dtype == np.float32
    assert intensity_to_amplitude(-counts.astype(float))[0, 1, 1] == 0.0
    with pytest.raises(ValueError, match="NaN"):
        intensity_to_amplitude(np.full((1, 2, 2), np.nan))
    with pytest.raises(ValueError, match=r"\(n, H, W\)"):
        intensity_to_amplitude(np.ones((2, 2)))


def test_stitch_on_grid_places_patch_centre_on_position():
    n, crop = 16, 4
    patch = np.zeros((n, n), dtype=np.complex64)
    patch[n // 2, n // 2] = 1.0 + 1.0j
    obj, weight = stitch_on_grid(patch[None], np.array([[10.0, 7.0]]), (20, 30), crop)
    assert obj.shape == (20, 30)
    r, c = np.unravel_index(np.argmax(np.abs(obj)), obj.shape)
    assert (r, c) == (7, 10)
    assert weight[7, 10] == pytest.approx(1.0) and weight.sum() == pytest.approx(crop * crop)
    # A half-pixel position splits the value between two columns.
    obj, weight = stitch_on_grid(patch[None], np.array([[10.5, 7.0]]), (20, 30), crop)
    assert abs(obj[7, 10]) == pytest.approx(abs(obj[7, 11]))
    # Uncovered pixels keep the input object; extra layers become 1.
    base = np.full((2, 20, 30), 0.5 + 0.5j, dtype=np.complex64)
    out = compose_object(obj, weight, base)
    assert out.shape == base.shape and out.dtype == np.complex64
    assert out[0, 0, 0] == base[0, 0, 0] and np.all(out[1] == 1)


# ------------------------------------------------------------------------------ end to end


def test_export_training_data_matches_ptychodus_format(trained, scan):
    from ptychodus.plugins.slac_npz_file import SLACProductFileReader

    from backend_api.raw_data import RawData

    work = trained["work"]
    with np.load(work / "train_data.npz") as f:
        assert {"xcoords", "ycoords", "xcoords_start", "ycoords_start", "diff3d", "bad_pixels",
                "probeGuess", "objectGuess", "scan_index"} <= set(f.files)
        assert f["diff3d"].dtype == np.uint32  # intensity in the source dtype
        assert f["probeGuess"].shape == (1, 64, 64)  # (modes, H, W)
        assert f["diff3d"].shape[0] == len(scan.x_px) - len(scan.x_px) // 2  # even indexes
        assert f["diff3d"][:, scan.bad_pixels].max() < 60000  # hot pixels inpainted
    with pytest.warns(UserWarning):
        raw = RawData.from_file(work / "train_data.npz")
    assert raw.diff3d.dtype == np.float32 and raw.probeGuess.shape == (64, 64)
    product = SLACProductFileReader().read(work / "test_data.npz")
    assert len(product.probe_positions) == len(scan.x_px) // 2
    assert not list(work.glob(".*.tmp"))


def test_train_yields_per_epoch_losses_and_loads_the_model(trained):
    outputs = trained["outputs"]
    assert [o.progress for o in outputs] == [1, 2]
    assert all(isinstance(o, TrainOutput) for o in outputs)
    last = outputs[-1]
    assert [(v.epoch, v.value) for v in last.training_loss] == [(1, 1.0), (2, 0.5)]
    assert [(v.epoch, v.value) for v in last.validation_loss] == [(1, 2.0), (2, 1.0)]
    assert trained["pinn"].is_model_loaded()
    assert not trained["lib"]["Supervised"].is_model_loaded()
    assert (trained["work"] / "wts.h5.zip").is_file()
    assert (trained["work"] / "model.zip").is_file()  # what batch reconstruct looks for


def test_reconstruct_returns_object_on_the_input_grid(trained, scan):
    products = trained["products"]
    assert len(products) == 1
    out, inp = products[0], trained["input"].product
    obj_in, obj_out = inp.object_, out.object_
    assert obj_out.get_array().shape == obj_in.get_array().shape
    assert obj_out.get_pixel_geometry() == obj_in.get_pixel_geometry()
    assert obj_out.get_center() == obj_in.get_center()
    arr = obj_out.get_array()
    assert np.iscomplexobj(arr) and np.all(np.isfinite(arr))
    assert out.probes is inp.probes and out.probe_positions is inp.probe_positions
    assert out.metadata == inp.metadata
    # Covered pixels changed, uncovered ones kept the input's 1+0j.
    assert arr[0, 0, 0] == 1 + 0j
    centre = (int(round(scan.y_px[12] + 0.5)), int(round(scan.x_px[12] + 0.5)))
    assert arr[0][centre] != 1 + 0j


def test_saved_model_reconstructs_the_same_object_in_a_fresh_library(trained, tmp_path):
    pinn = trained["pinn"]
    model_file = tmp_path / "saved" / f"model{pinn.get_model_file_extension()}"
    pinn.save_model(model_file)
    assert model_file.is_file() and not list(model_file.parent.glob(".*.tmp"))
    fresh = make_library()["PINN"]
    assert not fresh.is_model_loaded()
    fresh.load_model_from_file(model_file)
    assert fresh.is_model_loaded()
    again = next(iter(fresh.reconstruct(trained["input"]))).product
    np.testing.assert_array_equal(again.object_.get_array(),
                                  trained["products"][0].object_.get_array())


def test_bad_calls_raise_before_work(tmp_path, scan):
    pinn = make_library()["PINN"]
    with pytest.raises(RuntimeError, match="no model"):
        next(iter(pinn.reconstruct(build_input(scan))))
    with pytest.raises(RuntimeError, match="no model"):
        pinn.save_model(tmp_path / "m.zip")
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a zip"):
        pinn.load_model_from_file(tmp_path / "junk.zip")
    with pytest.raises(ValueError, match="does not exist"):
        pinn.load_model_from_file(tmp_path / "missing.zip")
    from ptychodus.model.processing.subprocess_reconstructor import SubprocessReconstructor  # noqa: F401

    with pytest.raises(ValueError, match="train_data.npz"):
        list(pinn.train(tmp_path, tmp_path))  # raised in the child, re-raised here


# ------------------------------------------------------------------------------ ptychodus batch


def _write_batch_inputs(directory: Path, scan, lib_key: str, extra_ini: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_diffraction_data(directory / "diffraction.h5", build_assembled(scan))
    save_product(directory / "product.h5", build_product(scan))
    (directory / "settings.ini").write_text(
        f"[Processing]\nAlgorithm = {lib_key}\n\n"
        "[PtychoPINNTraining]\nNumEpochs = 2\nBatchSize = 8\n\n"
        "[PtychoPINNModel]\nNumFiltersScale = 1\n\n"
        "[PtychoPINNJax]\nRefineIterations = 0\n" + extra_ini
    )


def run_batch_train_and_reconstruct(tmp_path: Path, scan, *, registrations=None, extra_ini=""):
    """ptychodus's own ModelCore, our library registered: batch train, then batch reconstruct
    (the trained model.zip found in the input directory). Returns (codes, output product)."""
    import backend_api.ptychodus as bp
    from ptychodus.api.exit_codes import ExitCode
    from ptychodus.model import ModelCore

    work, out = tmp_path / "work", tmp_path / "out"
    _write_batch_inputs(work, scan, "ptychopinn-jax_pinn", extra_ini)
    lib = make_library()["PINN"]
    lib.export_training_data(work / "train_data.npz", build_input(scan, parity="even"))
    lib.export_training_data(work / "test_data.npz", build_input(scan, parity="odd"))
    bp.register(backend_registrations=registrations)
    try:
        with ModelCore() as model:
            assert "ptychopinn-jax_pinn" in set(
                model.processing_core.processing_api.available_reconstructors())
            # Input and output are the same directory, as the GUI's Train button does.
            code_train = model.batch_mode_execute("train", work, work)
            code_recon = model.batch_mode_execute("reconstruct", work, out)
    finally:
        bp.unregister()
    files = sorted(out.glob("product*.h5"))
    assert code_train == ExitCode.SUCCESS and code_recon == ExitCode.SUCCESS, (code_train, code_recon)
    assert (work / "model.zip").is_file() and files
    return load_product(files[-1])


@pytest.mark.slow
def test_ptychodus_batch_mode_train_then_reconstruct(tmp_path, scan):
    product = run_batch_train_and_reconstruct(tmp_path, scan, registrations=STANDIN)
    expected = build_product(scan)
    obj = product.object_
    assert obj.get_array().shape == expected.object_.get_array().shape
    assert obj.get_pixel_geometry() == expected.object_.get_pixel_geometry()
    assert obj.get_center() == expected.object_.get_center()
    assert np.all(np.isfinite(obj.get_array()))
    assert len(product.probe_positions) == len(scan.x_px)


def test_upstream_entry_point_line_would_build_our_library():
    """The one-line upstream hook in /work/coord/NOTES_ptychodus.md loads the library class
    from an entry point and calls it with (settings_registry, is_developer_mode_enabled)."""
    from importlib.metadata import EntryPoint

    ep = EntryPoint(name="ptychopinn-jax",
                    value="backend_api.ptychodus:PtychoPINNJaxReconstructorLibrary",
                    group="ptychodus.reconstructor_libraries")
    registry = SettingsRegistry()
    libs = [*(e.load()(registry, False) for e in [ep])]
    assert [lib.name for lib in libs] == ["PtychoPINN-JAX"]


def test_launcher_hands_arguments_to_ptychodus(capsys):
    from backend_api.ptychodus.launcher import main

    argv_before = list(sys.argv)
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "ptychodus" in capsys.readouterr().out.lower()
    assert sys.argv == argv_before
    import backend_api.ptychodus as bp

    assert bp.is_registered()
    bp.unregister()
    assert not bp.is_registered()


def test_train_job_carries_the_settings_read_now(tmp_path):
    lib = make_library()
    s = lib.settings
    s.parameter("model", "GridSize").set_value(2)
    s.parameter("training", "NumPhotons").set_value(1e7)
    s.parameter("own", "NumGroups").set_value(64)
    job = lib["Supervised"]._make_train_job(tmp_path, tmp_path / "out")
    assert job.model["model_type"] == "supervised" and job.model["gridsize"] == 2
    assert job.training["nphotons"] == 1e7 and job.training["n_groups"] == 64
    assert job.training["nepochs"] == 2 and job.backend == "jax"
    assert lib["PINN"]._make_train_job(tmp_path, tmp_path).model["model_type"] == "pinn"


def test_gridsize_2_model_reconstructs_on_the_input_grid(tmp_path, scan):
    lib = make_library()
    lib.settings.parameter("model", "GridSize").set_value(2)
    pinn = lib["PINN"]
    pinn.export_training_data(tmp_path / "train_data.npz", build_input(scan, parity="even"))
    pinn.export_training_data(tmp_path / "test_data.npz", build_input(scan, parity="odd"))
    assert len(list(pinn.train(tmp_path, tmp_path))) == 2
    parameters = build_input(scan)
    obj = next(iter(pinn.reconstruct(parameters))).product.object_
    assert obj.get_array().shape == parameters.product.object_.get_array().shape
    assert np.all(np.isfinite(obj.get_array()))


def test_stopping_training_early_ends_the_child(trained):
    import multiprocessing

    pinn = make_library()["PINN"]
    outputs = pinn.train(trained["work"], trained["work"] / "stopped")
    assert next(outputs).progress == 1
    outputs.close()  # what ptychodus does when the user presses Stop
    assert not [p for p in multiprocessing.active_children() if p.name == "ptychopinn-jax-child"]
    assert not pinn.is_model_loaded()


def test_reconstruct_job_converts_float_intensities_and_geometry(trained, scan):
    """Float (preprocessed) read-only intensities -> sqrt amplitudes; bad pixels inpainted;
    positions -> object pixels + 0.5 (patch pixel N/2 on the probe centre)."""
    from dataclasses import replace

    parameters = build_input(scan)
    floats = parameters.diffraction_patterns.astype(np.float64)
    floats.flags.writeable = False
    job = trained["pinn"]._make_reconstruct_job(replace(parameters, diffraction_patterns=floats))
    good = ~scan.bad_pixels
    np.testing.assert_allclose(job.amplitude[:, good], np.sqrt(scan.patterns[:, good]), rtol=1e-6)
    assert job.amplitude[:, scan.bad_pixels].max() < np.sqrt(60000) / 2  # inpainted
    np.testing.assert_allclose(job.xcoords, scan.x_px + 0.5, atol=1e-6)
    np.testing.assert_allclose(job.ycoords, scan.y_px + 0.5, atol=1e-6)
    assert job.object_shape == scan.obj.shape and job.probe.shape == (64, 64)
    with pytest.raises(ValueError, match="square"):
        trained["pinn"]._make_reconstruct_job(
            replace(parameters, diffraction_patterns=floats[:, :, :32],
                    bad_pixels=parameters.bad_pixels[:, :32]))


def test_history_replay_for_backends_without_a_callback():
    """The reference adapters cannot call back per epoch: their history (a mapping or a Keras
    History, the key spellings the references write) is replayed to on_epoch_end."""
    from types import SimpleNamespace

    from backend_api.reference_adapters import _replay_epochs, history_losses

    assert history_losses({"loss": [3, 2], "val_loss": [4, 3]}) == ([3.0, 2.0], [4.0, 3.0])
    keras_like = SimpleNamespace(history={"train_loss": [1.5], "validation_loss": [2.5]})
    assert history_losses(keras_like) == ([1.5], [2.5])
    assert history_losses(None) == ([], [])
    seen = []
    _replay_epochs({"history": {"loss": [3, 2]}}, lambda e, logs: seen.append((e, logs["loss"], logs["val_loss"])))
    assert [s[:2] for s in seen] == [(0, 3.0), (1, 2.0)] and all(np.isnan(s[2]) for s in seen)
