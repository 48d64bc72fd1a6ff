"""Larger bounds (``-m long``): every scenario at its long bound, reduced and unreduced agree."""

from __future__ import annotations

import pytest

from tdxcore.explore import SCENARIOS, ExploreConfig, explore

pytestmark = pytest.mark.long

CASES = [(s.name, p) for s in SCENARIOS.values() for p in ("LINUX_6_18", *s.catches)]


@pytest.mark.parametrize(("scenario", "policy"), CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_long_bound(scenario, policy):
    ms = SCENARIOS[scenario].long_max_steps
    red = explore(ExploreConfig(scenario, policy, max_steps=ms, reduce=True))
    un = explore(ExploreConfig(scenario, policy, max_steps=ms, reduce=False))
    assert red.verdict == un.verdict == ("proven" if policy == "LINUX_6_18" else "violated")
    assert red.states == un.states
    if red.violation is not None:
        assert red.violation["depth"] == un.violation["depth"]
