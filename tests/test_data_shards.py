"""Training data sharded over the devices (pinn_jax.data_shards, loop.fit's shard_data), each
process assembling only its shard (pinn_jax.sharded_grouping), and the memory-mapped NPZ
reader the large-scan paths read through (backend_api.npz_files.map_npz_member)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend_api.npz_files import DataFileError, map_npz_member
from pinn_jax import loop
from pinn_jax.data_shards import LocalSamples, process_rows, shard_layout


@settings(max_examples=60, deadline=None)
@given(n_train=st.integers(1, 300), extra=st.integers(0, 20), D=st.integers(1, 8), per=st.integers(1, 9))
def test_layout_partitions_the_training_rows(n_train, extra, D, per):
    if n_train < D:
        with pytest.raises(ValueError, match="cannot be sharded"):
            shard_layout(n_train + extra, n_train, D, D * per)
        return
    lay = shard_layout(n_train + extra, n_train, D, D * per)
    rows = np.concatenate([lay.shard_rows(d) for d in range(D)])
    np.testing.assert_array_equal(rows, np.arange(n_train))
    assert max(lay.sizes) - min(lay.sizes) <= 1
    assert lay.n_steps * lay.per_device_batch >= lay.shard_capacity > (lay.n_steps - 1) * lay.per_device_batch
    got = process_rows(lay, range(D))
    np.testing.assert_array_equal(got, np.arange(n_train + extra))


def test_layout_refuses_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="batch_size 10: .* multiple of 4"):
        shard_layout(100, 95, 4, 10)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5), b=st.integers(1, 7), seed=st.integers(0, 99))
def test_every_shard_sample_is_drawn_once_per_epoch(sizes, b, seed):
    sizes = tuple(sizes)
    n_steps = -(-max(sizes) // b)
    rows = np.stack(loop._sharded_epoch_batches(jax.random.key(seed), sizes, n_steps, b))  # (steps, D, b)
    for d, size in enumerate(sizes):
        drawn = rows[:, d].reshape(-1)
        np.testing.assert_array_equal(np.sort(drawn[drawn >= 0]), np.arange(size))


def test_one_shard_is_the_unsharded_schedule():
    key = jax.random.key(5)
    a = np.stack(loop._sharded_epoch_batches(key, (37,), 4, 10))[:, 0]
    b = np.stack(loop._epoch_batches(key, 37, 4, 10, 10))
    np.testing.assert_array_equal(a, b)


def test_fit_on_one_device_is_the_same_sharded_or_not():
    from test_train import toy_loss, toy_problem

    data, params, rest, _ = toy_problem(n=70)
    kw = dict(nepochs=3, batch_size=10, progress=False, learning_rate=0.01, devices=jax.devices()[:1])
    plain = loop.fit(toy_loss, params, rest, data, loop.FitOptions(**kw))
    sharded = loop.fit(toy_loss, params, rest, data, loop.FitOptions(**kw, shard_data=True))
    assert plain.history["loss"] == sharded.history["loss"]
    assert plain.history["val_loss"] == sharded.history["val_loss"]
    np.testing.assert_array_equal(np.asarray(plain.params["w"]), np.asarray(sharded.params["w"]))


def test_local_samples_must_match_the_layout():
    from test_train import toy_loss, toy_problem

    data, params, rest, _ = toy_problem(n=70)
    short = LocalSamples({k: v[:50] for k, v in data.items()}, 70)
    with pytest.raises(ValueError, match="this process holds 50 rows"):
        loop.fit(toy_loss, params, rest, short, loop.FitOptions(nepochs=1, batch_size=10, progress=False))
    with pytest.raises(ValueError, match="needs shard_data"):
        loop.fit(toy_loss, params, rest, short, loop.FitOptions(nepochs=1, batch_size=10, progress=False,
                                                                shard_data=False))


FOUR_DEVICES = textwrap.dedent(
    """
    import json, sys
    import numpy as np, jax
    sys.path.insert(0, sys.argv[1])
    from test_train import toy_problem, toy_loss
    from pinn_jax import loop
    from pinn_jax.data_shards import LocalSamples, local_shard_indices, process_rows, shard_layout
    assert len(jax.devices()) == 4
    data, params, rest, _ = toy_problem(n=70)
    opts = loop.FitOptions(nepochs=3, batch_size=8, progress=False, learning_rate=0.01, shard_data=True)
    full = loop.fit(toy_loss, params, rest, data, opts)
    lay = shard_layout(70, loop.validation_split_index(70, 0.05), 4, 8)
    rows = process_rows(lay, local_shard_indices(loop.make_mesh()))
    local = loop.fit(toy_loss, params, rest, LocalSamples({k: v[rows] for k, v in data.items()}, 70), opts)
    shards = {str(a.sharding.shard_shape(a.shape)) for a in jax.tree.leaves(full.params)}
    print(json.dumps({"full": np.asarray(full.params["w"]).tolist(), "local": np.asarray(local.params["w"]).tolist(),
                      "loss": full.history["loss"], "loss_local": local.history["loss"],
                      "val": full.history["val_loss"]}))
    """
)


def test_sharded_fit_on_four_devices(tmp_path):
    """Four fake devices, the data split over them: the full dataset and this process's
    LocalSamples train identically (the same rows reach the same devices), and the loss
    falls."""
    script = tmp_path / "four.py"
    script.write_text(FOUR_DEVICES)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), os.path.dirname(__file__)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["full"] == out["local"] and out["loss"] == out["loss_local"]
    assert out["loss"][-1] < out["loss"][0]


# ---------------------------------------------------------------------------------------------
# each process groups everything, assembles its rows


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from backend_api.raw_data import RawData
    from pinn_jax import simulate

    train, _ = simulate.simulate_dataset(N=64, object_size=128, n_images=160, seed=1)
    path = tmp_path_factory.mktemp("shards") / "train.npz"
    train.to_file(path)
    return RawData.from_file(path, mmap=True)


@pytest.mark.parametrize("gridsize", [1, 2])
def test_two_emulated_processes_hold_the_single_process_grouping(scan, gridsize):
    """Shards {0, 1} and {2, 3} of 4, built separately with their energies summed as the
    cross-process reduction does: together they are the single-process container's rows (the
    same groups, coordinates bit-equal) with X scaled by the same factor (float64 sums of
    disjoint parts: equal to 1 float32 ulp)."""
    from backend_api.config import ModelConfig, TrainingConfig
    from backend_api.container import PtychoDataContainer
    from backend_api.grouping import group_energy
    from pinn_jax.sharded_grouping import local_training_container

    cfg = TrainingConfig(model=ModelConfig(N=64, gridsize=gridsize), n_groups=60, batch_size=8)
    full = PtychoDataContainer.from_raw_data(scan, cfg, seed=3)
    parts = []
    for shards, primary in (([0, 1], True), ([2, 3], False)):
        mine = {}

        def reduce(value, mine=mine):
            mine["partial"] = value
            return value

        local_training_container(scan, cfg, seed=3, n_shards=4, shards=shards, counts_validation=primary,
                                 reduce=reduce)
        parts.append(mine["partial"])
    total = sum(parts)
    assert total == pytest.approx(group_energy(scan.diff3d, full.nn_indices), rel=1e-12)
    n = len(full)
    lay = shard_layout(n, loop.validation_split_index(n, 0.05), 4, 8)
    for shards, primary in (([0, 1], True), ([2, 3], False)):
        local, n_all = local_training_container(scan, cfg, seed=3, n_shards=4, shards=shards,
                                                counts_validation=primary, reduce=lambda v: total)
        rows = process_rows(lay, shards)
        assert n_all == n and len(local) == len(rows)
        np.testing.assert_array_equal(local.nn_indices, full.nn_indices[rows])
        np.testing.assert_array_equal(local.coords_nominal, full.coords_nominal[rows])
        np.testing.assert_array_equal(local.global_offsets, full.global_offsets[rows])
        np.testing.assert_allclose(local.X, full.X[rows], rtol=2 ** -23, atol=0)
        assert local.norm_Y_I == pytest.approx(full.norm_Y_I, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# the memory-mapped NPZ reader


def test_map_npz_member(tmp_path):
    a = np.random.default_rng(0).random((40, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "s.npz", diff3d=a, f=np.asfortranarray(a), o=np.array([None], object))
    m = map_npz_member(tmp_path / "s.npz", "diff3d")
    assert isinstance(m, np.memmap) and not m.flags.writeable
    np.testing.assert_array_equal(m, a)
    np.testing.assert_array_equal(map_npz_member(tmp_path / "s.npz", "f"), a)
    assert map_npz_member(tmp_path / "s.npz", "missing") is None
    assert map_npz_member(tmp_path / "s.npz", "o") is None  # object arrays are not mapped
    np.savez_compressed(tmp_path / "c.npz", diff3d=a)
    assert map_npz_member(tmp_path / "c.npz", "diff3d") is None  # compressed: loaded instead


def test_map_npz_member_names_a_truncated_member(tmp_path):
    a = np.zeros((400, 16, 16), np.float32)
    np.savez(tmp_path / "s.npz", diff3d=a)
    with zipfile.ZipFile(tmp_path / "s.npz") as zf:
        info = zf.getinfo("diff3d.npy")
    raw = (tmp_path / "s.npz").read_bytes()
    # overwrite the .npy header's shape so it claims more rows than the member holds
    head = raw.find(b"(400, 16, 16)")
    bad = raw[:head] + b"(900, 16, 16)" + raw[head + len(b"(400, 16, 16)"):]
    (tmp_path / "bad.npz").write_bytes(bad)
    with pytest.raises(DataFileError, match="'diff3d' .* does not fit in its zip member"):
        map_npz_member(tmp_path / "bad.npz", "diff3d")
    assert info.compress_type == zipfile.ZIP_STORED


def test_raw_data_mmap_reads_the_same_data(scan):
    from backend_api.raw_data import RawData

    assert not scan.diff3d.flags.owndata and not scan.diff3d.flags.writeable  # a view of the file map
    loaded = RawData.from_file(scan.diff3d.base.filename)
    np.testing.assert_array_equal(np.asarray(scan.diff3d), loaded.diff3d)
