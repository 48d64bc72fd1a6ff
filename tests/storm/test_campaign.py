"""Campaigns (issue 8 item 9): one storm per seed on local processes, opt-in on Dask.

Results equal each seed run alone; a summary with replay commands; exit 1 on a violation.
"""

from __future__ import annotations

import json

import pytest

from tdxcore.cli import main
from tdxcore.storm import StormConfig, run_storm
from tdxcore.storm.campaign import CampaignReport, parse_seeds, run_campaign, run_seed, storm_command

KW = {"steps": 300, "check_every": 50, "busy": 0.0}


def test_parse_seeds():
    assert parse_seeds("0:4") == [0, 1, 2, 3]
    assert parse_seeds("7") == [7]
    assert parse_seeds("1:3, 9") == [1, 2, 9]
    for bad in ("", "3:3", "a:b", "1:2,1", "-1:2"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)


def test_local_campaign_matches_single_storms():
    progress = []
    rep = run_campaign(range(3), KW, workers=2, progress=lambda d, t, r: progress.append((d, t, r["seed"])))
    assert rep.seeds == [0, 1, 2] and rep.ok and rep.workers == 2 and rep.scheduler is None
    assert [d for d, _, _ in progress] == [1, 2, 3] and {s for _, _, s in progress} == {0, 1, 2}
    for r in rep.results:
        assert set(r) >= {"seed", "clean", "violation", "vm_bugged", "events_digest", "steps", "seconds"}
        assert r["clean"] and r["violation"] is None
    # a worker's storm is the storm: same digest in this process
    alone = run_storm(StormConfig(seed=1, **KW))
    assert rep.results[1]["events_digest"] == f"{alone.events_digest:#x}"
    assert json.loads(json.dumps(rep.to_dict()))["schema"] == "tdxcore.campaign/1"


def test_campaign_argument_errors():
    with pytest.raises(ValueError, match="seed"):
        run_campaign([0], dict(KW, seed=3))
    with pytest.raises(ValueError, match="mix"):
        run_campaign([0], dict(KW, mix="nope"))
    with pytest.raises(ValueError, match="seconds"):
        run_campaign([0], {"seconds": 1.0})
    with pytest.raises(ValueError, match="seeds"):
        run_campaign([], KW)


def test_dask_missing_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_dask(name, *a, **k):
        if name.split(".")[0] in ("distributed", "dask"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    with pytest.raises(ImportError, match=r"tdxcore\[dask\]"):
        run_campaign([0], KW, scheduler="tcp://127.0.0.1:1")


def test_replay_commands_name_the_seed_and_config():
    rep = CampaignReport(dict(KW, mix="convert", policy="SERIES_2023"), [])
    storm, rp = rep.replay_commands(4)
    assert storm.startswith("tdxcore storm --seed 4 --steps 300 --mix convert --policy SERIES_2023")
    assert "--check-every 50" in storm and storm.endswith("--report seed4.json")
    assert rp == "tdxcore replay seed4.json"
    assert "--no-interleave" in storm_command(StormConfig(interleave=False))


def test_cli_campaign_summary_and_violation_exit(monkeypatch, capsys, tmp_path):
    out = tmp_path / "c.json"
    assert main(["campaign", "--seeds", "0:2", "--workers", "2", "--steps", "200", "--check-every", "50",
                 "--busy", "0", "--quiet", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "violations" in text and "none" in text
    assert json.loads(out.read_text())["seeds"] == [0, 1]
    assert main(["campaign", "--seeds", "2:1", "--quiet"]) == 2
    assert "empty" in capsys.readouterr().err

    # a violation in a worker: exit 1 and the reproducing commands (workers fork: the patch holds)
    from tdxcore.kvm import vm as vm_mod

    monkeypatch.setattr(vm_mod.Vm, "zap_shared_locked", lambda self, start, end: 0)
    assert main(["campaign", "--seeds", "2", "--workers", "1", "--steps", "600", "--check-every", "10",
                 "--busy", "0", "--quiet"]) == 1
    text = capsys.readouterr().out
    assert "seed 2: invariant I14" in text
    assert "tdxcore storm --seed 2 --steps 600" in text and "tdxcore replay seed2.json" in text


def test_run_seed_is_small():
    r = run_seed(0, KW)
    assert len(json.dumps(r)) < 1000


@pytest.mark.long
def test_dask_local_cluster():
    distributed = pytest.importorskip("distributed", reason="the optional dask extra is not installed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        rep = run_campaign(range(4), KW, scheduler=cluster.scheduler_address)
        assert rep.seeds == [0, 1, 2, 3] and rep.ok and rep.scheduler == cluster.scheduler_address
        local = run_campaign(range(4), KW, workers=2)
        assert [r["events_digest"] for r in rep.results] == [r["events_digest"] for r in local.results]
