"""EventLog.emit cost per event against a plain ``list.append`` of the same tuple (baseline)."""

from __future__ import annotations

import pytest

from tdxcore.eventlog import EventLog

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
