"""Benchmark of the seeded scheduler's step rate (SPEC §5, §9 "deterministic storm" steps/s).

Group ``scheduler.steps``: ``NR_ACTORS`` trivial actors, each yielding ``PREEMPT``
``NR_YIELDS`` times, driven to completion. ``scheduler`` is :meth:`Scheduler.run` (seeded random
choice among the runnable actors, schedule recorded); ``driver_round_robin`` steps the same
generators with ``sched.Driver`` in a plain round-robin loop (no choice, no recording): the floor
the scheduler's choice is added to. Steps per second = ``extra_info["steps"]`` / time.

Groups ``scheduler.actors`` and ``scheduler.actors_contended``: the cost of
:meth:`Scheduler.run` as the number of actors grows, at a fixed total of ``ACTOR_STEPS`` steps: 8
actors (baseline rows ``actors_8``) against 64. In the first group every actor only yields
PREEMPT: the per-step cost must not grow with the number of actors (the draw is O(actors
waiting), not O(actors)). In the second a quarter of the actors contend for one ``KLock``, as
vCPUs do for ``mmu_lock`` in the storm: every waiting actor is asked at every step, so the cost
grows with how many wait (16 of 64 here against 2 of 8).
"""

from __future__ import annotations

import pytest

from tdxcore.sched import PREEMPT, READ, WRITE, Actor, Driver, KLock, Wait
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
    """Drive NR_ACTORS trivial actors to completion: the scheduler against a round-robin driver."""
    setup, run = (_scheduler_setup, _run_scheduler) if impl == "scheduler" else (_driver_setup, _run_driver)
    steps = benchmark.pedantic(run, setup=setup, rounds=15, iterations=1, warmup_rounds=1)
    assert steps == STEPS
    benchmark.extra_info.update(actors=NR_ACTORS, yields_per_actor=NR_YIELDS, steps=STEPS, seed=SEED)


ACTOR_STEPS = 16_000


def _contender(lock: KLock, n: int, write: bool):
    """Take ``lock`` (WRITE or READ) ``n`` times, holding it across one preemption point."""
    for _ in range(n):
        mode = WRITE if write else READ
        owner = yield Wait(lock, mode)
        yield PREEMPT
        lock.release(owner, mode)


def _actors_setup(n_actors: int, contended: bool):
    s = Scheduler(seed=SEED)
    lock = KLock("mmu_lock")
    per = ACTOR_STEPS // n_actors
    for i in range(n_actors):
        if contended and i % 4 == 0:
            s.add(_contender(lock, per // 2, i % 8 == 0), f"c{i}")
        else:
            s.add(_actor(per), f"a{i}")
    return (s,), {}


def _actors(benchmark, n_actors: int, contended: bool) -> None:
    steps = benchmark.pedantic(_run_scheduler, setup=lambda: _actors_setup(n_actors, contended),
                               rounds=5, iterations=1)
    assert ACTOR_STEPS * 0.9 <= steps <= ACTOR_STEPS * 1.2
    benchmark.extra_info.update(actors=n_actors, steps=steps, seed=SEED, contended=contended)


@pytest.mark.benchmark(group="scheduler.actors")
@pytest.mark.parametrize("n_actors", [8, 64], ids=["actors_8", "actors_64"])
def test_actors(benchmark, n_actors):
    """Scheduler.run of ~ACTOR_STEPS steps over 8 (baseline) or 64 PREEMPT-only actors."""
    _actors(benchmark, n_actors, False)


@pytest.mark.benchmark(group="scheduler.actors_contended")
@pytest.mark.parametrize("n_actors", [8, 64], ids=["actors_8", "actors_64"])
def test_actors_contended(benchmark, n_actors):
    """As ``test_actors`` with a quarter of the actors contending for one lock."""
    _actors(benchmark, n_actors, True)
