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
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from backend_api.canvas import STITCH_CROP

__all__ = ["main", "build_parser", "CLIError"]

PROG = "pinn-jax"
log = logging.getLogger("pinn_jax.cli")


class CLIError(Exception):
    """A user error detected by the CLI: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``pinn-jax train: error: ... (see --help)``), exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------------------------

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _existing_file(text: str) -> Path:
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"not a file: {text}")
    return p


def _model_location(text: str) -> Path:
    """A model directory holding wts.h5.zip, or the wts.h5.zip file itself (-> its folder)."""
    p = Path(text)
    if p.is_file() and p.name.endswith(".zip"):
        return p
    if not p.exists():
        raise argparse.ArgumentTypeError(f"model path not found: {text}")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"model path is neither a directory nor a .zip file: {text}")
    if p.is_dir() and not (p / "wts.h5.zip").is_file():
        raise argparse.ArgumentTypeError(f"no wts.h5.zip in model directory {text}")
    return p


def _float_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# config flags generated from the dataclasses (the reference script's convention)
# ---------------------------------------------------------------------------------------------

# Fields that make no sense on this command line (the backend is always jax here).
_SKIP_FIELDS = {"model", "backend"}


def _config_flags(parser: argparse.ArgumentParser, cls, group_title: str, *, skip=frozenset()) -> list[str]:
    """Add ``--<field>`` for every field of a config dataclass; returns the field names."""
    from backend_api import config as C

    group = parser.add_argument_group(group_title)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in _SKIP_FIELDS or f.name in skip:
            continue
        chk = f.metadata.get("check")
        kind = getattr(chk, "kind", None)
        default = f.default if f.default is not dataclasses.MISSING else None
        kw: dict[str, Any] = {"default": None, "dest": f"cfg_{f.name}"}
        shown = default
        if f.name == "N":
            kw.update(type=_int_arg, choices=tuple(C.SUPPORTED_N["cnn"]), metavar="{64,128,256}")
        elif kind == "bool":
            kw.update(type=_bool, metavar="true|false")
        elif kind == "int":
            kw.update(type=_int_arg, metavar="INT")
        elif kind == "float":
            kw.update(type=_float_arg, metavar="FLOAT")
        elif kind == "choice":
            kw.update(choices=tuple(chk.choices))
        elif kind == "path":
            kw.update(type=Path, metavar="PATH")
        else:
            kw.update(type=str)
        help_text = f"default: {shown}" if shown is not None else "default: unset"
        if kind == "float" and isinstance(shown, float):
            help_text = f"default: {shown:g}"
        group.add_argument(f"--{f.name}", help=help_text, **kw)
        names.append(f.name)
    return names


def _collect(args: argparse.Namespace, names: Sequence[str]) -> dict:
    out = {}
    for n in names:
        v = getattr(args, f"cfg_{n}", None)
        if v is not None:
            out[n] = v
    return out


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from backend_api.config import DIFFRACTION_KINDS, ModelConfig, TrainingConfig

    parser = _Parser(
        prog=PROG,
        description="PtychoPINN in JAX: simulate ptychography data, train, reconstruct, convert models.",
        epilog="Run 'pinn-jax <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)

    # demo ---------------------------------------------------------------------------------
    p = sub.add_parser(
        "demo",
        help="simulate a small dataset, train, reconstruct, evaluate and write results",
        description=(
            "Simulate a small dataset (pinn_jax.simulate), train a PtychoPINN on half of it, "
            "reconstruct the other half (a different object), evaluate against the ground "
            "truth, and write wts.h5.zip, reconstructed_amplitude.png, reconstructed_phase.png, "
            "comparison.png (ground truth beside reconstruction), loss_curve.png, history.json, "
            "metrics.json and reconstruction.npz into --output-dir. The default size "
            "finishes in a few minutes on 2 CPU cores."
        ),
    )
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("pinn_jax_demo"),
                   help="output folder (default: ./pinn_jax_demo)")
    p.add_argument("--epochs", type=_positive_int, default=12, help="training epochs (default: 12)")
    p.add_argument("--n-images", type=_positive_int, default=384,
                   help="scan positions simulated in total, half for training (default: 384)")
    p.add_argument("--N", type=_int_arg, choices=(64, 128, 256), default=64, metavar="{64,128,256}",
                   help="diffraction pattern size (default: 64)")
    p.add_argument("--object-size", type=_positive_int, default=128, help="object side in pixels (default: 128)")
    p.add_argument("--gridsize", type=_positive_int, default=1, help="patterns per group side (default: 1)")
    p.add_argument("--n-filters-scale", type=_positive_int, default=1,
                   help="network width multiplier (reference default 2; demo default 1 for speed)")
    # Small batches: with only ~200 training patterns, more optimiser steps per epoch learn
    # visibly faster than the reference's batch of 16 in the same wall time (measured).
    p.add_argument("--batch-size", type=_positive_int, default=4,
                   help="batch size in groups (default: 4; the reference trains with 16)")
    p.add_argument("--nphotons", type=_float_arg, default=1e9, help="photons per pattern (default: 1e9)")
    p.add_argument("--kind", choices=("lines", "grf"), default="lines", help="object kind (default: lines)")
    p.add_argument("--seed", type=_int_arg, default=0, help="seed for simulation, weights and shuffling")
    _common_flags(p)

    # simulate -----------------------------------------------------------------------------
    p = sub.add_parser(
        "simulate",
        help="simulate train/test NPZ files (the project's data contract)",
        description="Simulate ptychography data and write train_data.npz and test_data.npz.",
    )
    p.add_argument("--output-dir", "--output_dir", type=Path, required=True,
                   help="folder for train_data.npz and test_data.npz")
    p.add_argument("--n-images", "--n_images", type=_positive_int, default=512,
                   help="scan positions in total (default: 512)")
    p.add_argument("--train-fraction", type=_float_arg, default=0.5,
                   help="share of positions in the training file (default: 0.5)")
    p.add_argument("--N", type=_int_arg, choices=(64, 128, 256), default=64, metavar="{64,128,256}",
                   help="diffraction pattern size (default: 64)")
    p.add_argument("--object-size", type=_positive_int, default=224, help="object side in pixels (default: 224)")
    p.add_argument("--kind", choices=("lines", "grf"), default="lines", help="object kind (default: lines)")
    p.add_argument("--scan", choices=("random", "raster"), default="random", help="scan pattern (default: random)")
    p.add_argument("--split", choices=("objects", "halves"), default="objects",
                   help="test set from another object, or the other half of one object (default: objects)")
    p.add_argument("--nphotons", type=_float_arg, default=1e9, help="photons per pattern (default: 1e9)")
    p.add_argument("--probe-scale", type=_float_arg, default=None, help="normalise the probe (default: as simulated)")
    p.add_argument("--seed", type=_int_arg, default=0, help="seed (default: 0)")
    _common_flags(p)

    # train --------------------------------------------------------------------------------
    p = sub.add_parser(
        "train",
        help="train a model on NPZ data (the reference training script's flags)",
        description=(
            "Train a PtychoPINN (jax backend) on --train_data_file and write "
            "<output_dir>/wts.h5.zip, history.json and Orbax run checkpoints "
            "(<output_dir>/checkpoints). With --test_data_file and --do_stitching, also "
            "reconstructed_amplitude.png / reconstructed_phase.png. Every TrainingConfig and "
            "ModelConfig field is a flag; booleans take true/false."
        ),
    )
    tnames = _config_flags(p, TrainingConfig, "training configuration (TrainingConfig)")
    mnames = _config_flags(p, ModelConfig, "model configuration (ModelConfig)")
    g = p.add_argument_group("run control")
    g.add_argument("--resume", action="store_true",
                   help="continue from the last epoch checkpoint in <output_dir>/checkpoints")
    g.add_argument("--checkpoint_dir", type=Path, default=None,
                   help="run checkpoint folder (default: <output_dir>/checkpoints)")
    g.add_argument("--seed", type=_int_arg, default=0, help="seed for grouping, weights and shuffling (default: 0)")
    g.add_argument("--do_stitching", action="store_true",
                   help="reconstruct the test data after training and write the PNGs")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    _canvas_flag(g)
    p.set_defaults(_tnames=tnames, _mnames=mnames)
    _common_flags(p)

    # infer --------------------------------------------------------------------------------
    p = sub.add_parser(
        "infer",
        help="reconstruct an object from NPZ data with a trained model",
        description=(
            "Load <model_path>/wts.h5.zip, reconstruct --test_data and write "
            "reconstructed_amplitude.png, reconstructed_phase.png and reconstruction.npz "
            "(complex 'object', 'amplitude', 'phase', 'global_offsets') into --output_dir; "
            "with ground truth in the NPZ also 'object_on_grid' and metrics.json."
        ),
    )
    p.add_argument("--model_path", type=_model_location, required=True,
                   help="model directory holding wts.h5.zip (or the wts.h5.zip file)")
    p.add_argument("--test_data", type=_existing_file, required=True, help="NPZ with the diffraction data")
    p.add_argument("--output_dir", type=Path, default=Path("inference_outputs"),
                   help="output folder (default: inference_outputs)")
    p.add_argument("--n_images", "--n_groups", dest="n_groups", type=_positive_int, default=None,
                   help="number of groups to reconstruct (default: every position)")
    p.add_argument("--n_subsample", type=_positive_int, default=None, help="use a random subset of positions first")
    p.add_argument("--subsample_seed", type=_int_arg, default=None, help="seed of that subset")
    p.add_argument("--neighbor_count", type=_positive_int, default=4, help="K nearest neighbours for grouping")
    p.add_argument("--M", type=_positive_int, default=STITCH_CROP,
                   help=f"central crop stitched from each patch (default: {STITCH_CROP})")
    p.add_argument("--phase_vmin", type=_float_arg, default=None, help="phase colour scale minimum")
    p.add_argument("--phase_vmax", type=_float_arg, default=None, help="phase colour scale maximum")
    p.add_argument("--seed", type=_int_arg, default=45, help="grouping seed (default: 45, as the reference)")
    p.add_argument("--diffraction_kind", choices=DIFFRACTION_KINDS, default="auto",
                   help="what --test_data's diffraction holds (default: auto, see the README's data contract)")
    _canvas_flag(p)
    _common_flags(p)

    # convert ------------------------------------------------------------------------------
    p = sub.add_parser(
        "convert",
        help="turn a TensorFlow wts.h5.zip into a JAX one",
        description=(
            "Import the weights, probe and intensity scale of a reference TensorFlow "
            "wts.h5.zip (pinn_jax.interop) and save them as a jax-backend wts.h5.zip."
        ),
    )
    p.add_argument("input", type=_model_location, help="TensorFlow wts.h5.zip or the folder holding it")
    p.add_argument("output", type=Path, help="output folder (wts.h5.zip is written inside it)")
    _common_flags(p)

    # ptychodus ----------------------------------------------------------------------------
    p = sub.add_parser(
        "ptychodus",
        help="start ptychodus with the PtychoPINN-JAX reconstructor (arguments go to ptychodus)",
        description=(
            "Run ptychodus with the PtychoPINN-JAX reconstructor library registered; every "
            "argument after 'ptychodus' is passed to ptychodus (e.g. -b train -i IN -o OUT)."
        ),
        add_help=True,
    )
    p.add_argument("ptychodus_args", nargs=argparse.REMAINDER, help="arguments for ptychodus")
    return parser


def _canvas_flag(p) -> None:
    p.add_argument("--max_canvas_pixels", type=_positive_int, default=None, metavar="PIXELS",
                   help="refuse stitching canvases larger than this (default: $PINN_JAX_MAX_CANVAS_PIXELS "
                        "or 2**28 = 16384 x 16384, about 3 GiB)")


def _common_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", action="store_true", help="only warnings and errors")
    g.add_argument("--verbose", action="store_true", help="debug logging")


def _version() -> str:
    try:
        from pinn_jax import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


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
        return RawData.from_file(path, diffraction_kind=diffraction_kind)
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


def _validate_convert(args) -> None:
    if args.output.suffix == ".zip":
        raise CLIError(f"output: give a folder (wts.h5.zip is written inside it), got {args.output}")
    _check_output_dir(args.output, "output")


_VALIDATORS = {
    "demo": _validate_demo,
    "simulate": _validate_simulate,
    "train": _validate_train,
    "infer": _validate_infer,
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
    return 0


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

    from pinn_jax import pipeline, report
    from pinn_jax.train import TrainingDivergedError

    out.mkdir(parents=True, exist_ok=True)
    _sigterm_as_interrupt()
    t0 = time.perf_counter()
    try:
        results, archive = pipeline.train(
            train_raw, test_raw if args.do_stitching else None, cfg, seed=args.seed, checkpoint_dir=ckpt_dir,
            resume=args.resume, progress=not (args.no_progress or args.quiet), history_path=out / "history.json",
            save_to=out)
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
    if args.do_stitching and test_raw is not None and "reconstructed_obj" in results:
        from pinn_jax import inference

        amp, phase, _ = inference.stitch(results["reconstructed_obj"], results["test_container"].global_offsets,
                                         M=STITCH_CROP, max_canvas_pixels=args.max_canvas_pixels)
        report.save_amplitude_phase(amp, phase, out)
        print(f"wrote {out / 'reconstructed_amplitude.png'} and {out / 'reconstructed_phase.png'}")
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

    from backend_api.archive import ArchiveBackendError, ArchiveError

    model_dir = args.model_path.parent if args.model_path.is_file() else args.model_path
    raw = _load_raw(args.test_data, "--test_data", args.diffraction_kind)
    if args.n_subsample:
        raw = raw.subsample(args.n_subsample, args.subsample_seed)
    from backend_api.grouping import GroupingOptions
    from pinn_jax import pipeline, report
    from pinn_jax.inference import load_inference_bundle

    try:
        if args.model_path.is_file():
            _check_model_file(args.model_path)
        model, cfg = load_inference_bundle(model_dir)
    except ArchiveBackendError as exc:
        raise CLIError(str(exc)) from exc
    except ArchiveError as exc:
        raise CLIError(f"--model_path: {exc}") from exc
    N = model.N
    n_px = int(np.shape(raw.diff3d)[-1])
    if n_px != N:
        raise CLIError(f"--test_data has {n_px}x{n_px} patterns but the model was trained on {N}x{N}")
    if args.M > N:
        raise CLIError(f"--M {args.M} exceeds the model's {N}x{N} patches")
    # infer never makes more groups than the default (every position about once)
    grouping = GroupingOptions(n_groups=args.n_groups, neighbor_count=args.neighbor_count)
    grouping = dataclasses.replace(grouping, n_groups=grouping.resolve_n_groups(len(raw.xcoords), model.gridsize))
    obj_shape = None if raw.objectGuess is None else tuple(np.shape(raw.objectGuess))
    t0 = time.perf_counter()
    try:
        amp, phase, res = pipeline.reconstruct(model, raw, grouping=grouping, M=args.M, object_shape=obj_shape,
                                               seed=args.seed, nphotons=cfg.get("nphotons", 1e9),
                                               max_canvas_pixels=args.max_canvas_pixels)
    except ValueError as exc:
        raise CLIError(f"--test_data: {exc}") from exc
    elapsed = time.perf_counter() - t0
    out = args.output_dir
    written = pipeline.write_reconstruction(out, amp, phase, res, phase_vmin=args.phase_vmin,
                                            phase_vmax=args.phase_vmax)
    print(f"reconstructed {len(res['global_offsets'])} groups in {elapsed:.2f} s -> object {amp.shape}")
    if obj_shape is not None and report.has_signal(raw.objectGuess):
        summary = pipeline.evaluate(res, raw.objectGuess, M=args.M)
        report.write_json(summary, out / "metrics.json")
        print(report.format_metrics(summary))
    print(f"wrote {', '.join(str(p) for p in written)}")
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
                 progress=not args.quiet)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    return 0


_COMMANDS = {
    "demo": cmd_demo,
    "simulate": cmd_simulate,
    "train": cmd_train,
    "infer": cmd_infer,
    "convert": cmd_convert,
    "ptychodus": cmd_ptychodus,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pinn-jax``; returns the exit status (also used by ``python -m pinn_jax``)."""
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


def _default_compile_cache() -> None:
    """Cache compiled XLA programs across runs (the train step takes tens of seconds to compile
    on a laptop CPU): ``$XDG_CACHE_HOME/pinn_jax/xla`` (default ``~/.cache/pinn_jax/xla``) unless
    ``JAX_COMPILATION_CACHE_DIR`` is set; ``PINN_JAX_COMPILE_CACHE=0`` turns it off. Only
    effective before jax is first imported (it reads the variable then)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get("PINN_JAX_COMPILE_CACHE", "1") == "0":
        return
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(base / "pinn_jax" / "xla")


def _run(args) -> int:
    _setup_logging(args)
    if args.command != "ptychodus":
        _default_compile_cache()
        # The CLI is an entry point: it applies the CPU XLA settings before jax computes
        # (`import pinn_jax` does not; the ptychodus child applies them itself).
        from pinn_jax.runtime import configure_cpu_runtime

        configure_cpu_runtime()
    try:
        validate = _VALIDATORS.get(args.command)
        if validate is not None:
            validate(args)
        return _COMMANDS[args.command](args)
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
