"""Seeded, cached benchmark inputs (STYLE §2.9). Session-scoped: built once per run.

Owned by the xarray benchmarks; other benchmark modules may append their own fixtures.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

#: A 4 GiB guest, in gfns.
NR_GFNS_4G = 1 << 20
#: How many pre-drawn keys one timed lookup round walks.
NR_KEYS = 1000
SEED = 20260522


@pytest.fixture(scope="session")
def lookup_keys() -> list:
    """NR_KEYS gfns drawn uniformly from a 4 GiB guest (a list: the loop is pure Python)."""
    rng = np.random.default_rng(np.random.SeedSequence(SEED).spawn(1)[0])
    return rng.integers(0, NR_GFNS_4G, NR_KEYS).tolist()


@pytest.fixture(scope="session")
def fragmented_gfns() -> np.ndarray:
    """The private gfns of a 4 GiB guest with alternating 4K private/shared (2^19 of 2^20)."""
    return np.arange(0, NR_GFNS_4G, 2, dtype=np.uint64)


# ---------------------------------------------------------------- machine_info (BENCHSUITE)
_LOAD_AT_START = os.getloadavg()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the load averages at the start and the end: the machines are shared."""
    machine_info["loadavg_start"] = [round(x, 2) for x in _LOAD_AT_START]
    machine_info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
