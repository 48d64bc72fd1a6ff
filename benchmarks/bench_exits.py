"""MapGPA round trips per second through ``vcpu.run`` (issue 7 benchmarks).

Group ``exits.map_gpa``: one round trip is the guest's TDVMCALL<MapGPA> → ``KVM_EXIT_HYPERCALL``
→ userspace converts with ``helpers.handle_memory_conversion`` (KVM_SET_MEMORY_ATTRIBUTES + the
discard QEMU does) → the next ``run()`` completes the call and the guest halts. Rows:
``map_gpa_4k`` (N 4 KiB pages, private → shared), ``map_gpa_2m`` (N_2M 2 MiB ranges, one chunk
each) and the baseline ``bare_run`` (a ``vcpu.run([hlt])`` that exits at once: the cost of a
KVM_RUN round trip with no TDVMCALL). Every round starts from a fresh TD (``pedantic`` setup, not
timed); the guest's statuses and the attributes are checked after timing; ``extra_info`` has
round trips per second.
"""

from __future__ import annotations

import pytest

from tdxcore import guest
from tdxcore.constants import HC, PAGE_SHIFT, Cap, ExitReason, TdvmcallStatus
from tdxcore.kvm import Kvm, helpers
from tdxcore.module.host import Host

SEED = 20261122
BASE = 0x8000_0000
N = 64
N_2M = 8
ROUNDS = 5
MIB2 = 2 << 20


def _td():
    host = Host(packages=1, cpus_per_package=2, memory=96 << 20, seed=SEED)
    td = helpers.td_create(Kvm(host), vcpus=1, memory=N_2M * MIB2, gpa=BASE, initial_pages=1)
    td.vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << HC.MAP_GPA_RANGE)
    return td


def _map_gpa_round_trips(td, gpas, size):
    vm, vcpu = td.vm, td.vcpus[0]
    for gpa in gpas:
        run = vcpu.run([guest.map_gpa(gpa, size, shared=True)])
        helpers.handle_memory_conversion(vm, run)
        vcpu.run()
    return td


def _bare_runs(td, n):
    vcpu = td.vcpus[0]
    for _ in range(n):
        vcpu.run([guest.hlt()])
    return td


def _info(benchmark, row, n, size):
    mean = benchmark.stats.stats.mean if benchmark.stats is not None else None   # --benchmark-disable
    benchmark.extra_info.update({"row": row, "round_trips": n, "size": size, "seed": SEED,
                                 "round_trips_per_s": round(n / mean) if mean else None})


@pytest.mark.benchmark(group="exits.map_gpa")
@pytest.mark.parametrize("row", ["map_gpa_4k", "map_gpa_2m", "bare_run"])
def test_map_gpa_round_trips(benchmark, row):
    """Time N MapGPA round trips (guest → HYPERCALL exit → conversion → completion) or N bare runs."""
    if row == "map_gpa_4k":
        gpas, size = [BASE + 0x1000 * (i + 1) for i in range(N)], 0x1000
        td = benchmark.pedantic(_map_gpa_round_trips, setup=lambda: ((_td(), gpas, size), {}),
                                rounds=ROUNDS, iterations=1)
        n = N
    elif row == "map_gpa_2m":
        gpas, size = [BASE + MIB2 * i for i in range(N_2M)], MIB2
        td = benchmark.pedantic(_map_gpa_round_trips, setup=lambda: ((_td(), gpas, size), {}),
                                rounds=ROUNDS, iterations=1)
        n = N_2M
    else:
        gpas, size = [], 0
        td = benchmark.pedantic(_bare_runs, setup=lambda: ((_td(), N), {}), rounds=ROUNDS, iterations=1)
        n = N
    # checked after timing: every MapGPA succeeded with one exit each, and the range is shared
    vcpu = td.vcpus[0]
    assert vcpu.kvm_run.exit_reason == ExitReason.HLT
    maps = [e for e in vcpu.guest_log if isinstance(e.op, guest.MapGpa)]
    assert len(maps) == len(gpas) and all(e.status == TdvmcallStatus.SUCCESS for e in maps)
    assert vcpu.stats.get("nr_hypercall_exits", 0) == len(gpas)
    for g in gpas:
        assert td.vm.get_memory_attributes(g >> PAGE_SHIFT) == 0
        assert td.vm.get_memory_attributes((g + size - 1) >> PAGE_SHIFT) == 0
    _info(benchmark, row, n, size)
