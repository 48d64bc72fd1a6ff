"""The explorer itself: shortest counterexamples that replay, bounds, splitting, state keys, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.explore import (
    EXPLORE_SCHEMA,
    Execution,
    ExploreConfig,
    explore,
    get_scenario,
    get_variant,
    replay_counterexample,
    write_counterexample,
)
from tdxcore.explore.report import run_schedule, validate_counterexample
from tdxcore.schemas import validate_trace
from tdxcore.storm import ReplayMismatch, replay

CHEAP = ("double_zap", "NO_MIRROR_CLEAR")


def test_shortest_counterexample_is_shortest_and_replays(tmp_path, explored):
    res = explored(*CHEAP)
    v = res.violation
    assert res.verdict == "violated" and v["depth"] == len(v["schedule"])
    # nothing shorter violates: the same search bounded one step below proves it
    shorter = explore(ExploreConfig(*CHEAP, max_steps=v["depth"] - 1))
    assert shorter.verdict == "proven"
    path, trace = tmp_path / "cx.json", tmp_path / "cx.trace.json"
    obj = write_counterexample(res, str(path), trace=str(trace))
    assert obj["schema"] == EXPLORE_SCHEMA and obj["reproduced"] and obj["schedule"] == v["schedule"]
    assert obj["trace_file"] == "cx.trace.json" and obj["replay"] == "tdxcore replay cx.json"
    validate_trace(json.loads(trace.read_text()))
    loaded = json.loads(path.read_text())
    validate_counterexample(loaded)
    for key, bad_value in (("steps", -1), ("schema", "tdxcore.report/1"), ("schedule", ["a"]), ("reduce", 1)):
        with pytest.raises(ValueError, match=f"cx.{key}"):
            validate_counterexample(dict(loaded, **{key: bad_value}))
    again = replay(loaded)                          # tdxcore.storm.replay takes explorer reports
    assert again.violation is not None and again.violation["kind"] == v["kind"]
    assert again.steps == v["depth"] and f"{again.events_digest:#x}" == loaded["events_digest"]
    assert replay_counterexample(loaded).events_digest == again.events_digest
    bad = dict(loaded, events_digest="0x1")
    with pytest.raises(ReplayMismatch):
        replay(bad)
    short = loaded["schedule"][:-1]
    with pytest.raises(ReplayMismatch):
        replay(dict(loaded, schedule=short, steps=len(short), violation=dict(loaded["violation"], depth=len(short))))


def test_cli_explore_and_replay(tmp_path):
    from tdxcore.cli import main

    rep, trace, js = tmp_path / "r.json", tmp_path / "t.json", tmp_path / "f.json"
    assert main(["explore", "double_zap", "--policy", "NO_MIRROR_CLEAR", "--report", str(rep),
                 "--trace", str(trace), "--json", str(js)]) == 1
    assert rep.is_file() and trace.is_file()
    assert json.loads(js.read_text())["result"]["verdict"] == "violated"
    assert main(["replay", str(rep)]) == 1              # the violation reproduces: exit 1 as a storm's
    assert main(["explore", "double_zap", "--max-steps", "6", "--compare"]) == 0
    assert main(["explore", "--list"]) == 0
    assert main(["explore", "no_such_scenario"]) == 2
    assert main(["explore", "double_zap", "--policy", "NO_SUCH_POLICY"]) == 2
    assert main(["explore", "double_zap", "--max-steps", "0"]) == 2
    assert main(["explore"]) == 2


def test_preemption_bound_is_chess_style():
    found = []
    for pb in (0, 1, 2):
        r = explore(ExploreConfig("zap_busy_vs_vcpu_entry", "NO_KICK_ZAP_RETRY", preemption_bound=pb))
        assert not r.reduce                            # sleep sets are off under a preemption bound
        found.append(r.verdict)
        if pb == 0:
            assert r.bound_skipped > 0
    assert found[-1] == "violated"
    # a larger bound never loses a violation a smaller one found
    assert all(a != "violated" or b == "violated" for a, b in zip(found, found[1:]))


def test_split_over_workers_gives_the_same_verdict():
    one = explore(ExploreConfig(*CHEAP))
    two = explore(ExploreConfig(*CHEAP), workers=2, split_depth=2)
    assert two.verdict == one.verdict == "violated" and two.workers == 2
    assert two.violation["depth"] == one.violation["depth"]
    proven = explore(ExploreConfig("double_zap", max_steps=10), workers=2, split_depth=3)
    assert proven.verdict == "proven" and proven.schedules > 0


def test_state_key_is_deterministic_across_builds_and_hash_seeds():
    keys = []
    for _ in range(2):
        ex = Execution(get_scenario("double_zap"), get_variant("LINUX_6_18"))
        ex.replay(["punch", "convert", "punch"])
        keys.append(ex.key(None)[0])
        ex.close()
    assert keys[0] == keys[1]
    code = ("from tdxcore.explore import Execution, get_scenario, get_variant\n"
            "ex = Execution(get_scenario('double_zap'), get_variant('LINUX_6_18'))\n"
            "ex.replay(['punch', 'convert', 'punch']); print(ex.key(None)[0])\n")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        assert int(out.stdout) == keys[0]


def test_independent_local_steps_commute():
    """What the reduction relies on: two local steps of different actors reach one state in either order."""
    checked = 0
    for name in ("mapgpa_chunk_vs_pending_event", "memslot_delete_vs_local_retry", "hkid_release_vs_reclaim"):
        sc, var = get_scenario(name), get_variant("LINUX_6_18")
        frontier = [[]]
        for _ in range(4):
            nxt = []
            for path in frontier:
                base = Execution(sc, var)
                base.replay(path)
                k0, s0, p0 = base.key(None)
                en = base.enabled()
                base.close()
                local = {}
                for a in en:
                    ex = Execution(sc, var)
                    ex.replay(path + [a])
                    k, s, p = ex.key(None)
                    me = ex.names().index(a)
                    local[a] = s == s0 and ex.enabled() == en and all(
                        x == y for i, (x, y) in enumerate(zip(p, p0)) if i != me)
                    ex.close()
                    nxt.append(path + [a])
                pairs = [(a, b) for a in en for b in en if a < b and local[a] and local[b]]
                for a, b in pairs:
                    ends = []
                    for order in ((a, b), (b, a)):
                        ex = Execution(sc, var)
                        ex.replay(path + list(order))
                        ends.append(ex.key(None)[0])
                        ex.close()
                    assert ends[0] == ends[1], (name, path, a, b)
                    checked += 1
            frontier = nxt[:6]
    assert checked > 0


@pytest.mark.parametrize(("kwargs", "exc"), [
    ({"scenario": "nope"}, TdxValueError),
    ({"scenario": 3}, TdxTypeError),
    ({"scenario": "double_zap", "policy": "NOPE"}, TdxValueError),
    ({"scenario": "double_zap", "policy": None}, TdxTypeError),
    ({"scenario": "double_zap", "max_steps": 0}, TdxValueError),
    ({"scenario": "double_zap", "max_steps": -5}, TdxValueError),
    ({"scenario": "double_zap", "max_steps": "9"}, TdxTypeError),
    ({"scenario": "double_zap", "preemption_bound": -1}, TdxValueError),
    ({"scenario": "double_zap", "reduce": "yes"}, TdxTypeError),
])
def test_bad_config_is_refused(kwargs, exc):
    with pytest.raises(exc):
        ExploreConfig(**kwargs)


def test_bad_arguments_are_refused():
    cfg = ExploreConfig("double_zap")
    with pytest.raises(TdxValueError):
        explore(cfg, workers=0)
    with pytest.raises(TdxValueError):
        explore(cfg, workers=2, split_depth=0)
    with pytest.raises(TdxTypeError):
        explore("double_zap")  # type: ignore[arg-type]
    with pytest.raises(TdxValueError):
        run_schedule("double_zap", "LINUX_6_18", ["nobody"])
    with pytest.raises(TdxValueError):
        run_schedule("double_zap", "LINUX_6_18", "punch")
    with pytest.raises(TdxValueError):
        replay_counterexample({"schema": "tdxcore.report/1"})


def test_run_tasks_keeps_the_order_of_its_arguments():
    from tdxcore.storm.campaign import run_tasks

    assert run_tasks(pow, [(2, 3), (3, 2), (5, 1)], workers=2) == [8, 9, 5]
    assert run_tasks(pow, [], workers=2) == []
    with pytest.raises(TdxValueError):
        run_tasks(pow, [(1, 1)], workers=0)
