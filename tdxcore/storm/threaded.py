"""Threaded mode (SPEC §5, ``--threads``): the storm's generators driven by OS threads.

One thread per actor advances its generator one yield at a time. A model step runs under one
``threading.Condition`` (the model's Python objects are not thread-safe; the Cython cores' own
locks are C atomics regardless), and every wait is a real blocking wait on that condition
variable: ``Wait(lock, mode)`` until the KVM lock can be taken, ``WaitOutOfGuest`` until the
kicked vCPUs left the guest. Which thread runs next is up to the OS scheduler, so a threaded storm
is **not replayable**; its report says so, and invariants are checked at quiescence (when every
thread has stopped), not after every step.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List

from tdxcore.sched import Actor, Driver, SchedDeadlock

__all__ = ["run_threaded", "DEADLOCK_TIMEOUT"]

#: Seconds every live thread may wait with nothing runnable before the run is a deadlock.
DEADLOCK_TIMEOUT = 10.0
#: Steps one thread may take in a row before it yields the GIL to the others.
RUN_LEN = 4


def run_threaded(actors: List[Actor], *, steps: int, on_budget: Callable[[], None],
                 max_steps: int = 10_000_000) -> Dict[str, Any]:
    """Drive ``actors`` on one OS thread each until all are done; return the step counts.

    Parameters
    ----------
    actors : list of Actor
        Unstarted actors (generators yielding PREEMPT / Wait / WaitOutOfGuest).
    steps : int
        After this many steps (all threads together) ``on_budget()`` is called once — the storm
        sets its stop flag there — and the actors are left to finish.
    on_budget : callable
        See ``steps``.
    max_steps : int
        Livelock bound on the total.

    Raises
    ------
    SchedDeadlock
        No thread could advance for :data:`DEADLOCK_TIMEOUT` seconds.
    BaseException
        The first exception an actor raised (the other threads are stopped first).
    """
    driver = Driver(max_steps)
    cond = threading.Condition()
    state: Dict[str, Any] = {"steps": 0, "budget_hit": False, "error": None, "last": None, "run": 0}
    errors: List[BaseException] = []

    def body(actor: Actor) -> None:
        try:
            while True:
                with cond:
                    if state["error"] is not None:
                        return
                    while not actor.done and not driver.runnable(actor):
                        if not cond.wait(timeout=DEADLOCK_TIMEOUT):
                            msg = f"threaded storm: {actor.name!r} waits on {actor.waiting_on!r} for ever"
                            raise SchedDeadlock(msg)
                        if state["error"] is not None:
                            return
                    if actor.done:
                        return
                    driver.step(actor)
                    state["steps"] += 1
                    # Fairness: a released Condition is re-taken by the thread that holds the GIL, so
                    # a vCPU spinning on BUSY could run VP_ENTER_MAX_BUSY retries before the op's
                    # holder is scheduled (a false KVM_BUG). A thread that stepped RUN_LEN times in a
                    # row gives up the GIL once.
                    if state["last"] is actor:
                        state["run"] += 1
                    else:
                        state["last"], state["run"] = actor, 1
                    handoff = state["run"] >= RUN_LEN
                    if handoff:
                        state["run"] = 0
                    if not state["budget_hit"] and state["steps"] >= steps:
                        state["budget_hit"] = True
                        on_budget()
                    cond.notify_all()
                    if actor.done:
                        return
                if handoff:
                    time.sleep(0)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            with cond:
                errors.append(e)
                state["error"] = e
                cond.notify_all()

    threads = [threading.Thread(target=body, args=(a,), name=f"storm:{a.name}", daemon=True) for a in actors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if not state["budget_hit"]:
        on_budget()
    return {"steps": state["steps"]}
