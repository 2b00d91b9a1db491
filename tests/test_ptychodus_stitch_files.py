"""Blend stitching of the ptychodus product, and scans written in ptychodus's own file formats.

- ``StitchMode = blend`` (default): each position fills its illuminated footprint of the part the
  network reconstructs, weighted by the probe intensity; the input object stays outside; the
  covered fraction is reported. ``crop`` is the reference's central crop.
- :func:`backend_api.ptychodus.files.write_ptychodus_scan` (what ``pinn-jax simulate`` calls):
  the files open with ptychodus's readers; intensities are the amplitudes squared once.
"""

from __future__ import annotations

import numpy as np
import pytest

from backend_api.ptychodus.convert import (
    blend_on_grid,
    blend_window,
    coverage_report,
    stitch_on_grid,
)
from backend_api.ptychodus.files import object_pixel_size_m, patterns_as_intensity, write_ptychodus_scan


def _gaussian_probe(n: int, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] - n / 2
    return np.exp(-(xx**2 + yy**2) / (2 * sigma**2)).astype(np.complex64)


# ------------------------------------------------------------------------------ blend (numpy)


def test_blend_window_weights_the_reconstructed_illuminated_part():
    probe = _gaussian_probe(32, 6.0)
    w = blend_window(probe, pad_object=True)
    assert w.max() == pytest.approx(1.0)
    assert (w[:8] == 0).all() and (w[:, 24:] == 0).all()  # outside the central N/2
    assert w[16, 16] == pytest.approx(1.0) and 0 < w[16, 10] < 1
    assert (w[(w > 0)] >= 0.01).all()  # the intensity floor
    wide = blend_window(probe, pad_object=False)
    assert wide[16, 5] > 0 and wide[16, 5] == pytest.approx(np.exp(-121 / 36), rel=1e-5)
    assert blend_window(np.zeros((8, 8)), pad_object=False).min() == 1.0  # no intensity: flat
    with pytest.raises(ValueError, match="probe"):
        blend_window(np.ones((4, 6)))


def test_blend_fills_footprints_where_crop_leaves_gaps():
    n, shape = 32, (96, 96)
    positions = np.array([[30.0, 30.0], [42.0, 30.0], [30.0, 42.0], [42.0, 42.0]])
    values = np.array([1.0, 2.0, 3.0, 4.0]) * np.exp(0.5j)
    patches = np.broadcast_to(values[:, None, None], (4, n, n)).astype(np.complex64)
    window = blend_window(_gaussian_probe(n, 20.0), pad_object=True)
    obj, weight = blend_on_grid(patches, positions, shape, window)
    _, crop_weight = stitch_on_grid(patches, positions, shape, 6)
    blend = coverage_report(weight, positions)
    crop = coverage_report(crop_weight, positions)
    # 12 px apart: the 6 px crops leave gaps, the 16 px footprints overlap
    assert crop["scan_area_covered_fraction"] < 0.5
    assert blend["scan_area_covered_fraction"] == pytest.approx(1.0)
    assert blend["covered_pixels"] > 3 * crop["covered_pixels"]
    assert obj[30, 30] == pytest.approx(values[0], abs=1e-6)  # one patch: its value
    assert abs(obj[30, 36]) == pytest.approx(1.5, abs=0.02)  # half way: an even blend
    assert (weight[:20] == 0).all() and obj[5, 5] == 0  # nothing outside the footprints
    with pytest.raises(ValueError, match="window"):
        blend_on_grid(patches, positions, shape, window[:-1])
    with pytest.raises(ValueError, match="positions"):
        blend_on_grid(patches, positions[:2], shape, window)


# ------------------------------------------------------------------------------ through the library

ptychodus = pytest.importorskip("ptychodus")


def test_sparse_scan_product_is_filled_and_reports_coverage(tmp_path):
    from test_ptychodus import build_input, make_library
    from test_ptychodus_support import make_scan

    scan = make_scan(N=64, n_side=3, step=28, seed=5, probe_sigma=12.0)
    lib = make_library()
    pinn = lib["PINN"]
    parameters = build_input(scan, parity="even")
    pinn.export_training_data(tmp_path / "train_data.npz", parameters)
    list(pinn.train(tmp_path, tmp_path))
    full = build_input(scan, object_init=np.full((132, 132), 0.5, np.complex64))
    initial = full.product.object_.get_array()[0]
    results = {}
    for mode in ("crop", "blend"):
        lib.settings.parameter("own", "StitchMode").set_value(mode)
        out = next(iter(pinn.reconstruct(full))).product.object_.get_array()[0]
        results[mode] = (out, dict(pinn.last_info["stitch"]))
    crop_obj, crop = results["crop"]
    blend_obj, blend = results["blend"]
    assert crop["mode"] == "crop" and blend["mode"] == "blend"
    assert crop["scan_area_covered_fraction"] < 0.6 < blend["scan_area_covered_fraction"]
    changed_blend = ~np.isclose(blend_obj, initial)
    changed_crop = ~np.isclose(crop_obj, initial)
    assert changed_blend.sum() > 2 * changed_crop.sum()
    assert np.isclose(blend_obj[:3, :3], initial[:3, :3]).all()  # outside: the input object
    assert 0 < blend["covered_fraction"] < 1
    lib.settings.parameter("own", "StitchMode").set_value("patchwork")
    with pytest.raises(ValueError, match="PtychoPINNJax.StitchMode"):
        next(iter(pinn.reconstruct(full)))


# ------------------------------------------------------------------------------ files


def _scan_dict(n_pat=6, n=32, size=80, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(4.0, (n_pat, n, n))
    return {"xcoords": rng.uniform(30, 50, n_pat), "ycoords": rng.uniform(30, 50, n_pat),
            "diff3d": np.sqrt(counts).astype(np.float32), "probeGuess": _gaussian_probe(n, 6.0),
            "objectGuess": (0.8 * np.exp(0.3j * rng.random((size, size)))).astype(np.complex64),
            "counts": counts}


def test_patterns_as_intensity_squares_amplitudes_once():
    d = _scan_dict()
    counts = patterns_as_intensity(d["diff3d"])
    assert counts.dtype == np.uint32 and np.array_equal(counts, d["counts"])
    same = patterns_as_intensity(d["counts"].astype(np.float32), kind="intensity")
    assert np.array_equal(same, d["counts"])  # intensities are not squared again
    scaled = patterns_as_intensity(d["diff3d"] * 0.37)
    assert scaled.dtype == np.float32
    with pytest.raises(ValueError, match="kind"):
        patterns_as_intensity(d["diff3d"], kind="counts")
    with pytest.raises(ValueError, match="diff3d"):
        patterns_as_intensity(-d["diff3d"])


def test_written_scan_opens_with_ptychodus_readers_and_trains_in_pinn_jax(tmp_path):
    from ptychodus.api.io import load_diffraction_data, load_product
    from ptychodus.plugins.npz_diffraction_file import NPZDiffractionFileIO

    d = _scan_dict()
    files = write_ptychodus_scan(tmp_path, d, name="unit")
    n = 32
    dx = object_pixel_size_m(n)
    product = load_product(files["product"])
    assert product.object_.get_array().shape == (1, 80, 80)
    assert np.allclose(product.object_.get_array(), 1.0)  # a flat start, not the truth
    assert product.object_.get_pixel_geometry().width_m == pytest.approx(dx)
    geometry = product.object_.get_geometry()
    x_px = geometry.map_probe_positions_to_object_x_px(product.probe_positions)
    assert np.allclose(np.asarray(x_px) + 0.5, d["xcoords"])  # ptychodus <-> PtychoPINN pixels
    truth = load_product(files["ground_truth"])
    assert np.allclose(truth.object_.get_array()[0], d["objectGuess"])
    assembled = load_diffraction_data(files["diffraction_h5"])
    assert np.array_equal(assembled.get_patterns(), d["counts"])
    # ptychodus's far-field sampling gives back the object pixel
    lam = 1.239841984e-6 / product.metadata.photon_energy_eV
    p = assembled.get_pixel_geometry().width_m
    assert lam * product.metadata.detector_distance_m / (n * p) == pytest.approx(dx)
    dataset = NPZDiffractionFileIO().read(files["diffraction_npz"])
    assert np.array_equal(next(iter(dataset)).get_patterns(), d["counts"])
    with pytest.raises(ValueError, match="probeGuess"):
        write_ptychodus_scan(tmp_path / "bad", {k: v for k, v in d.items() if k != "probeGuess"})


def test_ptychodus_export_opens_in_pinn_jax_train_loader(tmp_path):
    """What ptychodus exports for training (intensity uint32 diff3d, (modes, H, W) probe) is
    read by pinn-jax's loader as amplitudes (one square root)."""
    from ptychodus.api.io import save_ptychopinn_training_data

    from backend_api.raw_data import RawData
    from test_ptychodus import build_input
    from test_ptychodus_support import make_scan

    scan = make_scan(N=64, n_side=3, step=8, seed=2, n_hot=0)
    path = tmp_path / "train_data.npz"
    save_ptychopinn_training_data(path, build_input(scan))
    with pytest.warns(UserWarning, match="integer dtype uint32"):  # counts: one square root
        raw = RawData.from_file(path)
    assert raw.diff3d.dtype == np.float32 and raw.probeGuess.shape == (64, 64)
    assert np.allclose(raw.diff3d ** 2, scan.patterns, rtol=1e-4, atol=1e-3)


def test_pinn_jax_simulate_writes_the_test_scan_for_ptychodus(tmp_path, capsys):
    from ptychodus.api.io import load_diffraction_data, load_product

    from pinn_jax.cli import main

    out = tmp_path / "sim"
    assert main(["simulate", "--output-dir", str(out), "--n-images", "8", "--N", "64",
                 "--object-size", "96", "--nphotons", "1e4"]) == 0
    assert "for ptychodus" in capsys.readouterr().out
    with np.load(out / "test_data.npz") as z:
        x, diff3d, truth = z["xcoords"], z["diff3d"], z["objectGuess"]
    product = load_product(out / "product.h5")
    x_px = product.object_.get_geometry().map_probe_positions_to_object_x_px(product.probe_positions)
    assert np.allclose(np.asarray(x_px) + 0.5, x)
    assert product.object_.get_array().shape[1:] == truth.shape
    patterns = load_diffraction_data(out / "diffraction.h5").get_patterns()
    assert np.allclose(patterns, diff3d.astype(np.float64) ** 2, rtol=1e-4, atol=1e-3)
    assert np.allclose(load_product(out / "ground_truth.h5").object_.get_array()[0], truth)
    assert main(["simulate", "--output-dir", str(tmp_path / "plain"), "--n-images", "8",
                 "--object-size", "96", "--no-ptychodus-files"]) == 0
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["test_data.npz",
                                                                      "train_data.npz"]
