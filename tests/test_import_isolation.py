"""backend_api never imports a backend: importing it (every submodule, backend_api.ptychodus
included once it exists) must leave jax/flax/optax/orbax (and TF/torch) out of sys.modules.

Each check runs in a fresh interpreter so that other tests' imports cannot hide a leak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = r"""
import importlib, json, pkgutil, sys
import backend_api
skip = set(sys.argv[1].split(",")) if sys.argv[1] else set()
names = []
for info in pkgutil.walk_packages(backend_api.__path__, "backend_api."):
    if any(info.name == s or info.name.startswith(s + ".") for s in skip):
        continue
    importlib.import_module(info.name)
    names.append(info.name)
# exercising the registry must stay lazy too
from backend_api import backends
backends.available_backends()
print(json.dumps({"imported": names, "modules": sorted(m.split(".")[0] for m in sys.modules)}))
"""

FORBIDDEN_ALWAYS = {"jax", "jaxlib", "flax", "optax", "orbax", "tensorflow", "torch", "pinn_jax"}


def _run(skip: str) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, skip],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_backend_api_core_imports_no_backend_and_no_matplotlib():
    out = _run("backend_api.ptychodus")
    expected = {"backend_api.archive", "backend_api.backends", "backend_api.workflows"}
    assert expected <= set(out["imported"])
    leaked = (FORBIDDEN_ALWAYS | {"matplotlib"}) & set(out["modules"])
    assert not leaked, f"importing backend_api submodules imported {sorted(leaked)}"


@pytest.mark.slow
def test_every_backend_api_module_including_ptychodus_imports_no_jax():
    out = _run("")
    if (ROOT / "backend_api" / "ptychodus" / "__init__.py").exists():
        assert "backend_api.ptychodus" in out["imported"]
    leaked = FORBIDDEN_ALWAYS & set(out["modules"])
    assert not leaked, f"importing backend_api (incl. ptychodus glue) imported {sorted(leaked)}"
