"""The ``pinn-jax`` command: demo, simulate, train, infer, convert, ptychodus.

``pinn-jax <command> --help`` lists every option. Bad flags and bad paths give a one-line
error and exit code 2; a diverged training exits 1; Ctrl-C exits 130 (``train --resume``
continues from the last epoch checkpoint). Every path and flag is checked (``_VALIDATORS``)
before any data are read or any folder is created, and a data file that cannot be read (empty,
truncated, not an NPZ) is reported on one line naming the flag and the file. Heavy modules
(jax, flax) are imported only once the arguments are valid, so ``--help`` and argument errors
are fast. ``--max_canvas_pixels`` (train, infer; default ``$PINN_JAX_MAX_CANVAS_PIXELS`` or
2**28) bounds the stitching canvas, checked before training or before the network runs.

``train`` takes the reference training script's flags: every ``TrainingConfig`` and
``ModelConfig`` field as ``--<field_name>`` (booleans as ``--flag true|false``; the reference's
``type=bool`` turned "False" into True), plus ``--resume``, ``--seed``, ``--do_stitching``.
Compiled XLA programs are cached across runs in ``~/.cache/pinn_jax/xla`` (or
``JAX_COMPILATION_CACHE_DIR``; ``PINN_JAX_COMPILE_CACHE=0`` turns the cache off).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from backend_api.canvas import STITCH_CROP
from pinn_jax.cli_parser import PROG, build_parser
from pinn_jax.cli_parser import collect as _collect

__all__ = ["main", "build_parser", "CLIError"]

log = logging.getLogger("pinn_jax.cli")


class CLIError(Exception):
    """A user error detected by the CLI: printed as one line, exit code 2."""


def _setup_logging(args) -> None:
    level = logging.INFO
    if getattr(args, "quiet", False):
        level = logging.WARNING
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


# ---------------------------------------------------------------------------------------------
# helpers shared by the commands
# ---------------------------------------------------------------------------------------------


def _read_errors() -> tuple:
    """What reading a damaged or foreign data file can raise: numpy's loader, zipfile, zlib and
    pickle let their own exceptions through (EOFError for an empty file, BadZipFile for a
    truncated one, TypeError for a .npy under an .npz name, zlib.error for a corrupt member)."""
    import pickle
    import zipfile
    import zlib

    return (ValueError, OSError, EOFError, KeyError, IndexError, TypeError, MemoryError,
            zipfile.BadZipFile, zlib.error, pickle.UnpicklingError)


def _one_line(exc: BaseException) -> str:
    """The exception as one line; the type is named unless it is a plain message (ValueError)."""
    text = " ".join(str(exc).split()) or "(no message)"
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def _load_raw(path: Path, what: str, diffraction_kind: str = "auto"):
    from backend_api.raw_data import RawData

    try:
        # mapped, not loaded: a large scan costs memory only where it is used
        return RawData.from_file(path, diffraction_kind=diffraction_kind, mmap=True)
    except FileNotFoundError as exc:
        raise CLIError(f"{what}: file not found: {path}") from exc
    except _read_errors() as exc:
        raise CLIError(f"{what}: cannot read {path}: {_one_line(exc)}") from exc


# ---------------------------------------------------------------------------------------------
# up-front checks: _run calls _VALIDATORS[command] before the command reads or writes anything
# ---------------------------------------------------------------------------------------------


def _check_output_dir(path, flag: str) -> None:
    """``path`` is a writable directory or can be created as one; nothing is created here."""
    p = Path(path)
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise CLIError(f"{flag}: directory {p} is not writable")
        return
    if p.is_symlink() and not p.exists():
        raise CLIError(f"{flag}: {p} is a broken symbolic link, not a directory")
    if p.exists():
        kind = "a regular file" if p.is_file() else "not a directory"
        raise CLIError(f"{flag}: {p} exists and is {kind}; give a directory")
    ancestor = p.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CLIError(f"{flag}: cannot create directory {p}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CLIError(f"{flag}: cannot create directory {p}: {ancestor} is not writable")


def _check_data_file(path, flag: str) -> None:
    """``path`` is a readable NPZ (zip) file, by :func:`backend_api.raw_data.check_npz_file`
    (magic bytes and the zip directory only); the content is checked when it is loaded
    (:func:`_load_raw`)."""
    from backend_api.raw_data import DataFileError, check_npz_file

    p = Path(path)
    try:
        check_npz_file(p)
    except FileNotFoundError as exc:
        raise CLIError(f"{flag}: file not found: {p}") from exc
    except DataFileError as exc:
        raise CLIError(f"{flag}: cannot read {exc}") from exc


def _check_model_archive_name(path: Path, flag: str) -> None:
    """infer loads ``<dir>/wts.h5.zip``: a .zip file of another name would load its neighbour."""
    if path.is_file() and path.name != "wts.h5.zip":
        raise CLIError(f"{flag}: give the model directory or its wts.h5.zip, got the file {path} "
                       f"(a model archive must be named wts.h5.zip: rename it to wts.h5.zip or "
                       f"give its folder)")


def _validate_demo(args) -> None:
    _check_output_dir(args.output_dir, "--output-dir")
    C = args.gridsize**2
    n_train = round(args.n_images * 0.5)
    if min(n_train, args.n_images - n_train) < C:
        raise CLIError(f"--gridsize {args.gridsize} needs at least {C} positions in each half of the "
                       f"data; --n-images {args.n_images} gives {min(n_train, args.n_images - n_train)}")


def _validate_simulate(args) -> None:
    _check_output_dir(args.output_dir, "--output-dir")
    if not 0.0 < args.train_fraction < 1.0:
        raise CLIError(f"--train-fraction must be in (0, 1), got {args.train_fraction}")


def _validate_train(args) -> None:
    if args.cfg_train_data_file is None:
        raise CLIError("--train_data_file is required")
    cfg = _training_config(args)  # every numeric/choice flag, before the files are looked at
    out = Path(cfg.output_dir)
    _check_output_dir(out, "--output_dir")
    ckpt_dir = args.checkpoint_dir or out / "checkpoints"
    _check_output_dir(ckpt_dir, "--checkpoint_dir" if args.checkpoint_dir else "--output_dir (its checkpoints folder)")
    if args.resume and not ckpt_dir.is_dir():
        raise CLIError(f"--resume: no checkpoint folder {ckpt_dir} (train once without --resume first)")
    _check_data_file(args.cfg_train_data_file, "--train_data_file")
    if args.cfg_test_data_file is not None:
        _check_data_file(args.cfg_test_data_file, "--test_data_file")
    elif args.do_stitching:
        raise CLIError("--do_stitching reconstructs the test data: also give --test_data_file")


def _validate_infer(args) -> None:
    _check_model_archive_name(args.model_path, "--model_path")
    _check_data_file(args.test_data, "--test_data")
    _check_output_dir(args.output_dir, "--output_dir")
    if args.M % 2:
        raise CLIError(f"--M must be even (the crop is centred on patch pixel N/2), got {args.M}")
    if args.phase_vmin is not None and args.phase_vmax is not None and args.phase_vmin >= args.phase_vmax:
        raise CLIError(f"--phase_vmin {args.phase_vmin:g} must be below --phase_vmax {args.phase_vmax:g}")


def _validate_reconstruct(args) -> None:
    if args.model_path is not None:
        _check_model_archive_name(args.model_path, "--model_path")
    _check_data_file(args.test_data, "--test_data")
    _check_output_dir(args.output_dir, "--output_dir")


def _validate_convert(args) -> None:
    if args.output.suffix == ".zip":
        raise CLIError(f"output: give a folder (wts.h5.zip is written inside it), got {args.output}")
    _check_output_dir(args.output, "output")


_VALIDATORS = {
    "demo": _validate_demo,
    "simulate": _validate_simulate,
    "train": _validate_train,
    "infer": _validate_infer,
    "reconstruct": _validate_reconstruct,
    "convert": _validate_convert,
}


def _check_canvas(xcoords, ycoords, M: int, max_canvas_pixels, flag: str) -> None:
    """Refuse, before any work, positions whose stitching canvas would exceed the bound."""
    import numpy as np

    from pinn_jax import geometry

    pos = np.column_stack([np.ravel(xcoords), np.ravel(ycoords)]).astype(np.float64)
    try:
        geometry.check_position_canvas(pos, M, max_canvas_pixels=max_canvas_pixels)
    except ValueError as exc:
        raise CLIError(f"{flag}: {_one_line(exc)}") from exc


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def cmd_simulate(args) -> int:
    from pinn_jax import simulate

    # simulate_to_npz creates the folder when it writes, so a rejected setting leaves nothing
    t0 = time.perf_counter()
    try:
        train_p, test_p = simulate.simulate_to_npz(
            args.output_dir, N=args.N, object_size=args.object_size, n_images=args.n_images,
            train_fraction=args.train_fraction, kind=args.kind, scan=args.scan, split=args.split,
            nphotons=args.nphotons, probe_scale=args.probe_scale, seed=args.seed,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    print(f"wrote {train_p} and {test_p} ({args.n_images} positions, N={args.N}) in "
          f"{time.perf_counter() - t0:.1f} s")
    if not getattr(args, "no_ptychodus_files", False):
        written = write_ptychodus_files(test_p, Path(args.output_dir), name="pinn-jax simulate")
        print(f"wrote the test scan for ptychodus: {', '.join(p.name for p in written.values())} "
              f"in {args.output_dir}")
    return 0


def write_ptychodus_files(npz_path: Path, out_dir: Path, *, name: str) -> dict:
    """The scan in ``npz_path`` (the NPZ contract, amplitudes) as ptychodus files in ``out_dir``
    (:func:`backend_api.ptychodus.files.write_ptychodus_scan`)."""
    import numpy as np

    from backend_api.ptychodus.files import write_ptychodus_scan

    with np.load(npz_path, allow_pickle=False) as z:
        data = {k: z[k] for k in ("xcoords", "ycoords", "diff3d", "probeGuess", "objectGuess")
                if k in z.files}
    return write_ptychodus_scan(out_dir, data, name=name, diffraction_kind="amplitude",
                                ground_truth="objectGuess" in data)


def _training_config(args):
    from backend_api.config import ModelConfig, TrainingConfig

    mkw = _collect(args, args._mnames)
    tkw = _collect(args, args._tnames)
    try:
        model = ModelConfig(**mkw)
        cfg = TrainingConfig(model=model, backend="jax", **tkw)
        cfg.validate()
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from exc
    return cfg


def cmd_train(args) -> int:
    import numpy as np

    cfg = _training_config(args)
    out = Path(cfg.output_dir)
    ckpt_dir = args.checkpoint_dir or out / "checkpoints"

    kind = cfg.diffraction_kind
    train_raw = _load_raw(Path(cfg.train_data_file), "--train_data_file", kind)
    test_raw = _load_raw(Path(cfg.test_data_file), "--test_data_file", kind) if cfg.test_data_file else None
    n_px = int(np.shape(train_raw.diff3d)[-1])
    if n_px != cfg.model.N:
        raise CLIError(
            f"--train_data_file has {n_px}x{n_px} patterns but --N is {cfg.model.N}; pass --N {n_px}"
        )
    if cfg.n_subsample:
        train_raw = train_raw.subsample(int(cfg.n_subsample), cfg.subsample_seed)
    meta = getattr(train_raw, "metadata", None) or {}
    if "nphotons" in meta and args.cfg_nphotons is None:
        # As the reference script: the data's photon count wins over the default.
        cfg.nphotons = float(meta["nphotons"])
    gs = cfg.model.gridsize
    if gs > 1 and cfg.n_groups > len(train_raw.xcoords) and not cfg.enable_oversampling:
        raise CLIError(
            f"--n_groups {cfg.n_groups} exceeds the {len(train_raw.xcoords)} positions of the training "
            "data at gridsize > 1; lower --n_groups or pass --enable_oversampling true --neighbor_pool_size K"
        )
    if args.do_stitching and test_raw is not None:
        # Before training, from the positions: exact at gridsize 1; at gridsize > 1 the group
        # centres (means of neighbouring positions) span slightly less, and the stitch re-checks.
        _check_canvas(test_raw.xcoords, test_raw.ycoords, STITCH_CROP, args.max_canvas_pixels, "--test_data_file")

    from pinn_jax import pipeline
    from pinn_jax.train import TrainingDivergedError

    out.mkdir(parents=True, exist_ok=True)
    _sigterm_as_interrupt()
    t0 = time.perf_counter()
    try:
        primary = _primary()
        results, archive = pipeline.train(
            train_raw, test_raw if args.do_stitching else None, cfg, seed=args.seed, checkpoint_dir=ckpt_dir,
            resume=args.resume, progress=primary and not (args.no_progress or args.quiet),
            history_path=out / "history.json" if primary else None, save_to=out if primary else None,
            shard_data=args.shard_data)
    except TrainingDivergedError as exc:
        print(f"{PROG} train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG} train: interrupted; continue with the same command plus --resume "
              f"(checkpoints in {ckpt_dir})", file=sys.stderr)
        return 130
    t_train = time.perf_counter() - t0
    h = results["history"]
    msg = f"trained {len(h.get('loss', []))} epochs in {t_train:.1f} s; final loss {h['loss'][-1]:.6g}"
    if h.get("val_loss"):
        msg += f", val_loss {h['val_loss'][-1]:.6g}"
    print(msg)
    print(f"wrote {archive}")
    if args.do_stitching and test_raw is not None and "reconstructed_obj" in results and primary:
        pngs = pipeline.write_test_stitch(results, out, M=STITCH_CROP, max_canvas_pixels=args.max_canvas_pixels)
        print(f"wrote {pngs[0]} and {pngs[1]}")
    return 0


def _sigterm_as_interrupt() -> None:
    """Treat SIGTERM (batch schedulers, `kill`) like Ctrl-C: stop cleanly, keep checkpoints."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def cmd_infer(args) -> int:
    import numpy as np

    raw = _load_raw(args.test_data, "--test_data", args.diffraction_kind)
    if args.n_subsample:
        raw = raw.subsample(args.n_subsample, args.subsample_seed)
    from backend_api.grouping import GroupingOptions
    from pinn_jax import pipeline, report

    model, cfg = _load_model(args.model_path)
    N = model.N
    n_px = int(np.shape(raw.diff3d)[-1])
    if n_px != N:
        raise CLIError(f"--test_data has {n_px}x{n_px} patterns but the model was trained on {N}x{N}")
    if args.M > N:
        raise CLIError(f"--M {args.M} exceeds the model's {N}x{N} patches")
    # infer never makes more groups than the default (every position about once)
    grouping = GroupingOptions(n_groups=args.n_groups, neighbor_count=args.neighbor_count)
    grouping = dataclasses.replace(grouping, n_groups=grouping.resolve_n_groups(len(raw.xcoords), model.gridsize))
    refine = args.refine_iterations > 0
    options = _refine_options(args, args.refine_iterations) if refine else None
    if args.stream and model.gridsize != 1:
        raise CLIError(f"--stream is for gridsize-1 models; this model has gridsize {model.gridsize}")
    if args.stream and (args.n_groups is not None or args.n_subsample):
        raise CLIError("--stream reconstructs every position once, in file order: drop --n_groups/--n_subsample")
    try:
        obj_shape = pipeline.object_grid(raw) if refine or args.stream else (
            None if raw.objectGuess is None else tuple(np.shape(raw.objectGuess)))
        t0 = time.perf_counter()
        if args.stream:
            amp, phase, res = pipeline.reconstruct_streaming(model, raw, M=args.M, chunk=args.chunk,
                                                             object_shape=obj_shape)
        else:
            amp, phase, res = pipeline.reconstruct(model, raw, grouping=grouping, M=args.M, object_shape=obj_shape,
                                                   seed=args.seed, nphotons=cfg.get("nphotons", 1e9),
                                                   max_canvas_pixels=args.max_canvas_pixels)
    except ValueError as exc:
        raise CLIError(f"--test_data: {exc}") from exc
    elapsed = time.perf_counter() - t0
    out = args.output_dir
    what = "positions (streamed)" if args.stream else "groups"
    print(f"reconstructed {len(res['global_offsets'])} {what} in {elapsed:.2f} s -> object {amp.shape}")
    if refine:
        try:
            t0 = time.perf_counter()
            _, result = pipeline.refine(raw, initial=pipeline.network_start(res), options=options,
                                        object_shape=obj_shape, progress=_primary() and not args.quiet)
        except ValueError as exc:
            raise CLIError(f"--test_data: {exc}") from exc
        if not _primary():
            return 0  # process 0 writes
        written = pipeline.write_refinement(out, result, network=res, phase_vmin=args.phase_vmin,
                                            phase_vmax=args.phase_vmax)
        _report_refinement(out, result, "the network's object", time.perf_counter() - t0, written)
        return 0
    if not _primary():
        return 0  # process 0 writes
    written = pipeline.write_reconstruction(out, amp, phase, res, phase_vmin=args.phase_vmin,
                                            phase_vmax=args.phase_vmax)
    if obj_shape is not None and report.has_signal(raw.objectGuess):
        summary = pipeline.evaluate(res, raw.objectGuess, M=args.M)
        report.write_json(summary, out / "metrics.json")
        print(report.format_metrics(summary))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _load_model(model_path: Path):
    """``(InferenceModel, cfg)`` from ``--model_path`` (a folder or its wts.h5.zip)."""
    from backend_api.archive import ArchiveBackendError, ArchiveError
    from pinn_jax.inference import load_inference_bundle

    model_dir = model_path.parent if model_path.is_file() else model_path
    try:
        if model_path.is_file():
            _check_model_file(model_path)
        return load_inference_bundle(model_dir)
    except ArchiveBackendError as exc:
        raise CLIError(str(exc)) from exc
    except ArchiveError as exc:
        raise CLIError(f"--model_path: {exc}") from exc


def _refine_options(args, iterations: int, **overrides):
    from pinn_jax.refine import RefineOptions

    kw = dict(iterations=iterations, noise=args.noise, refine_probe=args.refine_probe,
              probe_learning_rate=args.probe_learning_rate, refine_positions=args.refine_positions,
              gauge=args.gauge, tv_weight=args.tv_weight, final_learning_rate=args.final_learning_rate,
              full_batch_from=args.full_batch_from, full_batch_momentum=args.full_batch_momentum)
    kw.update(overrides)
    try:
        return RefineOptions(**kw)
    except ValueError as exc:
        raise CLIError(str(exc).replace("RefineOptions.", "--")) from exc


def _report_refinement(out, result, start: str, elapsed: float, written) -> None:
    from pinn_jax import report

    print(f"refined {len(result.positions)} positions from {start}, {len(result.history) - 1} passes in "
          f"{elapsed:.1f} s (misfit {result.history[0]:.4g} -> {result.history[-1]:.4g})")
    if result.pass_metrics:
        print(f"start:   {report.format_metrics(result.pass_metrics[0])}")
        print(f"refined: {report.format_metrics(result.pass_metrics[-1])}")
    print(f"wrote {', '.join(Path(p).name for p in written)} to {out}")


def cmd_reconstruct(args) -> int:
    from pinn_jax import pipeline

    raw = _load_raw(args.test_data, "--test_data", args.diffraction_kind)
    options = _refine_options(args, args.iterations, batch_size=args.batch_size, optimizer=args.optimizer,
                              learning_rate=args.learning_rate, seed=args.seed)
    model, nphotons = None, 1e9
    if args.model_path is not None:
        model, cfg = _load_model(args.model_path)
        nphotons = cfg.get("nphotons", 1e9)
        n_px = int(raw.diff3d.shape[-1])
        if n_px != model.N:
            raise CLIError(f"--test_data has {n_px}x{n_px} patterns but the model was trained on {model.N}x{model.N}")
    try:
        shape = pipeline.object_grid(raw)
        t0 = time.perf_counter()
        _, result = pipeline.refine(raw, model=model, options=options, seed=args.seed, nphotons=nphotons,
                                    object_shape=shape, progress=_primary() and not (args.no_progress or args.quiet))
    except ValueError as exc:
        raise CLIError(f"--test_data: {exc}") from exc
    elapsed = time.perf_counter() - t0
    if not _primary():
        return 0  # process 0 writes
    written = pipeline.write_refinement(args.output_dir, result)
    start = "the network's object" if model is not None else "a flat object"
    _report_refinement(args.output_dir, result, start, elapsed, written)
    return 0


def _check_model_file(path: Path) -> None:
    """``--model_path`` given as a file: it must itself be the model archive (a text, HDF5,
    empty or truncated file is named as such), never stand for a sibling wts.h5.zip."""
    from backend_api.archive import ARCHIVE_NAME, read_manifest

    read_manifest(path)
    if path.name != ARCHIVE_NAME:
        raise CLIError(f"--model_path: {path} is a model archive, but infer loads {ARCHIVE_NAME}; "
                       f"rename it to {ARCHIVE_NAME} or pass the folder holding {ARCHIVE_NAME}")


def cmd_convert(args) -> int:
    from backend_api import archive
    from pinn_jax.checkpoint import save_model
    from pinn_jax.interop import load_tf_archive

    src = args.input
    try:
        manifest = archive.read_manifest(src)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(f"{src}: {exc}") from exc
    if manifest.get("backend") != "tensorflow":
        raise CLIError(f"{src} was written by the {manifest.get('backend')!r} backend; convert reads TensorFlow archives")
    try:
        model, params = load_tf_archive(src)
    except ValueError as exc:
        raise CLIError(f"{src}: {exc}") from exc
    dest = args.output
    path = save_model(model, dest, None, params=params)
    print(f"converted {src} -> {path} (N={model.spec.N}, gridsize={model.spec.gridsize}, "
          f"intensity_scale={float(model.intensity_scale):.6g})")
    return 0


def cmd_ptychodus(args) -> int:
    try:
        from backend_api.ptychodus.launcher import main as launcher_main
    except ImportError as exc:
        raise CLIError(f"the ptychodus integration is unavailable: {exc}") from exc
    rest = list(args.ptychodus_args or [])
    if rest and rest[0] == "--":
        rest = rest[1:]
    return int(launcher_main(rest) or 0)


def cmd_demo(args) -> int:
    from pinn_jax.demo import run_demo

    try:
        run_demo(args.output_dir, N=args.N, gridsize=args.gridsize, n_filters_scale=args.n_filters_scale,
                 epochs=args.epochs, batch_size=args.batch_size, n_images=args.n_images,
                 object_size=args.object_size, kind=args.kind, nphotons=args.nphotons, seed=args.seed,
                 refine_iterations=args.refine_iterations, progress=not args.quiet)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    return 0


_COMMANDS = {
    "demo": cmd_demo,
    "simulate": cmd_simulate,
    "train": cmd_train,
    "infer": cmd_infer,
    "reconstruct": cmd_reconstruct,
    "convert": cmd_convert,
    "ptychodus": cmd_ptychodus,
}


def _restart_with_huge_pages() -> None:
    """Re-execute this command with glibc's huge-page tunable in its environment (read only when
    a process starts; :func:`pinn_jax.runtime.configure_malloc` says why), before jax loads.
    Returns without doing anything where the tunable is already set, opted out or not Linux."""
    from pinn_jax.runtime import configure_malloc

    if sys.executable and configure_malloc():
        os.execv(sys.executable, [sys.executable, "-m", "pinn_jax", *sys.argv[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pinn-jax``; returns the exit status (also used by ``python -m pinn_jax``).
    Called with no ``argv`` (the command line itself) it may first re-execute the process, once,
    with glibc's huge-page tunable set (:func:`_restart_with_huge_pages`)."""
    if argv is None:
        _restart_with_huge_pages()
    argv = list(sys.argv[1:] if argv is None else argv)
    # ptychodus takes its own flags: hand everything after the command over untouched.
    if argv and argv[0] == "ptychodus" and not (len(argv) == 2 and argv[1] in ("-h", "--help")):
        ns = argparse.Namespace(command="ptychodus", ptychodus_args=argv[1:], quiet=False, verbose=False)
        return _run(ns)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        return int(exc.code or 0)
    if not args.command:
        parser.print_help()
        return 2
    return _run(args)


def _dispatch(args) -> int:
    validate = _VALIDATORS.get(args.command)
    if validate is not None:
        validate(args)
    return _COMMANDS[args.command](args)


def _start_distributed(args) -> bool:
    """``jax.distributed`` from the command's flags or a SLURM/Open MPI launch; True for a
    multi-process run (see :mod:`pinn_jax.distributed`)."""
    from pinn_jax import distributed

    options = distributed.DistributedOptions(
        coordinator_address=args.coordinator_address, num_processes=args.num_processes,
        process_id=args.process_id, heartbeat_timeout_s=args.heartbeat_timeout)
    try:
        multi = distributed.initialize(options)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    if multi and not distributed.is_primary():
        logging.getLogger().setLevel(logging.WARNING)
    return multi


def _primary() -> bool:
    from pinn_jax import distributed

    return distributed.is_primary()


def _run(args) -> int:
    _setup_logging(args)
    if args.command != "ptychodus":
        # The CLI is an entry point: it applies the CPU XLA settings and the compilation cache
        # before jax computes (`import pinn_jax` does not; the ptychodus child applies them itself).
        from pinn_jax.runtime import configure_compile_cache, configure_conv_math, configure_cpu_runtime

        try:
            # before anything computes: oneDNN fixes its math mode at its first convolution
            configure_conv_math(getattr(args, "conv_math", None))
        except ValueError as exc:  # a bad $PINN_JAX_CONV_MATH (the flag's choices are checked)
            print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
            return 2
        configure_compile_cache()
        configure_cpu_runtime()
    try:
        if hasattr(args, "coordinator_address") and _start_distributed(args):
            from pinn_jax import distributed

            if not distributed.is_primary():
                # process 0 speaks for the run; the others only compute
                with contextlib.redirect_stdout(io.StringIO()):
                    return _dispatch(args)
        return _dispatch(args)
    except CLIError as exc:
        print(f"{PROG} {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:
        # Any remaining input problem (a malformed or unwritable path, a value a library rejected).
        print(f"{PROG} {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
