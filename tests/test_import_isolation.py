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
try:  # the ptychodus GUI panel needs PyQt5 (a test extra); without it, it is never imported
    import PyQt5.QtWidgets
except Exception:
    skip.add("backend_api.ptychodus.gui")
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


def _imported_modules(tree):
    """Every module an ast imports, at any depth (function-local imports included); relative
    imports are skipped (they stay inside their package)."""
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def test_no_backend_api_source_imports_pinn_jax_anywhere():
    """The one-way door at run time too: no module of backend_api imports pinn_jax, not even
    inside a function (the import-time check above cannot see those). The registry names the
    jax backend by a string target only."""
    import ast

    import backend_api

    root = Path(backend_api.__file__).resolve().parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) > 15  # the walk does see the package
    found = []
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for lineno, module in _imported_modules(tree):
            if module == "pinn_jax" or module.startswith("pinn_jax."):
                found.append(f"{path.relative_to(root.parent)}:{lineno}: {module}")
    assert found == [], found


def test_the_source_walk_sees_function_local_imports():
    """The walker is not blind: a function-local import and an import_module call are found."""
    import ast

    src = "def f():\n    from pinn_jax.geometry import x\n    importlib.import_module('pinn_jax.backend')\n"
    assert [m for _, m in _imported_modules(ast.parse(src))] == ["pinn_jax.geometry", "pinn_jax.backend"]
