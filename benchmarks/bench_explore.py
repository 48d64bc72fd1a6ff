"""States per second of the exhaustive explorer, with the unreduced search as the baseline row.

Group ``explore.<scenario>`` for three catalogue scenarios (two races and the control
``independent_vcpu_reads``, whose in-guest reads are local steps) at their default bound under
``LINUX_6_18``: the ``unreduced`` row (state caching only: the baseline) and the ``reduced`` row
(state caching + sleep sets). A round is one :func:`~tdxcore.explore.explore` call: every branch
re-builds the scenario (host bring-up, TD creation) and replays its prefix, so wall time is
dominated by those re-executions. ``extra_info``: states, transitions, pruned, sleep-skipped,
re-executions, ``states_per_s`` (best round) and, in the reduced row when the unreduced row ran
first in the session, ``reduction_states`` and ``reduction_transitions`` (unreduced / reduced).
Both searches must reach the same verdict and the same number of states (checked after timing).
"""

from __future__ import annotations

import pytest

from tdxcore.explore import ExploreConfig, explore

SCENARIOS = ("track_vs_vp_enter", "hkid_release_vs_reclaim", "independent_vcpu_reads")
_UNREDUCED: dict = {}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("impl", ["unreduced", "reduced"])
def test_explore(benchmark, scenario, impl):
    """Explore ``scenario`` under LINUX_6_18 at its default bound, reduced or not."""
    benchmark.group = f"explore.{scenario}"
    cfg = ExploreConfig(scenario, reduce=impl == "reduced")
    results = []

    def run() -> None:
        results.append(explore(cfg))

    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    res = results[-1]
    assert res.verdict == "proven"
    assert len({(r.states, r.transitions) for r in results}) == 1         # deterministic
    best = min(r.seconds for r in results)
    info = {"scenario": scenario, "policy": cfg.policy, "max_steps": res.max_steps, "reduce": res.reduce,
            "states": res.states, "transitions": res.transitions, "pruned": res.pruned,
            "sleep_skipped": res.sleep_skipped, "executions": res.executions,
            "states_per_s": round(res.states / best, 1)}
    if impl == "unreduced":
        _UNREDUCED[scenario] = res
    elif scenario in _UNREDUCED:
        un = _UNREDUCED[scenario]
        assert un.states == res.states and un.verdict == res.verdict
        info["reduction_states"] = round(un.states / res.states, 3)
        info["reduction_transitions"] = round(un.transitions / res.transitions, 3)
    benchmark.extra_info.update(info)
