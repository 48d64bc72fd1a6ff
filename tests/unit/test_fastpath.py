"""The hot paths' fast forms give the same answers as the plain ones (issue 9 item 2).

Each lean path (EventLog.emit's type test and digest's unrolled encoder, the memslot index, the
cached ``Wait`` objects, the driver's inline lock test, the SRCU reader dict, the shared
``SeamcallResult`` construction, the int stand-ins for enums) is checked against the slower
reference it replaces, on seeded or hypothesis-drawn inputs.
"""

from __future__ import annotations

import enum
import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxcore.errors import TdxTypeError, TdxValueError, check_int
from tdxcore.eventlog import EventLog, encode_event
from tdxcore.kvm import tdx_mmu
from tdxcore.kvm import vcpu as vcpu_mod
from tdxcore.kvm.memslot import Memslot, Memslots
from tdxcore.kvm.tdx_vm import TdState
from tdxcore.module.tdx_module import SeamcallResult, result
from tdxcore.sched import PREEMPT, READ, WRITE, Actor, Driver, KLock, SchedDeadlock, Srcu, Wait
from tdxcore.status import Leaf, TdxStatus
from tdxcore.storm import Scheduler


class _Color(enum.IntEnum):
    RED = 3


_leaf = st.one_of(st.none(), st.integers(-(1 << 70), 1 << 70), st.text(max_size=8),
                  st.sampled_from([True, False, _Color.RED, Leaf.TDH_MEM_PAGE_AUG, TdxStatus(0x92)]))
_field = st.recursive(_leaf, lambda inner: st.tuples(inner, inner) | st.tuples(inner, inner, inner)
                      | st.tuples(), max_leaves=8)


def _reference_digest(events) -> int:
    h = hashlib.blake2b(digest_size=8, person=b"tdxevents")
    h.update(b"".join(encode_event(e) for e in events))
    return int.from_bytes(h.digest(), "little")


@settings(max_examples=40)
@given(st.lists(st.tuples(st.sampled_from(["vcpu0", "host", "ü"]), _field, _field), max_size=30),
       st.integers(0, 30))
def test_digest_is_encode_event_over_every_event(rows, cut):
    log = EventLog()
    log.register_kind("x", ("a", "b"))
    for i, (actor, a, b) in enumerate(rows):
        log.emit("x", actor, a, b)
        if i == cut:
            assert log.digest() == _reference_digest(list(log))     # incremental: same value
    assert log.digest() == _reference_digest(list(log))
    assert list(log) == [("x", actor, a, b) for actor, a, b in rows]


@pytest.mark.parametrize("bad", [1.5, [1], b"x", (1, 2.0), ((1, (None, 0.5)),), (1, [2])])
def test_emit_refuses_a_bad_field_and_appends_nothing(bad):
    log = EventLog()
    log.emit("cpu", "host", 1, 0, 1)
    with pytest.raises(TdxTypeError):
        log.emit("cpu", "host", bad, 0, 1)
    with pytest.raises(TdxTypeError):
        log.emit("seamcall_begin", "vcpu0", 6, 0, (1, 2, 3, 0, 0, bad), None, None)
    assert len(log) == 1


def test_emit_checks_kind_arity_and_actor_first():
    log = EventLog()
    with pytest.raises(TdxValueError):
        log.emit("nope", "host")
    with pytest.raises(TdxValueError):
        log.emit("cpu", "host", 1, 0)
    with pytest.raises(TdxTypeError):
        log.emit("cpu", 7, 1, 0, 1)
    log.register_kind("late", ("v",))
    assert log.emit("late", "host", _Color.RED) == 0 and log[0][2] is _Color.RED
    assert len(log) == 1


def _linear(slots, gfn, as_id=0):
    for s in slots.values():
        if s.as_id == as_id and s.base_gfn <= gfn < s.end_gfn:
            return s
    return None


def test_memslot_index_matches_a_linear_scan():
    rng = random.Random(9)
    ms = Memslots()
    ids = 0
    for _ in range(400):
        op = rng.random()
        live = list(ms._slots.values())
        if op < 0.4 or not live:
            ids += 1
            as_id, base, n = rng.randrange(2), rng.randrange(0, 4096, 16), rng.randrange(1, 64)
            new = Memslot(as_id, ids, base, n, 0, 0)
            if all(s.as_id != as_id or s.end_gfn <= base or base + n <= s.base_gfn for s in live):
                ms._install(new)
        elif op < 0.6:
            ms._remove(rng.choice(live))
        elif op < 0.7:
            s = rng.choice(live)                      # MOVE rebases in place, then says so
            base = rng.randrange(0, 4096, 16)
            if all(o is s or o.as_id != s.as_id or o.end_gfn <= base or base + s.npages <= o.base_gfn
                   for o in live):
                s.base_gfn = base
                ms._moved()
        for _ in range(8):
            g, a = rng.randrange(-4, 4200), rng.randrange(3)
            assert ms.gfn_to_memslot(g, a) is _linear(ms._slots, g, a)


def test_cached_waits_equal_fresh_ones():
    lock = KLock("mmu_lock")
    assert lock.wait_read == Wait(lock, READ) and hash(lock.wait_read) == hash(Wait(lock, READ))
    assert lock.wait_write == Wait(lock, WRITE) and lock.wait_write is lock.wait_write
    assert lock.wait_read != Wait(KLock("mmu_lock"), READ)


def _parked(lock, mode):
    def gen():
        owner = yield Wait(lock, mode)
        lock.release(owner, mode)
    a = Actor("a", gen())
    Driver().step(a)
    return a


@pytest.mark.parametrize("mode", [READ, WRITE])
@pytest.mark.parametrize("held", ["free", "read_other", "write_other", "read_self", "write_self"])
def test_runnable_agrees_with_can_acquire(mode, held):
    lock = KLock("l")
    a = _parked(lock, mode)
    other = Actor("o", iter(()))                     # type: ignore[arg-type]
    owner, how = (a if held.endswith("self") else other), (READ if held.startswith("read") else WRITE)
    if held != "free":
        assert lock.try_acquire(owner, how)
    d = Driver()
    if held.endswith("self"):
        with pytest.raises(SchedDeadlock):
            d.runnable(a)
        with pytest.raises(SchedDeadlock):
            lock.can_acquire(a, mode)
    else:
        assert d.runnable(a) == lock.can_acquire(a, mode)


def test_srcu_readers_end_in_any_order():
    s = Srcu("srcu")
    t = [s.read_lock() for _ in range(4)]
    s.read_unlock(t[1])
    s.read_unlock(t[1])                              # twice: still one section fewer
    assert s.nr_readers == 3
    w = next(s.synchronize())
    assert w.vcpus == (t[0], t[2], t[3]) and all(r.in_guest for r in w.vcpus)
    for r in (t[3], t[0], t[2]):
        s.read_unlock(r)
    assert s.nr_readers == 0 and list(s.synchronize()) == []


@pytest.mark.parametrize("status", [0, 0x8000020000000092, 1 << 63, 0xC000030000000000])
def test_result_with_outputs_is_the_dataclass(status):
    a = result(status, 1, 2, 3, 4, 5, 6)
    b = SeamcallResult(TdxStatus(status), 1, 2, 3, 4, 5, 6)
    assert a == b and hash(a) == hash(b) and repr(a) == repr(b) and a.out == b.out
    assert type(a.status) is TdxStatus and result(status, 1).status is result(status, 2).status
    with pytest.raises(AttributeError):
        a.rcx = 9                                    # type: ignore[misc]
    with pytest.raises(TdxValueError):
        result(1 << 65, 1)


def test_int_stand_ins_equal_their_enums():
    assert vcpu_mod._TD_RUNNABLE == TdState.RUNNABLE == tdx_mmu._TD_RUNNABLE


def test_check_int_fast_path_keeps_every_rule():
    assert check_int("x", 5, 0, 10) == 5 and check_int("x", _Color.RED, 0, 10) == 3
    for bad, exc in ((True, TdxTypeError), (10, TdxValueError), (-1, TdxValueError), (1.0, TdxTypeError)):
        with pytest.raises(exc):
            check_int("x", bad, 0, 10)


def _reference_choose(sched, rng):
    live = [a for a in sched._actors if not a.done]
    if not live:
        return None
    ready = [a for a in live if a.waiting_on is None or sched._driver.runnable(a)]
    return ready[rng.randrange(len(ready))] if len(ready) > 1 else ready[0]


def test_choose_draws_what_the_reference_draws():
    lock = KLock("l")

    def locker(n):
        for _ in range(n):
            owner = yield lock.wait_write
            yield PREEMPT
            lock.release(owner, WRITE)

    def reader(n):
        for _ in range(n):
            owner = yield lock.wait_read
            lock.release(owner, READ)
            yield PREEMPT

    s = Scheduler(seed=3)
    for i in range(6):
        s.add(locker(5 + i) if i % 2 else reader(4 + i), f"a{i}")
    twin = random.Random()
    while True:
        twin.setstate(s._rng.getstate())
        want = _reference_choose(s, twin)
        got = s.choose()
        assert got is want
        if got is None:
            break
        s.step(got)
