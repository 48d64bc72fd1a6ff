"""The module's tables ship once as package data, identical to shared/reference when present."""

from __future__ import annotations

import filecmp

from tdxcore.status import DATA_DIR

TABLES = ("tdx_status_codes.csv", "sept_states.csv", "sept_leaf_legality.csv", "op_state_legality.csv")


def test_package_data_present():
    for name in TABLES:
        assert (DATA_DIR / name).is_file(), name


def test_package_data_matches_reference(reference_dir):
    for name in TABLES:
        assert filecmp.cmp(DATA_DIR / name, reference_dir / name, shallow=False), name
