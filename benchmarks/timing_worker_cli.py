"""The command line and JSON output every timing worker of ``train_speed.py`` shares.

``train_speed.py`` runs its workers -- pinn-jax itself, ``keras_baseline.py`` and
``upstream_tf_baseline.py`` (each under its own Python) -- with the same measurement flags
(``train_speed._timing_flags``); this module parses them and writes a worker's result atomically,
so the flag set and the output contract are defined once. Only the standard library: the
TensorFlow workers import it from this folder in an environment without pinn-jax.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def timing_parser(description: str, *, N_choices=(64, 128, 256), predict_batch=(64, 256),
                  predict_batch_help: str | None = None) -> argparse.ArgumentParser:
    """``--N --batch-size --n-filters-scale --steps --blocked-steps --predict-batch
    --predict-patterns --predict-repeats --seed --out``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--N", type=int, default=64, choices=sorted(N_choices))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-filters-scale", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--blocked-steps", type=int, default=5)
    p.add_argument("--predict-batch", type=int, nargs="+", default=list(predict_batch), help=predict_batch_help)
    p.add_argument("--predict-patterns", type=int, default=512)
    p.add_argument("--predict-repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    return p


def write_result(path: Path, result: dict) -> None:
    """``result`` as JSON at ``path``, written to a temporary name and renamed (no half file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, path)
