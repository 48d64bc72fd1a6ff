"""EventLog costs per event (SPEC §9: a cheap event log).

Group ``eventlog.emit``: :meth:`EventLog.emit` of N ``seamcall_begin`` events against a plain
``list.append`` of the same tuple (baseline ``list``). Group ``eventlog.digest``: the digest of N
fresh events of the storm's shapes (flat ints/strs/None and register tuples) by
:meth:`EventLog.digest` against the reference encoding it must equal — blake2b over
:func:`encode_event` of each event (baseline ``encode_event``); the two values are compared
after timing.
"""

from __future__ import annotations

import hashlib

import pytest

from tdxcore.eventlog import EventLog, encode_event

N = 10_000
ARGS = (6, 1, (0x10000 | 0, 0x5000, 0x300, 0, 0, 0), 0x10, 0x300)


def _emit(log: EventLog) -> int:
    emit = log.emit
    for _ in range(N):
        emit("seamcall_begin", "vcpu0", *ARGS)
    return len(log)


def _append(lst: list) -> int:
    append = lst.append
    for _ in range(N):
        append(("seamcall_begin", "vcpu0") + ARGS)
    return len(lst)


@pytest.mark.benchmark(group="eventlog.emit")
@pytest.mark.parametrize("impl", ["eventlog", "list"])
def test_emit(benchmark, impl):
    """Emit N seamcall_begin events; baseline appends the same tuple to a list."""
    benchmark.extra_info.update(events_per_round=N, kind="seamcall_begin")
    if impl == "eventlog":
        n = benchmark.pedantic(_emit, setup=lambda: ((EventLog(),), {}), rounds=20)
    else:
        n = benchmark.pedantic(_append, setup=lambda: (([],), {}), rounds=20)
    assert n == N


def _digest_log() -> EventLog:
    log = EventLog()
    log.register_kind("td_exit", ("leaf", "cpu", "tdvpr", "epoch", "reason", "gfn"), "seamcall")
    for i in range(N):
        if i % 3 == 0:
            log.emit("seamcall_begin", f"vcpu{i % 8}", 6, i % 4, (i << 12, 0x5000, 0x300, 0, 0, 0), i, None)
        elif i % 3 == 1:
            log.emit("seamcall_end", f"vcpu{i % 8}", 6, i % 4, 0, (0, 0, 0, 0, 0, 0), i, 0x300 + i)
        else:
            log.emit("td_exit", f"vcpu{i % 8}", 0, i % 4, 0x5000, 3, 48, None)
    return log


def _digest(log: EventLog) -> int:
    return log.digest()


def _reference(log: EventLog) -> int:
    h = hashlib.blake2b(digest_size=8, person=b"tdxevents")
    h.update(b"".join(encode_event(e) for e in log))
    return int.from_bytes(h.digest(), "little")


@pytest.mark.benchmark(group="eventlog.digest")
@pytest.mark.parametrize("impl", ["eventlog", "encode_event"])
def test_digest(benchmark, impl):
    """Digest N fresh events; baseline: blake2b over encode_event of each (the reference)."""
    benchmark.extra_info.update(events_per_round=N)
    run = _digest if impl == "eventlog" else _reference
    value = benchmark.pedantic(run, setup=lambda: ((_digest_log(),), {}), rounds=10)
    assert value == _reference(_digest_log())
