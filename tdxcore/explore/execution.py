"""One run of a scenario from its start: build, step, check, hash, close (the explorer's unit of work).

:class:`Execution` drives a scenario's actors through a seeded
:class:`~tdxcore.storm.scheduler.Scheduler` one step at a time, checks the state after each step
(the step's exception, ``check_invariants``, the scenario's property, a livelock, a deadlock; once
every actor is done, the scenario's final check) and computes the state key
(:class:`~tdxcore.explore.state.StateView`). The search (:mod:`tdxcore.explore.engine`) builds a
new one for every branch; the counterexample replay (:mod:`tdxcore.explore.report`) uses one too.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from tdxcore.errors import InvariantViolation, TdxValueError
from tdxcore.explore.scenarios import Scenario, World
from tdxcore.explore.state import StateView
from tdxcore.explore.variants import Variant
from tdxcore.invariants import check_invariants
from tdxcore.storm.scheduler import Scheduler

__all__ = ["Execution", "StepOut", "LIVELOCK_STEPS"]

#: Steps one actor may take alone while every other live actor is blocked before it is a livelock.
LIVELOCK_STEPS = 10


class StepOut(NamedTuple):
    """What one step produced: a violation, or the new state's key, digests and runnable actors."""

    violation: Optional[Dict[str, Any]]
    key: int
    shared: int
    privs: Tuple[int, ...]
    enabled: List[str]
    all_done: bool


class Execution:
    """One run of a scenario from its start: build, step, check, hash, close.

    Parameters
    ----------
    scenario : Scenario
        What to build.
    variant : Variant
        The policy and hooks to build it with.
    """

    def __init__(self, scenario: Scenario, variant: Variant, world: Optional[World] = None) -> None:
        self.scenario = scenario
        self.variant = variant
        self.world = scenario.build(variant) if world is None else world
        self.sched = Scheduler(seed=0)
        pairs = []
        for name, gen, vcpu in self.world.actors:
            pairs.append((self.sched.add(gen, name), vcpu))
        self.actors = [a for a, _ in pairs]
        self.view = StateView(self.world.host, self.world.kvms, pairs)
        self.starve = 0
        self.closed = False

    # ------------------------------------------------------------------ stepping
    def enabled(self) -> List[str]:
        """Names of the actors that can step now, in add order."""
        return [a.name for a in self.sched.runnable()]

    @property
    def all_done(self) -> bool:
        """Whether every actor has finished."""
        return all(a.done for a in self.actors)

    def step(self, name: str) -> Optional[Dict[str, Any]]:
        """Advance ``name`` by one step; return a violation dict if the step raised."""
        a = self.sched.actor(name)
        err: Optional[Dict[str, Any]] = None
        try:
            self.sched.step(a)
        except InvariantViolation as e:
            err = {"kind": "invariant", "id": e.invariant, "message": str(e)}
        except Exception as e:   # noqa: BLE001 - any exception out of an actor is a verdict
            err = {"kind": "exception", "id": type(e).__name__, "message": f"{name}: {e}"}
        live = [x for x in self.actors if not x.done]
        ready = [x for x in live if x.waiting_on is None or self.sched._driver.runnable(x)]
        self.starve = self.starve + 1 if len(ready) == 1 and len(live) > 1 else 0
        return err

    def check(self) -> Optional[Dict[str, Any]]:
        """Check the state after a step: invariants, the scenario property, livelock, deadlock."""
        try:
            check_invariants(self.world.host)
        except InvariantViolation as e:
            return {"kind": "invariant", "id": e.invariant, "message": str(e)}
        if self.world.check is not None:
            msg = self.world.check(self.world)
            if msg:
                return {"kind": "property", "id": self.scenario.name, "message": msg}
        if self.starve > LIVELOCK_STEPS:
            live = [a for a in self.actors if not a.done]
            ready = [a.name for a in live if self.sched._driver.runnable(a)]
            blocked = [a.name for a in live if a.name not in ready]
            msg = (f"livelock: {', '.join(ready)} ran alone for {self.starve} steps while "
                   f"{', '.join(blocked)} stayed blocked")
            return {"kind": "livelock", "id": "livelock", "message": msg}
        if not self.all_done and not self.enabled():
            return {"kind": "deadlock", "id": "deadlock", "message": f"deadlock: {self.sched._waiting()}"}
        return None

    def final(self) -> Optional[Dict[str, Any]]:
        """Once every actor is done: the scenario's final check (teardown, leaks), then invariants."""
        try:
            msg = self.world.final(self.world) if self.world.final is not None else None
            if msg:
                return {"kind": "property", "id": self.scenario.name, "message": msg}
            check_invariants(self.world.host)
        except InvariantViolation as e:
            return {"kind": "invariant", "id": e.invariant, "message": str(e)}
        except Exception as e:   # noqa: BLE001
            return {"kind": "exception", "id": type(e).__name__, "message": f"final check: {e}"}
        return None

    def key(self, last: Optional[str]) -> Tuple[int, int, Tuple[int, ...]]:
        """``(state key, shared digest, per-actor private digests)``; ``last`` joins the key if given."""
        extra = f"{self.starve}|{'' if last is None else last}".encode()
        return self.view.key(extra)

    def advance(self, name: str, last: Optional[str]) -> StepOut:
        """Step ``name`` and describe the state reached (what the search needs from one step)."""
        v = self.step(name)
        if v is not None:
            return StepOut(v, 0, 0, (), [], False)
        key, shared, privs = self.key(last)
        return StepOut(None, key, shared, privs, self.enabled(), self.all_done)

    def names(self) -> List[str]:
        """Actor names in add order."""
        return [a.name for a in self.actors]

    def prepare(self, path: List[str],
                with_last: bool) -> Tuple[Optional[Dict[str, Any]], StepOut, int, Optional[str]]:
        """Replay ``path`` counting its preemptions; return (violation, state, preemptions, last actor)."""
        n, last = 0, None
        for name in path:
            if last is not None and name != last and last in self.enabled():
                n += 1
            self.replay([name])
            last = name
        key, shared, privs = self.key(last if with_last else None)
        v = self.check()
        if v is None and self.all_done:
            v = self.final()
        return v, StepOut(None, key, shared, privs, self.enabled(), self.all_done), n, last

    def replay(self, path: List[str]) -> None:
        """Step ``path`` without checks (a prefix the search has already checked)."""
        for name in path:
            if self.step(name) is not None:      # pragma: no cover - the model is deterministic
                msg = f"replay of a checked prefix raised at {name!r}: the scenario is not deterministic"
                raise TdxValueError(msg, name="scenario", value=self.scenario.name)

    # ------------------------------------------------------------------ cleanup
    def close(self) -> None:
        """Close every unfinished actor and give back a global lock one of them holds."""
        if self.closed:
            return
        self.closed = True
        for a in self.actors:
            if not a.done:
                try:
                    a.gen.close()
                except Exception:   # noqa: BLE001, S110 - the execution is being thrown away
                    pass
        from tdxcore.kvm.tdx_vm import tdx_lock
        from tdxcore.sched import READ, WRITE

        for h in tdx_lock.holders():
            if any(h is a for a in self.actors):
                tdx_lock.release(h, WRITE if tdx_lock.is_held_by(h, WRITE) else READ)
