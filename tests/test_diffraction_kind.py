"""Amplitude or intensity: the classification rule (backend_api.diffraction), the
``diffraction_kind`` override on RawData, the configs, the CLI and the ptychodus path.

Data: one noise-free ``pinn_jax.simulate`` set per object kind (N=64, 48 patterns), scaled to
1e4..1e9 photons per pattern, with and without Poisson noise (``simulate.poisson_amplitudes``),
in count units and in an arbitrary scaled unit; intensities are their squares (noisy counts
exactly integral, as a detector gives them).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from backend_api import diffraction
from backend_api.diffraction import classify_diffraction
from backend_api.raw_data import RawData

PHOTONS = (1e4, 1e6, 1e9)
SCALE = 0.0371  # an arbitrary non-round unit for the "scaled" variants


@pytest.fixture(scope="module", params=["lines", "grf"])
def clean(request):
    """``(A, probe)``: noise-free amplitudes with mean sum(A**2) = 1 per pattern."""
    from pinn_jax import simulate

    train, _ = simulate.simulate_dataset(N=64, object_size=128, n_images=96, kind=request.param,
                                         nphotons=1.0, poisson=False, seed=3)
    return np.asarray(train.diff3d, np.float64), np.asarray(train.probeGuess)


def _variant(clean, nphotons, noisy, scaled, seed=0):
    """(amplitude, intensity) float32 stacks for one photon count / noise / unit choice."""
    from pinn_jax import simulate

    rate = clean[0] * np.sqrt(nphotons)
    if noisy:
        amp = simulate.poisson_amplitudes(rate, seed).astype(np.float64)
        inten = np.rint(amp * amp)  # the counts themselves
    else:
        amp = rate
        inten = rate * rate
    if scaled:
        amp, inten = amp * SCALE, inten * SCALE**2
    return amp.astype(np.float32), inten.astype(np.float32)


CASES = [(n, noisy, scaled) for n in PHOTONS for noisy in (True, False) for scaled in (False, True)]


def _id(case):
    n, noisy, scaled = case
    return f"{n:.0e}-{'poisson' if noisy else 'clean'}-{'scaled' if scaled else 'counts'}"


@pytest.mark.parametrize("case", CASES, ids=map(_id, CASES))
def test_auto_rule_on_simulated_amplitudes_and_intensities(clean, case):
    """Without metadata, every simulated amplitude stack is 'amplitude' and its square is
    'intensity' (the thresholds in backend_api.diffraction were chosen on these data)."""
    amp, inten = _variant(clean, *case)
    assert classify_diffraction(amp)[0] == "amplitude", classify_diffraction(amp)
    assert classify_diffraction(inten)[0] == "intensity", classify_diffraction(inten)


@pytest.mark.parametrize("case", CASES, ids=map(_id, CASES))
def test_auto_rule_with_nphotons_metadata(clean, case):
    """With metadata nphotons the answers stay right; in count units the photon rule is the
    one that decides (its reason names nphotons), in other units it abstains."""
    n, _, scaled = case
    amp, inten = _variant(clean, *case)
    meta = {"nphotons": n}
    for data, want in ((amp, "amplitude"), (inten, "intensity")):
        kind, reason = classify_diffraction(data, metadata=meta)
        assert kind == want, reason
        assert ("nphotons" in reason) == (not scaled), reason


def test_nphotons_argument_overrides_metadata(clean):
    amp, _ = _variant(clean, 1e6, False, False)
    kind, reason = classify_diffraction(amp, nphotons=1e6, metadata={"nphotons": 3.0})
    assert kind == "amplitude" and "nphotons=1e+06" in reason


def test_integer_valued_float_counts_are_intensity(clean):
    _, counts = _variant(clean, 1e6, True, False)
    assert np.all(counts == np.rint(counts)) and counts.max() > 1
    kind, reason = classify_diffraction(counts)
    assert kind == "intensity" and "integer-valued" in reason


def test_scaled_counts_are_intensity_by_their_quantum(clean):
    _, inten = _variant(clean, 1e4, True, True)
    kind, reason = classify_diffraction(inten)
    assert kind == "intensity" and "integer multiples of" in reason


def test_sqrt_counts_are_amplitude_by_their_squares(clean):
    amp, _ = _variant(clean, 1e4, True, False)
    kind, reason = classify_diffraction(amp, assume="intensity")
    assert kind == "amplitude" and "squared values" in reason


def test_noise_free_intensity_by_dynamic_range(clean):
    _, inten = _variant(clean, 1e6, False, True)
    kind, reason = classify_diffraction(inten)
    assert kind == "intensity" and "dynamic range" in reason


def test_integer_dtype_is_intensity():
    counts = np.random.default_rng(0).poisson(5.0, size=(4, 8, 8)).astype(np.uint16)
    assert classify_diffraction(counts) == ("intensity", "integer dtype uint16 (detector counts)")


@pytest.mark.parametrize("assume", ["amplitude", "intensity"])
def test_no_evidence_gives_the_assumed_kind(assume):
    """Smooth random values: no rule fires, so the caller's convention decides."""
    data = np.random.default_rng(1).uniform(0.5, 1.5, size=(6, 16, 16)).astype(np.float32)
    assert classify_diffraction(data, assume=assume) == (assume, f"no rule fired; taken as {assume}")


def test_subnormal_values_are_no_quantum_evidence():
    data = (np.random.default_rng(2).integers(0, 300, size=(4, 16, 16)) * 5e-324)
    assert classify_diffraction(data)[0] == "amplitude"


def test_fixtures_are_amplitudes_and_their_intensities_intensities(fixtures_dir):
    """Every diffraction amplitude in tests/fixtures is 'amplitude'; the reference's own
    intensity arrays next to them are 'intensity'."""
    amplitudes = {
        "tf_reference/dataset_n64_lines.npz": ["diff3d"],
        "tf_reference/grouped_gs1_arrays_first64.npz": ["diffraction", "X_full"],
        "tf_reference/batch16_gs1_io.npz": ["input_diffraction_scaled", "target_amp"],
        "tf_reference/forward_illuminate_and_diffract.npz": ["X_noisy_out", "amp_noiseless"],
    }
    intensities = {
        "tf_reference/batch16_gs1_io.npz": ["target_intensity"],
        "tf_reference/forward_illuminate_and_diffract.npz": ["Y_I_out"],
    }
    for table, want in ((amplitudes, "amplitude"), (intensities, "intensity")):
        for name, keys in table.items():
            with np.load(fixtures_dir / name) as f:
                for key in keys:
                    data = np.asarray(f[key])
                    if data.ndim == 4:
                        data = np.moveaxis(data, -1, 1).reshape(-1, *data.shape[1:3])
                    assert classify_diffraction(data)[0] == want, (name, key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RawData.from_file(fixtures_dir / "tf_reference" / "dataset_n64_lines.npz")


class _CountingArray(np.ndarray):
    """Records the pattern indices read through ``__getitem__``."""

    reads: list

    def __getitem__(self, item):
        if isinstance(item, np.ndarray):
            type(self).reads.append(item.copy())
        return np.asarray(super().__getitem__(item))


def test_bounded_memory_reads_a_sample_in_chunks():
    """A 2000-pattern stack is read as at most SAMPLE_PATTERNS patterns, CHUNK_PATTERNS at a
    time (each pass), never as a whole."""
    rng = np.random.default_rng(4)
    big = rng.poisson(3.0, size=(2000, 16, 16)).astype(np.float32).view(_CountingArray)
    _CountingArray.reads = []
    kind, _ = classify_diffraction(big)
    assert kind == "intensity"
    reads = _CountingArray.reads
    assert reads and max(r.size for r in reads) <= diffraction.CHUNK_PATTERNS
    assert len(np.unique(np.concatenate(reads))) <= diffraction.SAMPLE_PATTERNS
    assert np.concatenate(reads).max() == 1999  # spread over the whole stack


# --------------------------------------------------------------------------------------------
# RawData: 'auto' converts with a warning; the overrides
# --------------------------------------------------------------------------------------------

def _raw(diff3d, **kw):
    M, H = diff3d.shape[:2]
    probe = np.ones((H, H), np.complex64)
    x = np.linspace(10, 40, M)
    return RawData.from_coords_without_pc(x, x[::-1].copy(), diff3d, probe, None, **kw)


def test_auto_converts_float_intensity_with_a_warning_naming_rule_and_override(clean):
    _, counts = _variant(clean, 1e6, True, False)
    with pytest.warns(UserWarning) as caught:
        raw = _raw(counts)
    msg = " ".join(str(w.message) for w in caught)
    assert "diff3d looks like intensity" in msg and "integer-valued" in msg
    assert "diffraction_kind='amplitude'" in msg and "--diffraction_kind amplitude" in msg
    assert raw.diff3d.dtype == np.float32
    np.testing.assert_allclose(raw.diff3d, np.sqrt(counts.astype(np.float64)), rtol=1e-7)


def test_auto_keeps_amplitudes_silently(clean):
    amp, _ = _variant(clean, 1e6, True, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = _raw(amp)
    np.testing.assert_array_equal(raw.diff3d, amp)


def test_amplitude_override_takes_intensities_unchanged(clean):
    _, counts = _variant(clean, 1e6, True, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = _raw(counts, diffraction_kind="amplitude")
    np.testing.assert_array_equal(raw.diff3d, counts)


def test_amplitude_override_casts_integer_counts_without_sqrt():
    counts = np.random.default_rng(5).poisson(9.0, size=(4, 8, 8)).astype(np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = _raw(counts, diffraction_kind="amplitude")
    assert raw.diff3d.dtype == np.float32
    np.testing.assert_array_equal(raw.diff3d, counts.astype(np.float32))


def test_intensity_override_always_takes_the_square_root(clean):
    amp, _ = _variant(clean, 1e6, True, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = _raw(amp, diffraction_kind="intensity")
    np.testing.assert_allclose(raw.diff3d, np.sqrt(amp.astype(np.float64)), rtol=1e-7)


def test_intensity_override_refuses_negative_values():
    data = np.ones((3, 8, 8), np.float32)
    data[1, 2, 2] = -0.5
    with pytest.raises(ValueError, match=r"diff3d: expected non-negative intensities.*-0\.5"):
        _raw(data, diffraction_kind="intensity")


@pytest.mark.parametrize("bad", ["counts", "Amplitude", None, 1])
def test_invalid_kind_refused(bad):
    with pytest.raises(ValueError, match="diffraction_kind=") as info:
        _raw(np.ones((3, 8, 8), np.float32), diffraction_kind=bad)
    assert repr(bad) in str(info.value) and "'auto', 'amplitude', 'intensity'" in str(info.value)


def test_from_file_uses_metadata_nphotons_and_the_override(clean, tmp_path):
    """A noise-free intensity file in count units: 'auto' converts by the photon rule read from
    _metadata; 'amplitude' leaves it as stored."""
    _, inten = _variant(clean, 1e6, False, False)
    M, H = inten.shape[:2]
    path = tmp_path / "inten.npz"
    np.savez(path, xcoords=np.linspace(10, 40, M), ycoords=np.linspace(40, 10, M),
             diff3d=inten, probeGuess=np.ones((H, H), np.complex64),
             _metadata=np.array(json.dumps({"nphotons": 1e6})))
    with pytest.warns(UserWarning, match="matching nphotons=1e\\+06"):
        raw = RawData.from_file(path)
    np.testing.assert_allclose(raw.diff3d, np.sqrt(inten.astype(np.float64)), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = RawData.from_file(path, diffraction_kind="amplitude")
    np.testing.assert_array_equal(raw.diff3d, inten)


# --------------------------------------------------------------------------------------------
# Config and command line
# --------------------------------------------------------------------------------------------

def test_config_field_round_trips_through_the_legacy_dict():
    from pathlib import Path

    from backend_api.config import (InferenceConfig, ModelConfig, TrainingConfig,
                                    dataclass_to_legacy_dict)

    t = TrainingConfig(model=ModelConfig(), diffraction_kind="intensity")
    i = InferenceConfig(model=ModelConfig(), model_path=Path("m"), test_data_file=Path("t.npz"),
                        diffraction_kind="amplitude")
    assert dataclass_to_legacy_dict(t)["diffraction_kind"] == "intensity"
    assert dataclass_to_legacy_dict(i)["diffraction_kind"] == "amplitude"
    with pytest.raises(ValueError, match="TrainingConfig.diffraction_kind='sqrt'"):
        TrainingConfig(model=ModelConfig(), diffraction_kind="sqrt")


def _write_intensity_npz(path, clean):
    _, counts = _variant(clean, 1e6, True, False)
    M, H = counts.shape[:2]
    np.savez(path, xcoords=np.linspace(10, 40, M), ycoords=np.linspace(40, 10, M),
             diff3d=counts, probeGuess=np.ones((H, H), np.complex64))
    return counts


@pytest.mark.parametrize("flag,expect_sqrt", [(None, True), ("auto", True),
                                              ("amplitude", False), ("intensity", True)])
def test_cli_train_flag_reaches_the_loader(tmp_path, clean, flag, expect_sqrt):
    from pinn_jax import cli

    path = tmp_path / "train.npz"
    counts = _write_intensity_npz(path, clean)
    argv = ["train", "--train_data_file", str(path)]
    if flag:
        argv += ["--diffraction_kind", flag]
    args = cli.build_parser().parse_args(argv)
    cfg = cli._training_config(args)
    assert cfg.diffraction_kind == (flag or "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        raw = cli._load_raw(path, "--train_data_file", cfg.diffraction_kind)
    want = np.sqrt(counts.astype(np.float64)) if expect_sqrt else counts
    np.testing.assert_allclose(raw.diff3d, want, rtol=1e-6)


def test_cli_infer_has_the_flag_and_rejects_bad_values(tmp_path, capsys):
    from pinn_jax import cli

    data = tmp_path / "t.npz"
    data.write_bytes(b"")
    model = tmp_path / "m"
    model.mkdir()
    (model / "wts.h5.zip").write_bytes(b"")
    base = ["infer", "--model_path", str(model), "--test_data", str(data)]
    assert cli.build_parser().parse_args(base).diffraction_kind == "auto"
    assert cli.build_parser().parse_args(base + ["--diffraction_kind", "amplitude"]
                                         ).diffraction_kind == "amplitude"
    assert cli.main(base + ["--diffraction_kind", "sqrt"]) == 2
    assert "--diffraction_kind" in capsys.readouterr().err
    assert cli.main(["train", "--train_data_file", str(data), "--diffraction_kind", "x"]) == 2


# --------------------------------------------------------------------------------------------
# ptychodus: intensities are square-rooted, amplitudes are not
# --------------------------------------------------------------------------------------------

def test_ptychodus_conversion_leaves_amplitudes_alone(clean):
    from backend_api.ptychodus.convert import intensity_to_amplitude

    amp, counts = _variant(clean, 1e6, True, False)
    with pytest.warns(UserWarning, match="look like amplitudes.*diffraction_kind='intensity'"):
        out = intensity_to_amplitude(amp, kind="auto")
    np.testing.assert_array_equal(out, amp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(intensity_to_amplitude(counts, kind="auto"),
                                   np.sqrt(counts.astype(np.float64)), rtol=1e-7)
        # no evidence either way: ptychodus hands intensities, so 'auto' takes the root
        smooth = np.random.default_rng(6).uniform(1, 2, size=(4, 16, 16))
        np.testing.assert_allclose(intensity_to_amplitude(smooth, kind="auto"), np.sqrt(smooth),
                                   rtol=1e-6)
        np.testing.assert_array_equal(intensity_to_amplitude(counts, kind="amplitude"), counts)
        np.testing.assert_allclose(intensity_to_amplitude(amp, kind="intensity"),
                                   np.sqrt(amp.astype(np.float64)), rtol=1e-7)
    with pytest.raises(ValueError, match="diffraction_kind='amplitude' but the data have negative"):
        intensity_to_amplitude(-amp, kind="amplitude")
    with pytest.raises(ValueError, match="diffraction_kind='cube'"):
        intensity_to_amplitude(amp, kind="cube")


def test_ptychodus_training_npz_with_amplitudes_is_not_square_rooted(clean, tmp_path):
    from backend_api.ptychodus.child import load_ptychodus_training_npz

    amp, counts = _variant(clean, 1e6, True, False)
    M, H = amp.shape[:2]
    common = dict(xcoords=np.linspace(10, 40, M), ycoords=np.linspace(40, 10, M),
                  probeGuess=np.ones((1, H, H), np.complex64))
    np.savez(tmp_path / "amp.npz", diff3d=amp, **common)
    np.savez(tmp_path / "counts.npz", diff3d=counts.astype(np.uint32), **common)
    with pytest.warns(UserWarning, match="look like amplitudes"):
        raw = load_ptychodus_training_npz(tmp_path / "amp.npz")
    np.testing.assert_array_equal(raw.diff3d, amp)
    raw = load_ptychodus_training_npz(tmp_path / "counts.npz")
    np.testing.assert_allclose(raw.diff3d, np.sqrt(counts.astype(np.float64)), rtol=1e-7)
    raw = load_ptychodus_training_npz(tmp_path / "amp.npz", diffraction_kind="intensity")
    np.testing.assert_allclose(raw.diff3d, np.sqrt(amp.astype(np.float64)), rtol=1e-7)


def test_ptychodus_setting_drives_the_reconstruct_job(clean):
    """The DiffractionKind setting: 'auto' does not square-root amplitude-valued patterns,
    'intensity' does; a bad value is refused naming the setting."""
    pytest.importorskip("ptychodus")
    import dataclasses
    from pathlib import Path

    from test_ptychodus import build_input, make_library
    from test_ptychodus_support import make_scan

    scan = make_scan(N=64, n_side=4, step=8, seed=2)
    amp_scan = dataclasses.replace(scan, patterns=np.sqrt(scan.patterns).astype(np.float32))
    lib = make_library()
    pinn = lib["PINN"]
    pinn._model_path = Path("unused.zip")  # only the job is built; no model is read
    assert lib.settings.diffraction_kind() == "auto"
    assert lib.settings.snapshot_training().diffraction_kind == "auto"
    good = ~scan.bad_pixels
    with pytest.warns(UserWarning, match="look like amplitudes"):
        job = pinn._make_reconstruct_job(build_input(amp_scan))
    np.testing.assert_allclose(job.amplitude[:, good], amp_scan.patterns[:, good], rtol=1e-6)
    lib.settings.parameter("own", "DiffractionKind").set_value("intensity")
    job = pinn._make_reconstruct_job(build_input(amp_scan))
    np.testing.assert_allclose(job.amplitude[:, good], np.sqrt(amp_scan.patterns[:, good]),
                               rtol=1e-6)
    lib.settings.parameter("own", "DiffractionKind").set_value("sqrt")
    with pytest.raises(ValueError, match="PtychoPINNJax.DiffractionKind='sqrt'"):
        lib.settings.snapshot_inference()
