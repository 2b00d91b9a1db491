"""Multi-process runs (pinn_jax.distributed): 2 processes on 127.0.0.1, 2 fake CPU devices each.

- the options and the cluster detection (unit);
- ``pinn-jax train`` in 2 processes equals the single-process 4-device run: same mesh size, the
  same jitted step, the batch sharded over all 4 devices; only process 0 prints and writes;
- ``pinn-jax infer`` with the groups shared out among the processes equals one process;
- a killed process makes the other fail with JAX's message within the heartbeat timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pinn_jax import distributed


def test_options_are_checked_and_nothing_happens_alone():
    assert not distributed.DistributedOptions().explicit
    assert distributed.initialize(distributed.DistributedOptions(), env={}) is False
    assert distributed.process_count() == 1 and distributed.is_primary()
    with pytest.raises(ValueError, match="missing --num_processes, --process_id"):
        distributed.DistributedOptions(coordinator_address="127.0.0.1:1234").check()
    with pytest.raises(ValueError, match="--coordinator_address: expected host:port"):
        distributed.DistributedOptions("localhost", 2, 0).check()
    with pytest.raises(ValueError, match="--process_id: expected 0 <= process_id < 2"):
        distributed.DistributedOptions("127.0.0.1:1234", 2, 2).check()
    # one process asked for explicitly: still a plain single-process run
    assert distributed.initialize(distributed.DistributedOptions("127.0.0.1:1234", 1, 0)) is False


def test_cluster_environment_detection():
    assert distributed.cluster_environment({}) is None
    assert distributed.cluster_environment({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert distributed.cluster_environment({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}) == "slurm"
    assert distributed.cluster_environment({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}) == "openmpi"
    assert distributed.cluster_environment({"SLURM_NTASKS": "x", "SLURM_PROCID": "0"}) is None


def test_bad_flags_are_refused_before_work(tmp_path, capsys):
    from pinn_jax.cli import main

    rc = main(["reconstruct", "--test_data", __file__, "--output_dir", str(tmp_path / "out"),
               "--coordinator_address", "127.0.0.1:1", "--num_processes", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--process_id" in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PINN_JAX_COMPILE_CACHE="0")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "pinn_jax.cli", *map(str, args)]


_GLOO_NOTICE = "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"


def _ours(stdout: str) -> str:
    """The words of stdout that gloo's connection notices do not account for, i.e. what pinn-jax
    printed. Gloo's C++ threads write those notices to the same stdout piecewise, and two notices
    can interleave mid-line, even mid-word ("[Gloo] Rank [Gloo] Rank 1 is ...\n1 is connected ...",
    or ": 1" and ": 1" run together into ": 11"), so a word is gloo's when it is made of
    pieces of the notice's words run together (a run of digits stands for any rank or count),
    not line by line."""
    pieces = sorted({re.escape(w) for w in _GLOO_NOTICE.split()}, key=len, reverse=True)
    gloo_word = re.compile("(?:" + "|".join(re.sub(r"\\?\d", r"\\d+", p) for p in pieces) + ")+")
    return " ".join(w for w in stdout.split() if not gloo_word.fullmatch(w))


def test_interleaved_gloo_notices_are_not_taken_for_our_output():
    interleaved = ("[Gloo] Rank [Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer "
                   "ranks is : 1\n1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n")
    assert _ours(interleaved) == ""
    # the two notices' last digits run together, or a rank glued to the next notice's start
    assert _ours("ranks is : 11\n1[Gloo] Rank 0 is connected\n") == ""
    assert _ours(interleaved + "wrote out/wts.h5.zip\n") == "wrote out/wts.h5.zip"
    assert _ours(interleaved + "refined the object\n") == "refined the object"


def _run_processes(args, n: int = 2, timeout: float = 420, heartbeat: int = 30):
    port = _free_port()
    procs = [subprocess.Popen(_cli(*args, "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", n,
                                   "--process_id", i, "--heartbeat_timeout", heartbeat),
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pinn_jax import simulate

    d = tmp_path_factory.mktemp("mp_data")
    train, test = simulate.simulate_dataset(N=64, object_size=128, n_images=128, seed=0)
    train.to_file(d / "train.npz")
    test.to_file(d / "test.npz")
    return d


TRAIN_ARGS = ("--nepochs", 2, "--batch_size", 8, "--n_groups", 32, "--n_filters_scale", 1, "--no_progress",
              "--seed", 1)


@pytest.fixture(scope="module")
def two_runs(data, tmp_path_factory):
    """The same training in 2 processes x 2 devices and in 1 process x 4 devices."""
    root = tmp_path_factory.mktemp("mp_runs")
    base = ("train", "--train_data_file", data / "train.npz", "--test_data_file", data / "test.npz", *TRAIN_ARGS)
    multi = _run_processes((*base, "--output_dir", root / "multi"))
    # the multi-process run shards the groups over the 4 devices (the default there); one process
    # with 4 devices and --shard_data true follows the same schedule
    single = subprocess.run(_cli(*base, "--shard_data", "true", "--output_dir", root / "single"), env=_env(4),
                            capture_output=True, text=True, timeout=420)
    return {"root": root, "multi": multi, "single": single}


@pytest.mark.slow
def test_two_process_training_equals_the_single_process_four_device_run(two_runs):
    """Same global batch over the same 4 devices: the epoch losses agree to float32 reduction
    order (the cross-process all-reduce sums in another order: rtol 1e-5); the weights to
    Adam's conditioning: an element whose gradient is ~0 moves by up to the learning rate
    (1e-3) per step either way, so over the 8 steps they agree within 2 * 8 * 1e-3."""
    from flax import nnx
    import jax

    from pinn_jax.inference import load_inference_bundle

    single, multi = two_runs["single"], two_runs["multi"]
    assert single.returncode == 0, single.stderr[-2000:]
    for rc, out, err in multi:
        assert rc == 0, err[-3000:]
    root = two_runs["root"]
    h1 = json.loads((root / "single" / "history.json").read_text())
    h2 = json.loads((root / "multi" / "history.json").read_text())
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-5)
    np.testing.assert_allclose(h2["val_loss"], h1["val_loss"], rtol=1e-5)
    m1, _ = load_inference_bundle(root / "single")
    m2, _ = load_inference_bundle(root / "multi")
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(m1.model))),
                    jax.tree.leaves(nnx.to_pure_dict(nnx.state(m2.model)))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=16e-3)
    # process 0 speaks for the run; process 1 prints nothing
    assert "trained 2 epochs" in multi[0][1] and _ours(multi[1][1]) == ""


@pytest.mark.slow
def test_two_process_inference_equals_one_process(two_runs, data, tmp_path):
    """infer with the groups shared out among 2 processes (each predicts its half, all gather
    the patches): the same object as one process (the network is the same per row: float32
    round-off only), written once, by process 0."""
    model = two_runs["root"] / "single"
    args = ("infer", "--model_path", model, "--test_data", data / "test.npz")
    one = subprocess.run(_cli(*args, "--output_dir", tmp_path / "one"), env=_env(2), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    outs = _run_processes((*args, "--output_dir", tmp_path / "two"))
    for rc, out, err in outs:
        assert rc == 0, err[-3000:]
    with np.load(tmp_path / "one" / "reconstruction.npz") as a, np.load(tmp_path / "two" / "reconstruction.npz") as b:
        ref = a["object_on_grid"]
        np.testing.assert_allclose(b["object_on_grid"], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert "reconstructed" in outs[0][1] and _ours(outs[1][1]) == ""
    # --stream: the chunks (of 20 patterns) dealt out round-robin, the grid sums added across
    # processes: the same object again
    outs = _run_processes((*args, "--stream", "--chunk", 20, "--output_dir", tmp_path / "streamed"))
    for rc, out, err in outs:
        assert rc == 0, err[-3000:]
    with np.load(tmp_path / "streamed" / "reconstruction.npz") as b:
        np.testing.assert_allclose(b["object_on_grid"], ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.slow
def test_a_killed_process_fails_the_other_within_the_heartbeat_timeout(data, tmp_path):
    """Kill process 1 once the run has begun: process 0 must exit non-zero with JAX's distributed
    error (a dead task), within the 10 s heartbeat timeout plus slack, never hang."""
    port = _free_port()
    base = ("train", "--train_data_file", data / "train.npz", "--nepochs", 200, "--batch_size", 8, "--n_groups",
            32, "--n_filters_scale", 1, "--no_progress", "--output_dir", tmp_path / "out",
            "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", 2, "--heartbeat_timeout", 10)
    procs = [subprocess.Popen(_cli(*base, "--process_id", i), env=_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        # wait until both processes have joined and the run has begun (train creates its
        # output folder after jax.distributed is up, before it compiles)
        while not (tmp_path / "out").exists():
            assert time.monotonic() < deadline, "the run did not start"
            assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - t_kill
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    assert "distributed" in err.lower() or "coordination" in err.lower(), err[-2000:]
    assert waited < 90, waited


def test_model_archive_state_is_written_by_one_process_alone(tmp_path):
    """save_state/restore_state (the model archive's arrays) involve this process only: a
    single-process call works as before (the multi-process case is the training test above)."""
    import jax.numpy as jnp

    from pinn_jax.checkpoint import restore_state, save_state

    tree = {"a": jnp.arange(4.0), "b": {"c": jnp.ones((2, 2))}}
    path = save_state(tmp_path / "s", tree)
    back = restore_state(path, tree)
    np.testing.assert_array_equal(np.asarray(back["b"]["c"]), np.ones((2, 2)))
    assert Path(path).is_dir()


@pytest.mark.slow
def test_two_process_refinement_equals_one_process(data, tmp_path):
    """reconstruct (flat start, 2 minibatch passes, then 1 full-batch pass): every minibatch and
    every chunk of the full-batch gradient split over the 4 devices of 2 processes, the object
    replicated, gradients summed across processes; the same object as one process on one
    device (the same arithmetic, summed in another order: float32 round-off over 3 passes of
    16-position steps, 1e-4 of the peak), written once, by process 0."""
    args = ("reconstruct", "--test_data", data / "test.npz", "--iterations", 3, "--batch_size", 16,
            "--full_batch_from", 2)
    one = subprocess.run(_cli(*args, "--output_dir", tmp_path / "one"), env=_env(1), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    outs = _run_processes((*args, "--output_dir", tmp_path / "two"))
    for rc, out, err in outs:
        assert rc == 0, err[-3000:]
    with np.load(tmp_path / "one" / "reconstruction.npz") as a, np.load(tmp_path / "two" / "reconstruction.npz") as b:
        ref = a["object_on_grid"]
        np.testing.assert_allclose(b["object_on_grid"], ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert "refined" in outs[0][1] and _ours(outs[1][1]) == ""


@pytest.mark.slow
def test_two_process_training_resumes_from_its_checkpoint(two_runs, data, tmp_path):
    """Train 1 epoch in 2 processes, then `--resume` to 2 epochs in 2 processes: every process
    restores the Orbax checkpoint process 0 wrote, and the run equals the uninterrupted 2-epoch
    2-process run (the same programs on the same data: losses rtol 1e-5, weights as in the
    training test: Adam's per-element conditioning, within 2 * 8 * 1e-3)."""
    from flax import nnx
    import jax

    from pinn_jax.inference import load_inference_bundle

    def command(epochs):
        args = [epochs if k and TRAIN_ARGS[k - 1] == "--nepochs" else a for k, a in enumerate(TRAIN_ARGS)]
        return ("train", "--train_data_file", data / "train.npz", "--test_data_file", data / "test.npz", *args,
                "--output_dir", tmp_path / "resumed")

    first = _run_processes(command(1))
    for rc, out, err in first:
        assert rc == 0, err[-3000:]
    assert (tmp_path / "resumed" / "checkpoints" / "1").is_dir()
    second = _run_processes((*command(2), "--resume"))
    for rc, out, err in second:
        assert rc == 0, err[-3000:]
    h_resumed = json.loads((tmp_path / "resumed" / "history.json").read_text())
    h_whole = json.loads((two_runs["root"] / "multi" / "history.json").read_text())
    assert len(h_resumed["loss"]) == len(h_whole["loss"]) == 2
    np.testing.assert_allclose(h_resumed["loss"], h_whole["loss"], rtol=1e-5)
    m1, _ = load_inference_bundle(two_runs["root"] / "multi")
    m2, _ = load_inference_bundle(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(m1.model))),
                    jax.tree.leaves(nnx.to_pure_dict(nnx.state(m2.model)))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=16e-3)
