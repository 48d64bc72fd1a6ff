"""Unit tests of tdxcore.sched (SPEC §5): yields, KLock, the Driver and run_to_completion."""

from __future__ import annotations

import copy
import pickle
from dataclasses import FrozenInstanceError, dataclass
from typing import Any

import pytest

from tdxcore.errors import TdxError, TdxTypeError, TdxValueError
from tdxcore.sched import (
    PREEMPT,
    READ,
    WRITE,
    Actor,
    Driver,
    KLock,
    SchedDeadlock,
    SchedLivelock,
    Wait,
    WaitOutOfGuest,
    run_to_completion,
)


@dataclass
class FakeVcpu:
    in_guest: bool = False


def counter(n: int):
    for _ in range(n):
        yield PREEMPT
    return n * 10


def test_preempt_is_a_singleton():
    assert repr(PREEMPT) == "PREEMPT"
    assert copy.copy(PREEMPT) is PREEMPT and copy.deepcopy(PREEMPT) is PREEMPT
    assert pickle.loads(pickle.dumps(PREEMPT)) is PREEMPT
    assert type(PREEMPT)("PREEMPT") is PREEMPT


def test_preempts_count_steps_and_return_value_propagates():
    d = Driver()
    a = Actor("a", counter(3))
    steps = 0
    while not a.done:
        d.step(a)
        steps += 1
    assert steps == 4 and a.nr_steps == 4 and d.nr_steps == 4     # 3 yields + the return
    assert a.result == 30
    assert run_to_completion(counter(5)) == 50
    assert not d.runnable(a)
    with pytest.raises(TdxValueError, match="actor 'a' is not runnable"):
        d.step(a)


def test_wait_on_free_lock_acquires_and_continues():
    lock = KLock("mmu_lock")
    seen: list[Any] = []

    def op():
        owner = yield Wait(lock, WRITE)
        seen.append(lock.is_held_by(owner, WRITE))
        yield PREEMPT
        lock.release(owner, WRITE)
        return "done"

    assert run_to_completion(op(), name="ioctl") == "done"
    assert seen == [True] and lock.holders() == ()


def test_wait_on_held_lock_deadlocks_synchronously_and_closes_generator():
    lock = KLock("slots_lock")
    assert lock.try_acquire("other", WRITE)
    cleaned = []

    def op():
        try:
            yield Wait(lock, READ)
        finally:
            cleaned.append(True)

    with pytest.raises(SchedDeadlock, match=r"waits for slots_lock \(read\) held by \('other',\)") as ei:
        run_to_completion(op())
    assert isinstance(ei.value, TdxError) and cleaned == [True]
    assert lock.holders() == ("other",)


def test_klock_rw_semantics():
    lock = KLock("mmu_lock")
    assert lock.try_acquire("r1", READ) and lock.try_acquire("r2", READ)
    assert not lock.try_acquire("w", WRITE)
    assert lock.holders() == ("r1", "r2")
    lock.release("r1", READ)
    lock.release("r2", READ)
    assert lock.try_acquire("w", WRITE)
    assert not lock.try_acquire("r1", READ) and not lock.try_acquire("w2", WRITE)
    assert lock.holders() == ("w",)
    with pytest.raises(SchedDeadlock, match="not reentrant"):
        lock.try_acquire("w", READ)
    with pytest.raises(TdxValueError, match=r"'r1' releases mmu_lock \(write\) without holding it"):
        lock.release("r1", WRITE)
    with pytest.raises(TdxValueError, match=r"mode='shared' must be 'read' or 'write'"):
        lock.try_acquire("x", "shared")
    with pytest.raises(TdxValueError, match="owner=None"):
        lock.try_acquire(None, READ)
    with pytest.raises(TdxValueError, match=r"mode='exclusive'"):
        Wait(lock, "exclusive")
    lock.release("w", WRITE)
    assert lock.holders() == () and "KLock('mmu_lock'" in repr(lock)


def test_two_actors_contend_via_driver_step():
    lock = KLock("mmu_lock")
    log: list[str] = []

    def op(name: str):
        owner = yield Wait(lock, WRITE)
        log.append(f"{name}+")
        yield PREEMPT                       # holds the lock across a preemption point
        log.append(f"{name}-")
        lock.release(owner, WRITE)
        return name

    d = Driver()
    a, b = Actor("a", op("a")), Actor("b", op("b"))
    d.step(a)                               # a yields Wait
    d.step(b)                               # b yields Wait
    d.step(a)                               # a takes the lock, yields PREEMPT
    assert lock.is_held_by(a, WRITE)
    assert not d.runnable(b)                # b waits on a
    with pytest.raises(TdxValueError, match="not runnable"):
        d.step(b)
    d.step(a)                               # a releases and returns
    assert a.done and a.result == "a"
    assert d.runnable(b)
    d.step(b)
    d.step(b)
    assert b.done and b.result == "b"
    assert log == ["a+", "a-", "b+", "b-"]


def test_wait_out_of_guest():
    v0, v1 = FakeVcpu(False), FakeVcpu(True)

    def kick():
        got = yield WaitOutOfGuest([v0, v1])
        return got

    w = WaitOutOfGuest([v0])
    assert w.vcpus == (v0,)
    with pytest.raises(FrozenInstanceError):
        w.vcpus = ()  # type: ignore[misc]
    with pytest.raises(SchedDeadlock, match="vCPUs still in the guest"):
        run_to_completion(kick())
    d = Driver()
    a = Actor("zap", kick())
    d.step(a)
    assert not d.runnable(a)
    v1.in_guest = False                     # the vCPU exits (another actor would do this)
    assert d.runnable(a)
    d.step(a)
    assert a.done and a.result is None


def test_exceptions_propagate_unchanged():
    class Boom(Exception):
        pass

    err = Boom("x")

    def op():
        yield PREEMPT
        raise err

    with pytest.raises(Boom) as ei:
        run_to_completion(op())
    assert ei.value is err
    d = Driver()
    a = Actor("a", op())
    d.step(a)
    with pytest.raises(Boom):
        d.step(a)
    assert a.done and not d.runnable(a)


def test_max_steps_livelock():
    def spin():
        while True:
            yield PREEMPT

    with pytest.raises(SchedLivelock, match=r"more than max_steps=100 steps"):
        run_to_completion(spin(), max_steps=100)
    assert run_to_completion(counter(99), max_steps=100) == 990   # 100 steps exactly is fine


def test_bad_yield_and_bad_gen():
    def op():
        yield 42

    with pytest.raises(TdxTypeError, match=r"actor 'sync' yielded 42: expected PREEMPT"):
        run_to_completion(op())
    with pytest.raises(TdxTypeError, match=r"gen=3 must be a generator"):
        run_to_completion(3)  # type: ignore[arg-type]


def test_self_deadlock_on_reentry():
    lock = KLock("kvm->lock")

    def op():
        yield Wait(lock, WRITE)
        yield Wait(lock, WRITE)

    with pytest.raises(SchedDeadlock, match="not reentrant"):
        run_to_completion(op())
