"""Benchmark of the seeded scheduler's step rate (SPEC §5, §9 "deterministic storm" steps/s).

Group ``scheduler.steps``: ``NR_ACTORS`` trivial actors, each yielding ``PREEMPT``
``NR_YIELDS`` times, driven to completion. ``scheduler`` is :meth:`Scheduler.run` (seeded random
choice among the runnable actors, schedule recorded); ``driver_round_robin`` steps the same
generators with ``sched.Driver`` in a plain round-robin loop (no choice, no recording): the floor
the scheduler's choice is added to. Steps per second = ``extra_info["steps"]`` / time.
"""

from __future__ import annotations

import pytest

from tdxcore.sched import PREEMPT, Actor, Driver
from tdxcore.storm import Scheduler

NR_ACTORS = 8
NR_YIELDS = 1000
SEED = 20260522
STEPS = NR_ACTORS * (NR_YIELDS + 1)  # the last step of each actor returns


def _actor(n: int):
    for _ in range(n):
        yield PREEMPT
    return n


def _scheduler_setup():
    s = Scheduler(seed=SEED)
    for i in range(NR_ACTORS):
        s.add(_actor(NR_YIELDS), f"a{i}")
    return (s,), {}


def _run_scheduler(s: Scheduler) -> int:
    s.run()
    return s.nr_steps


def _driver_setup():
    return ([Actor(f"a{i}", _actor(NR_YIELDS)) for i in range(NR_ACTORS)],), {}


def _run_driver(actors) -> int:
    d = Driver()
    live = list(actors)
    while live:
        for a in live:
            d.step(a)
        live = [a for a in live if not a.done]
    return d.nr_steps


@pytest.mark.benchmark(group="scheduler.steps")
@pytest.mark.parametrize("impl", ["scheduler", "driver_round_robin"])
def test_steps(benchmark, impl):
    setup, run = (_scheduler_setup, _run_scheduler) if impl == "scheduler" else (_driver_setup, _run_driver)
    steps = benchmark.pedantic(run, setup=setup, rounds=15, iterations=1, warmup_rounds=1)
    assert steps == STEPS
    benchmark.extra_info.update(actors=NR_ACTORS, yields_per_actor=NR_YIELDS, steps=STEPS, seed=SEED)
