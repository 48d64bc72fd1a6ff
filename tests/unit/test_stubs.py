"""Each compiled core matches its .pyi stub (mypy.stubtest, allowlist empty: STYLE §2.5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tdxcore

PKG = Path(tdxcore.__file__).resolve().parent
CORES = sorted(p.stem for p in PKG.glob("_*.pyx") if p.stem != "_testing")


def test_every_core_has_pxd_and_pyi():
    for core in CORES:
        assert (PKG / f"{core}.pxd").is_file(), core
        assert (PKG / f"{core}.pyi").is_file(), core


def test_stubtest_clean():
    pytest.importorskip("mypy")
    mods = [f"tdxcore.{c}" for c in CORES]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", *mods],
        capture_output=True, text=True, cwd=PKG.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
