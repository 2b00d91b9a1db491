"""Shared pytest configuration.

Tests read their reference data from ``tests/fixtures`` (copied from the TensorFlow reference
runs, see ``tests/fixtures/README.md``), never from outside the project.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run on the CPU (CI has no accelerator), with TensorFlow-style logging quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compiling the CNN train step takes tens of seconds on 2 cores; a persistent compilation cache
# lets the subprocess tests (CLI, multi-device, ptychodus child) reuse what the suite compiled.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "xla")
)

# The suite runs with the CPU XLA settings every entry point applies (import pinn_jax does not):
# before any test can start jax's backends.
from pinn_jax.runtime import configure_cpu_runtime  # noqa: E402

configure_cpu_runtime()

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
