"""The ``pinn-jax`` command line's parser: argument types, the config-generated flags of
``train`` (every ``TrainingConfig``/``ModelConfig`` field as ``--<field>``) and one sub-parser
per command. Imports nothing heavy, so ``pinn-jax --help`` is fast. :mod:`pinn_jax.cli` runs
the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

from backend_api.canvas import STITCH_CROP

__all__ = ["PROG", "build_parser", "collect"]

PROG = "pinn-jax"


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


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (``what`` names it in the error)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


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


def collect(args: argparse.Namespace, names: Sequence[str]) -> dict:
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
    """The ``pinn-jax`` parser: one sub-parser per command (``_add_<command>_parser``)."""
    parser = _Parser(
        prog=PROG,
        description="PtychoPINN in JAX: simulate ptychography data, train, reconstruct, convert models.",
        epilog="Run 'pinn-jax <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for add in (_add_demo_parser, _add_simulate_parser, _add_train_parser, _add_infer_parser,
                _add_reconstruct_parser, _add_convert_parser, _add_ptychodus_parser):
        add(sub)
    return parser


def _add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="simulate a small dataset, train, reconstruct, evaluate and write results",
        description=(
            "Simulate a small dataset (pinn_jax.simulate), train a PtychoPINN on half of it, "
            "reconstruct the other half (a different object) with the network, refine that object "
            "with the physics model (--refine-iterations passes), evaluate both against the ground "
            "truth, and write wts.h5.zip, reconstructed_amplitude.png, reconstructed_phase.png (the "
            "network's), refined_amplitude.png, refined_phase.png, comparison.png (ground truth, "
            "network, refined), convergence.png, loss_curve.png, history.json, refine_history.json, "
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
    p.add_argument("--refine-iterations", "--refine_iterations", type=_nonnegative_int, default=20,
                   help="physics refinement passes after the network (default: 20; 0: network only)")
    _conv_math_flag(p)
    _common_flags(p)


def _add_simulate_parser(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate train/test NPZ files (the project's data contract)",
        description=(
            "Simulate ptychography data and write train_data.npz and test_data.npz; also the "
            "test scan in ptychodus's own formats (diffraction.npz, diffraction.h5, product.h5 "
            "with a flat starting object, ground_truth.h5), so it opens in the ptychodus GUI."),
    )
    p.add_argument("--output-dir", "--output_dir", type=Path, required=True,
                   help="folder for train_data.npz and test_data.npz")
    p.add_argument("--no-ptychodus-files", "--no_ptychodus_files", action="store_true",
                   help="write only the NPZ files, not the ptychodus files of the test scan")
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


def _add_train_parser(sub) -> None:
    from backend_api.config import ModelConfig, TrainingConfig

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
    g.add_argument("--shard_data", type=_bool, default=None, metavar="{true,false}",
                   help="split the training groups over all devices (each device, and each process, holds "
                        "only its shard; --batch_size must be a multiple of the device count) instead of "
                        "replicating them (default: true in a multi-process run, false otherwise)")
    _canvas_flag(g)
    p.set_defaults(_tnames=tnames, _mnames=mnames)
    _distributed_flags(p)
    _conv_math_flag(p)
    _common_flags(p)


def _add_infer_parser(sub) -> None:
    from backend_api.config import DIFFRACTION_KINDS

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
    p.add_argument("--refine_iterations", type=_nonnegative_int, default=0,
                   help="then refine the network's object with the physics model for K passes over the "
                        "positions (pinn_jax.refine; default: 0 = the network's object as it is)")
    p.add_argument("--stream", action="store_true",
                   help="gridsize-1 models: read, predict and stitch --chunk patterns at a time straight onto the "
                        "object grid (bounded memory for scans of 10^5-10^6 positions; the NPZ is memory-mapped); "
                        "every position once, no grouping; 'object' in reconstruction.npz is then the grid object")
    p.add_argument("--chunk", type=_positive_int, default=4096,
                   help="patterns per chunk with --stream (the memory knob, default: 4096)")
    _refinement_flags(p)
    _canvas_flag(p)
    _distributed_flags(p)
    _conv_math_flag(p)
    _common_flags(p)


def _refinement_flags(p) -> None:
    """The refinement options ``reconstruct`` and ``infer --refine_iterations`` share."""
    p.add_argument("--noise", choices=("gaussian", "poisson"), default="gaussian",
                   help="refinement misfit: amplitude least squares or Poisson NLL (default: gaussian)")
    p.add_argument("--refine_probe", action="store_true", help="also refine the probe (from the second pass)")
    p.add_argument("--probe_learning_rate", type=_float_arg, default=0.05,
                   help="Adam step on the probe relative to its mean amplitude (default: 0.05)")
    p.add_argument("--refine_positions", action="store_true",
                   help="also correct the scan positions (Gauss-Newton per position, from the third pass)")
    p.add_argument("--tv_weight", type=_float_arg, default=0.0,
                   help="total-variation prior on the object, relative to the data's counts (default: 0; "
                        "~0.05 helps at ~1e4 photons per pattern)")
    p.add_argument("--final_learning_rate", type=_float_arg, default=1.0,
                   help="cosine-decay the refinement's steps to this fraction by the last pass "
                        "(default: 1 = constant; ~0.1 at low dose)")
    p.add_argument("--full_batch_from", type=_nonnegative_int, default=None, metavar="PASS",
                   help="from this pass (0-based) on, one update per pass along the gradient over every position "
                        "(accumulated a minibatch of positions at a time), with Nesterov momentum: converges to the "
                        "maximum-likelihood object instead of hovering around it at low dose (default: never; "
                        "~3 with --noise poisson --tv_weight 0.05 at ~1e4 photons per pattern)")
    p.add_argument("--full_batch_momentum", type=_float_arg, default=0.9,
                   help="Nesterov momentum of the full-batch passes (default: 0.9)")
    p.add_argument("--gauge", choices=("none", "offset", "ramp"), default="none",
                   help="move the object's phase offset (and linear ramp) into the probe (default: none)")


def _add_reconstruct_parser(sub) -> None:
    from backend_api.config import DIFFRACTION_KINDS

    p = sub.add_parser(
        "reconstruct",
        help="iterative physics refinement of the object (flat start, or seeded by a trained model)",
        description=(
            "Refine the object on the input grid against --test_data with the training forward "
            "model (pinn_jax.refine): from the network's stitched object with --model_path, else from "
            "a flat object. Writes reconstructed_amplitude.png, reconstructed_phase.png, "
            "reconstruction.npz ('object_on_grid'), history.json (misfit per pass), convergence.png "
            "and, with ground truth, metrics.json. The data must hold objectGuess (it fixes the grid)."
        ),
    )
    p.add_argument("--test_data", type=_existing_file, required=True, help="NPZ with the diffraction data")
    p.add_argument("--model_path", type=_model_location, default=None,
                   help="model directory (or wts.h5.zip) whose prediction seeds the refinement")
    p.add_argument("--output_dir", type=Path, default=Path("reconstruct_outputs"),
                   help="output folder (default: reconstruct_outputs)")
    p.add_argument("--iterations", type=_positive_int, default=20, help="passes over all positions (default: 20)")
    p.add_argument("--batch_size", type=_positive_int, default=32, help="positions per update (default: 32)")
    p.add_argument("--optimizer", choices=("pie", "adam"), default="pie",
                   help="object update: illumination-preconditioned gradient steps as ePIE/rPIE (pie) or "
                        "Adam (default: pie)")
    p.add_argument("--learning_rate", type=_float_arg, default=None,
                   help="step: the relaxation of the pie step (default 1), or Adam's step relative to the "
                        "mean object amplitude (default 0.02)")
    p.add_argument("--seed", type=_int_arg, default=0, help="minibatch order seed (default: 0)")
    _refinement_flags(p)
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--diffraction_kind", choices=DIFFRACTION_KINDS, default="auto",
                   help="what --test_data's diffraction holds (default: auto)")
    _distributed_flags(p)
    _conv_math_flag(p)
    _common_flags(p)


def _add_convert_parser(sub) -> None:
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


def _add_ptychodus_parser(sub) -> None:
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


def _canvas_flag(p) -> None:
    p.add_argument("--max_canvas_pixels", type=_positive_int, default=None, metavar="PIXELS",
                   help="refuse stitching canvases larger than this (default: $PINN_JAX_MAX_CANVAS_PIXELS "
                        "or 2**28 = 16384 x 16384, about 3 GiB)")


def _conv_math_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conv_math", "--conv-math", choices=("float32", "bfloat16"), default=None,
                   help="arithmetic of the network's oneDNN convolutions on x86 CPUs: float32, or bfloat16 "
                        "products summed in float32 (faster on CPUs with bfloat16 instructions; see "
                        "pinn_jax.runtime.configure_conv_math); default: $PINN_JAX_CONV_MATH or float32")


def _distributed_flags(p: argparse.ArgumentParser) -> None:
    """``jax.distributed`` for a multi-process run (pinn_jax.distributed); SLURM and Open MPI
    launches are detected without them."""
    g = p.add_argument_group("multi-process (jax.distributed; SLURM/Open MPI are detected without these)")
    g.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator")
    g.add_argument("--num_processes", type=_positive_int, default=None, help="processes in the run")
    g.add_argument("--process_id", type=_nonnegative_int, default=None, help="this process's index")
    g.add_argument("--heartbeat_timeout", type=_positive_int, default=100,
                   help="seconds after which a silent process fails the others (default: 100)")


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
