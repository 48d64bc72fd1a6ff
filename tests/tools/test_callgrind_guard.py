"""``benchmarks/callgrind_guard.py`` without valgrind: dump parsing, --check verdicts, --update.

The measurement itself (valgrind, minutes) is opt-in and never runs here; ``measure`` and
``environment`` are replaced by fixed numbers.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> Any:
    path = ROOT / "benchmarks" / "callgrind_guard.py"
    spec = importlib.util.spec_from_file_location("callgrind_guard", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("callgrind_guard", mod)
    spec.loader.exec_module(mod)
    return mod


cg = _load()
ENV = {"machine": "m", "python": "p", "numpy": "n", "cython": "c", "valgrind": "v"}


def test_parse_reads_each_client_request_dump(tmp_path):
    """One count per ``DUMP_STATS_AT(name)`` file; the program-termination dump is ignored."""
    (tmp_path / "callgrind.out.7.1").write_text(
        "version: 1\ndesc: Trigger: Client Request: op_a\nevents: Ir\nsummary: 1234\ntotals: 1234\n")
    (tmp_path / "callgrind.out.7.2").write_text("desc: Trigger: Client Request: op_b\ntotals: 99\n")
    (tmp_path / "callgrind.out.7").write_text("desc: Trigger: Program termination\ntotals: 10\n")
    assert cg._parse(str(tmp_path)) == {"op_a": 1234, "op_b": 99}


def test_ops_are_named_and_subtractions_exist():
    """Every ``minus`` names another operation; the issue's micro-operations are all there."""
    for _name, (repeat, minus, desc) in cg.OPS.items():
        assert repeat >= 1 and desc
        assert minus is None or minus in cg.OPS
    for needed in ("attr_lookup_ranges_x1000", "attr_set_range_512_ranges", "sept_leaf_cycle_4096",
                   "vcpu_run_private_fault", "storm_1000_steps"):
        assert needed in cg.OPS


@pytest.fixture
def fake(monkeypatch):
    """Replace the valgrind run by a dict the test sets."""
    counts: dict = {}
    monkeypatch.setattr(cg, "measure", lambda names, verbose=False, jobs=1: {n: counts[n] for n in names})
    monkeypatch.setattr(cg, "environment", lambda: dict(ENV))
    return counts


def test_update_then_check(tmp_path, fake, capsys):
    base = tmp_path / "baseline.json"
    fake.update(attr_lookup_ranges_x1000=1000, sept_leaf_cycle_4096=5000)
    only = ["--only", "attr_lookup_ranges_x1000", "--only", "sept_leaf_cycle_4096"]
    assert cg.main(["--update", "--baseline", str(base), *only]) == 0
    rec = json.loads(base.read_text())
    assert rec["environment"] == ENV and rec["pythonhashseed"] == 0
    assert rec["ops"]["sept_leaf_cycle_4096"]["ir"] == 5000
    fake.update(attr_lookup_ranges_x1000=1040, sept_leaf_cycle_4096=4000)      # +4 %: ok; -20 %: faster
    assert cg.main(["--check", "--baseline", str(base), *only]) == 0
    out = capsys.readouterr().out
    assert "+4.0%" in out and "faster (update the baseline)" in out
    fake["attr_lookup_ranges_x1000"] = 1060                                      # +6 % > 5 %
    assert cg.main(["--check", "--baseline", str(base), *only]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert cg.main(["--check", "--baseline", str(base), "--tolerance", "0.1", *only]) == 0


def test_update_only_keeps_the_other_operations(tmp_path, fake):
    base = tmp_path / "b.json"
    fake.update(attr_lookup_ranges_x1000=1, sept_leaf_cycle_4096=2)
    assert cg.main(["--update", "--baseline", str(base), "--only", "attr_lookup_ranges_x1000"]) == 0
    assert cg.main(["--update", "--baseline", str(base), "--only", "sept_leaf_cycle_4096"]) == 0
    assert set(json.loads(base.read_text())["ops"]) == {"attr_lookup_ranges_x1000", "sept_leaf_cycle_4096"}


def test_check_usage_errors(tmp_path, fake, capsys):
    assert cg.main(["--check", "--only", "no_such_op"]) == 2
    fake["attr_lookup_ranges_x1000"] = 1
    assert cg.main(["--check", "--baseline", str(tmp_path / "absent.json"),
                    "--only", "attr_lookup_ranges_x1000"]) == 2
    assert cg.main(["--list"]) == 0
    assert "storm_1000_steps" in capsys.readouterr().out


def test_the_recorded_baseline_names_known_operations():
    """The repository's baseline (when recorded) has its environment and only known operations."""
    if not cg.BASELINE.is_file():
        pytest.skip("no baseline recorded yet")
    rec = json.loads(cg.BASELINE.read_text())
    assert set(rec["environment"]) == set(ENV)
    assert set(rec["ops"]) <= set(cg.OPS) and all(v["ir"] > 0 for v in rec["ops"].values())


def test_rst_table_of_the_baseline(tmp_path, fake):
    base, out = tmp_path / "b.json", tmp_path / "g.inc"
    fake["storm_0_steps"] = 123456
    assert cg.main(["--update", "--baseline", str(base), "--only", "storm_0_steps"]) == 0
    assert cg.main(["--rst", str(out), "--baseline", str(base)]) == 0
    text = out.read_text()
    assert ".. list-table::" in text and "``storm_0_steps``" in text and "123,456" in text
