"""Shared test configuration: hypothesis profiles, the reference-table oracle directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Profiles (STYLE §2.8). "ci" is the default: derandomized, so every run of the suite sees the
# same examples and a failure is replayable from its printed blob.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.register_profile(
    "long",
    deadline=None,
    print_blob=True,
    max_examples=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: ``shared/reference`` beside the checkout, when present (the project runs without it).
REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture
def reference_dir() -> Path:
    """The upstream reference tables, or skip when this checkout has no ``shared/`` beside it."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"no reference directory at {REFERENCE_DIR}")
    return REFERENCE_DIR
