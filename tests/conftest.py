"""Shared pytest configuration.

Tests read their reference data from ``tests/fixtures`` (copied from the TensorFlow reference
runs, see ``tests/fixtures/README.md``), never from outside the project.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep XLA single-threaded-friendly and quiet on the 2-core CI machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
