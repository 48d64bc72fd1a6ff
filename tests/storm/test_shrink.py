"""``tdxcore shrink`` (issue 8 item 5) on a deliberately broken model.

A failing storm shrinks to a short report that fails with the same invariant id and replays to
the same hash.
"""

from __future__ import annotations

import json

import pytest

from tdxcore.cli import main
from tdxcore.schemas import validate_report
from tdxcore.storm import StormConfig, replay, run_storm
from tdxcore.storm.report import report_dict
from tdxcore.storm.shrink import ShrinkError, shrink


@pytest.fixture
def broken(monkeypatch):
    """Shared mappings that survive a conversion or a slot delete (as test_storm's mutant)."""
    from tdxcore.kvm import vm as vm_mod

    monkeypatch.setattr(vm_mod.Vm, "zap_shared_locked", lambda self, start, end: 0)


def test_shrink_finds_fewer_steps_and_a_smaller_mix(broken):
    rep = run_storm(StormConfig(steps=500, seed=2, mix="all", busy=0.0, check_every=10))
    inv = rep.violation["invariant"]
    logged = []
    small = shrink(report_dict(rep), log=logged.append, report_name="x.min.json")
    validate_report(small)
    assert small["violation"]["invariant"] == inv
    assert small["config"]["steps"] < rep.violation["step"] and small["config"]["check_every"] == 1
    assert small["config"]["mix"] != "all"            # the slot mix alone shows I14
    assert small["violation"]["replay"] == "tdxcore replay x.min.json"
    assert small["shrink"]["from"]["steps"] == 500 and small["shrink"]["runs"] == len(logged)
    # one step fewer no longer fails: the binary search is tight
    cfg = StormConfig.from_dict(small["config"])
    fewer = run_storm(StormConfig(**dict(cfg.to_dict(), steps=cfg.steps - 1, inject=())))
    assert fewer.violation is None or fewer.violation["invariant"] != inv
    again = replay(small)
    assert again.violation["invariant"] == inv and f"{again.events_digest:#x}" == small["events_digest"]


def test_shrink_max_runs_keeps_the_best_so_far(broken):
    rep = run_storm(StormConfig(steps=600, seed=2, mix="slots", busy=0.0, check_every=20))
    small = shrink(report_dict(rep), max_runs=3)
    assert small["shrink"]["runs"] == 3
    assert small["violation"]["invariant"] == rep.violation["invariant"]
    assert small["config"]["steps"] <= rep.violation["step"]


def test_shrink_refuses_a_clean_or_fixed_report(monkeypatch):
    clean = report_dict(run_storm(StormConfig(steps=100, seed=0, check_every=0)))
    with pytest.raises(ValueError, match="no violation"):
        shrink(clean)
    fake = dict(clean, violation={"invariant": "I10", "message": "m", "gfn": None, "pfn": None,
                                  "event_index": 1, "step": 50, "replay": "r"})
    with pytest.raises(ShrinkError, match="no longer fails"):
        shrink(fake)


def test_cli_shrink_writes_min_report_that_replays(broken, tmp_path, capsys):
    rp = tmp_path / "r.json"
    assert main(["storm", "--steps", "400", "--seed", "2", "--mix", "slots", "--busy", "0",
                 "--check-every", "20", "--quiet", "--report", str(rp)]) == 1
    capsys.readouterr()
    assert main(["shrink", str(rp), "--quiet", "--max-runs", "12"]) == 0
    out = capsys.readouterr().out
    mp = tmp_path / "r.min.json"
    assert f"tdxcore replay {mp}" in out
    obj = json.loads(mp.read_text())
    validate_report(obj)
    assert obj["violation"]["replay"] == "tdxcore replay r.min.json"
    assert main(["replay", str(mp)]) == 1              # replays (hash matches) and fails again
    assert "matches" in capsys.readouterr().out


def test_cli_shrink_errors(tmp_path, capsys):
    assert main(["shrink", str(tmp_path / "missing.json")]) == 2
    p = tmp_path / "clean.json"
    p.write_text(json.dumps(report_dict(run_storm(StormConfig(steps=50, check_every=0)))))
    assert main(["shrink", str(p)]) == 2
    assert "no violation" in capsys.readouterr().err
