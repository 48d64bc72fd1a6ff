"""Issue 11 item 3: every catalogue scenario is proven under LINUX_6_18 within its (small) bound,
and every deliberately broken variant is caught — by the reduced and the unreduced search alike,
with the same shortest violation (item 1: the reduction keeps verdicts and violations)."""

from __future__ import annotations

import pytest

from tdxcore.explore import SCENARIOS, VARIANTS

RACES = {"memslot_delete_vs_local_retry", "zap_busy_vs_vcpu_entry", "conversion_vs_fault_retry", "double_zap",
         "accept_vs_block", "track_vs_vp_enter", "hkid_release_vs_reclaim", "mapgpa_chunk_vs_pending_event"}
CAUGHT = [(s.name, v) for s in SCENARIOS.values() for v in s.catches]


def test_catalogue_names_the_upstream_races():
    assert RACES <= set(SCENARIOS) and len(SCENARIOS) >= 8
    for s in SCENARIOS.values():
        assert s.race and 0 < s.max_steps <= s.long_max_steps
        for v in s.catches:
            assert VARIANTS[v].broken
    # every broken variant guards at least one scenario
    assert {v.name for v in VARIANTS.values() if v.broken} <= {v for _, v in CAUGHT}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_linux_6_18_proves_the_scenario(scenario, explored):
    red = explored(scenario, reduce=True)
    un = explored(scenario, reduce=False)
    for r in (red, un):
        assert r.verdict == "proven", r.violation
        assert r.violation is None and r.violations == 0
        assert r.states > 0 and r.schedules > 0 and r.max_steps == SCENARIOS[scenario].max_steps
    assert red.reduce and not un.reduce and un.sleep_skipped == 0
    # sleep sets prune transitions, never states: both searches visit the same states
    assert red.states == un.states
    assert red.complete + red.truncated == red.schedules


@pytest.mark.parametrize(("scenario", "policy"), CAUGHT, ids=[f"{s}-{v}" for s, v in CAUGHT])
def test_broken_variant_is_caught_by_both_searches(scenario, policy, explored):
    red = explored(scenario, policy, reduce=True)
    un = explored(scenario, policy, reduce=False)
    assert red.verdict == un.verdict == "violated"
    vr, vu = red.violation, un.violation
    assert (vr["kind"], vr["id"], vr["depth"]) == (vu["kind"], vu["id"], vu["depth"])
    assert len(vr["schedule"]) == vr["depth"] <= SCENARIOS[scenario].max_steps
    assert red.states == un.states
