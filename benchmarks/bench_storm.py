"""Throughput of the default fault storm against SPEC §9 (50,000 steps/s, 20,000 SEAMCALLs/s).

The SPEC §9 target holds for invariants every 1,000 steps.

Group ``storm.default``: the default storm (8 vCPUs, mix ``all``, 5% BUSY, ``LINUX_6_18``, seed
``SEED``) for ``STEPS`` scheduler steps, with invariants after ``every_step`` or
``every_1000`` steps, against the ``no_interleave`` baseline (``--no-interleave``, invariants every
1,000: each operation runs to completion, so no conflict, no retry). A round is one
:func:`~tdxcore.storm.run_storm` call, which builds its host and TD first (``extra_info``
``build_seconds``, measured once with ``steps=0``, is that fixed cost); ``extra_info`` also holds
steps (storm + drain), SEAMCALLs, events, and the storm loop's own rates (``loop_steps_per_s``,
``loop_seamcalls_per_s``, from the report's ``seconds``, which excludes the build).
"""

from __future__ import annotations

import time

import pytest

from tdxcore.storm import StormConfig, run_storm

SEED = 20261122
STEPS = 5_000
IMPLS = {"every_step": {"check_every": 1}, "every_1000": {"check_every": 1000},
         "no_interleave": {"check_every": 1000, "interleave": False},
         "threaded": {"check_every": 1000, "threads": True}}
_BUILD: dict = {}


def _build_seconds() -> float:
    if "s" not in _BUILD:
        t = time.perf_counter()
        run_storm(StormConfig(steps=0, seed=SEED, check_every=0))
        _BUILD["s"] = time.perf_counter() - t
    return _BUILD["s"]


@pytest.mark.benchmark(group="storm.default")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_storm(benchmark, impl):
    """Time one default storm of STEPS steps (``impl``: invariant cadence / no interleave)."""
    cfg = StormConfig(steps=STEPS, seed=SEED, **IMPLS[impl])
    build = _build_seconds()
    reps = []

    def run() -> None:
        reps.append(run_storm(cfg))

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    rep = reps[-1]
    assert rep.violation is None and rep.clean
    if not cfg.threads:                                       # threaded mode is not replayable
        assert len({r.events_digest for r in reps}) == 1        # deterministic: every round the same storm
    steps = rep.steps + rep.drain_steps
    calls = int(rep.counters.get("nr_seamcalls_total", 0))
    loop = min(r.seconds for r in reps)
    benchmark.extra_info.update({"steps": steps, "seamcalls": calls, "events": rep.nr_events,
                                 "check_every": cfg.check_every, "interleave": cfg.interleave,
                                 "vcpus": cfg.vcpus, "mix": cfg.mix, "busy": cfg.busy, "policy": cfg.policy,
                                 "build_seconds": round(build, 4),
                                 "loop_steps_per_s": round(steps / loop),
                                 "loop_seamcalls_per_s": round(calls / loop)})
