"""TD lifecycle and teardown benchmarks (issue 5; SPEC §9 last row).

Group ``lifecycle.td`` — TDs per second through the public ioctl methods, each cycle on the same
host: ``create_destroy`` (baseline: KVM_CREATE_VM + KVM_TDX_INIT_VM + one vCPU + INIT_VCPU, then
close: the full 6.18 teardown, no finalize), ``create_finalize_destroy`` (the same plus
KVM_TDX_FINALIZE_VM) and ``create_populate_finalize_destroy`` (plus a memslot, a guest_memfd and
16 unmeasured initial pages via KVM_TDX_INIT_MEM_REGION, zapped at teardown). ``CYCLES`` per
round; the host (module enabled) is built in setup, untimed.

Group ``teardown.private`` — tearing down a TD with ``PAGES`` private pages mapped (populated
before finalize, untimed): ``dynamic`` (baseline, 6.18: close the guest_memfd while RUNNABLE →
BLOCK + TRACK + kick + REMOVE + WBINVD per page, then destroy) vs ``terminate`` (the opt-in
KVM_TDX_TERMINATE_VM, then close → one PAGE.RECLAIM per page, then destroy). Timed: terminate
(if any) + every close. Building 1 GiB (262144 pages) costs ≈ 20 s per round and its dynamic
teardown ≈ 25 s, so the default is ``PAGES`` = 16384 (64 MiB) and ``extra_info`` extrapolates the
measured per-page cost linearly to 1 GiB and 16 GiB (teardown is one loop over the pages: no
term grows faster); set ``TDXCORE_BENCH_TEARDOWN_PAGES=262144`` to measure 1 GiB directly.
``extra_info`` has the exact SEAMCALL counts per leaf of the timed teardown and, on the
``terminate`` row, the dynamic/terminate time ratio (upstream measured ≈ 12× at 400 GB; the
model has no IPI, TLB-flush or cache-flush cost, so its ratio is the SEAMCALL-work ratio).
This group builds page by page (PAGE.ADD), so it caps ``PAGES`` at 262144.

Group ``teardown.scale`` (SPEC §9 last row) — TDs built with the batch map
(:func:`tdxcore.kvm.tdx_batch.map_private_range`, pages AUGed, left PENDING: no per-page frame
contents, as a lazily accepted TD), untimed: ``dynamic_per_page`` (baseline: the 6.18 per-page
zap while RUNNABLE, at ``DYN_PAGES`` = min(``PAGES``, 1 GiB)), ``terminate_per_page`` (the
extension's one RECLAIM per page, same size) and ``terminate_batch`` (KVM_TDX_TERMINATE_VM, then
the batch reclaim: one PAMT core call per 2^20 pages, one event per batch) at ``PAGES``. Set
``TDXCORE_BENCH_TEARDOWN_PAGES=16777216`` for the 64 GiB TD (≈ 1.4 GB peak RSS, ≈ 10 s a round;
one round). ``extra_info``: per-page cost, the per-page rows extrapolated linearly to ``PAGES``
and to 64 GiB, the batch row's map time, peak RSS (``ru_maxrss`` of the process) and RSS growth
of the build, and dynamic-extrapolated / batch ratio.
"""

from __future__ import annotations

import os
import resource
import time
from collections import Counter
from typing import Any, Dict

import pytest

from tdxcore.constants import Cap, VmType
from tdxcore.kvm import Kvm, tdx_batch
from tdxcore.kvm.helpers import td_create
from tdxcore.module.host import Host
from tdxcore.status import Leaf  # type: ignore[attr-defined]

SEED = 20261122
CYCLES = 50
ROUNDS = 5
ENV_PAGES = int(os.environ.get("TDXCORE_BENCH_TEARDOWN_PAGES", "16384"))
#: teardown.private builds page by page: at most 1 GiB.
PAGES = min(ENV_PAGES, 1 << 18)
TEARDOWN_ROUNDS = 3
GIB_PAGES = (1 << 30) >> 12
#: Per-path timings of this run (the ``terminate`` row reports the ratio to ``dynamic``).
_TEARDOWN: Dict[str, float] = {}


def _counts(host: Any, since: int) -> Dict[str, int]:
    c = Counter(Leaf(e[1][2]).name for e in host.events.filter(kind="seamcall_end") if e[0] >= since)
    return dict(sorted(c.items()))


# ---------------------------------------------------------------- lifecycle.td
def _host(memory: int) -> Any:
    host = Host(packages=2, cpus_per_package=2, memory=memory, seed=SEED)
    return host


def _cycle(kvm: Kvm, kind: str) -> None:
    if kind == "create_populate_finalize_destroy":
        td_create(kvm, vcpus=1, memory=1 << 20, initial_pages=16, measure=False).close()
        return
    vm = kvm.create_vm(VmType.TDX)
    vm.enable_cap(Cap.SPLIT_IRQCHIP, 24)
    vm.init_vm()
    v = vm.create_vcpu(0)
    v.init_vcpu()
    if kind == "create_finalize_destroy":
        vm.finalize_vm()
    v.close()
    vm.close()


def _cycles(kvm: Kvm, kind: str) -> Any:
    for _ in range(CYCLES):
        _cycle(kvm, kind)
    return kvm.host


@pytest.mark.benchmark(group="lifecycle.td")
@pytest.mark.parametrize("kind", ["create_destroy", "create_finalize_destroy",
                                  "create_populate_finalize_destroy"])
def test_td_lifecycle(benchmark: Any, kind: str) -> None:
    """TD create (+ finalize) + destroy cycles per second on one host."""
    state: Dict[str, Any] = {}

    def setup() -> Any:
        host = _host(64 << 20)
        kvm = Kvm(host)
        kvm.create_vm(VmType.TDX).close()        # enable the module outside the timed body
        state.update(free=host.free_frames, hkids=host.keyids.nr_free, n0=len(host.events))
        return (kvm, kind), {}

    host = benchmark.pedantic(_cycles, setup=setup, rounds=ROUNDS, iterations=1)
    assert host.free_frames == state["free"] and host.keyids.nr_free == state["hkids"]
    assert host.leaks == () and host.vms == ()
    per_cycle = {k: v // CYCLES for k, v in _counts(host, state["n0"]).items()}
    st = benchmark.stats.stats
    benchmark.extra_info.update({"kind": kind, "cycles_per_round": CYCLES, "seed": SEED, "vcpus": 1,
                                 "tds_per_s_median": CYCLES / st.median,
                                 "tds_per_s_min_time": CYCLES / st.min,
                                 "seamcalls_per_cycle": per_cycle,
                                 "seamcalls_per_cycle_total": sum(per_cycle.values())})


# ---------------------------------------------------------------- teardown.private
def _build_td(path: str) -> Any:
    host = _host(PAGES * 4096 + (64 << 20))
    kvm = Kvm(host, terminate_vm=True)
    kvm.create_vm(VmType.TDX).close()
    free0 = host.free_frames
    td = td_create(kvm, vcpus=2, memory=PAGES << 12, initial_pages=PAGES, measure=False)
    return host, td, free0


def _teardown(td: Any, path: str) -> Any:
    if path == "terminate":
        td.vm.terminate_vm()
    for v in td.vcpus:
        v.close()
    td.gmem.close()
    td.vm.close()
    return td


@pytest.mark.benchmark(group="teardown.private")
@pytest.mark.parametrize("path", ["dynamic", "terminate"])
def test_teardown_private_memory(benchmark: Any, path: str) -> None:
    """Teardown of a TD with PAGES private pages: 6.18 dynamic removal vs terminate-first."""
    state: Dict[str, Any] = {}

    def setup() -> Any:
        host, td, free0 = _build_td(path)
        state.update(host=host, free=free0, n0=len(host.events))
        return (td, path), {}

    td = benchmark.pedantic(_teardown, setup=setup, rounds=TEARDOWN_ROUNDS, iterations=1)
    host = state["host"]
    assert td.vm.is_destroyed and host.leaks == () and host.free_frames == state["free"]
    counts = _counts(host, state["n0"])
    if path == "dynamic":
        assert counts["TDH_MEM_RANGE_BLOCK"] == counts["TDH_MEM_TRACK"] == PAGES
        assert counts["TDH_MEM_PAGE_REMOVE"] == PAGES and counts["TDH_PHYMEM_PAGE_WBINVD"] == PAGES + 1
    else:
        assert "TDH_MEM_RANGE_BLOCK" not in counts and "TDH_MEM_TRACK" not in counts
        assert counts["TDH_PHYMEM_PAGE_WBINVD"] == 1            # the TDR's, global KeyID
    st = benchmark.stats.stats
    per_page = st.median / PAGES
    _TEARDOWN[path] = st.median
    info: Dict[str, Any] = {"path": path, "private_pages": PAGES, "vcpus": 2, "seed": SEED,
                            "seamcalls": counts, "seamcalls_total": sum(counts.values()),
                            "seamcalls_per_page": round(sum(counts.values()) / PAGES, 3),
                            "us_per_page_median": per_page * 1e6,
                            "s_1GiB": per_page * GIB_PAGES, "s_16GiB": per_page * 16 * GIB_PAGES,
                            "extrapolated": PAGES != GIB_PAGES}
    if path == "terminate" and "dynamic" in _TEARDOWN:
        info["dynamic_over_terminate"] = _TEARDOWN["dynamic"] / st.median
    benchmark.extra_info.update(info)


# ---------------------------------------------------------------- teardown.scale
#: Pages of the terminate_batch row; the per-page rows run at most 1 GiB and are extrapolated.
SCALE_PAGES = ENV_PAGES
DYN_PAGES = min(ENV_PAGES, GIB_PAGES)
PAGES_64G = 1 << 24
_SCALE: Dict[str, float] = {}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build_bulk(n: int) -> Any:
    host = Host(packages=2, cpus_per_package=2, memory=(n << 12) + (n << 12) // 256 + (256 << 20), seed=SEED)
    kvm = Kvm(host, terminate_vm=True)
    kvm.create_vm(VmType.TDX).close()
    free0 = host.free_frames
    rss0 = _rss_mb()
    td = td_create(kvm, vcpus=2, memory=n << 12, initial_pages=0, measure=False)
    t0 = time.perf_counter()
    tdx_batch.map_private_range(td.vm, 4 << 30, n << 12, accept=False)
    return host, td, free0, time.perf_counter() - t0, _rss_mb() - rss0


def _teardown_scale(td: Any, path: str) -> Any:
    if path != "dynamic_per_page":
        td.vm.terminate_vm()
    td.close()
    return td


@pytest.mark.benchmark(group="teardown.scale")
@pytest.mark.parametrize("path", ["dynamic_per_page", "terminate_per_page", "terminate_batch"])
def test_teardown_scale(benchmark: Any, path: str) -> None:
    """Teardown of a bulk-mapped TD: 6.18 per-page vs terminate-first per-page vs terminate-first batch."""
    n = SCALE_PAGES if path == "terminate_batch" else DYN_PAGES
    state: Dict[str, Any] = {}

    def setup() -> Any:
        state.pop("td", None)
        host, td, free0, t_map, rss = _build_bulk(n)
        tdx_batch.set_batch_reclaim(td.vm, path == "terminate_batch")
        state.update(host=host, free=free0, map_s=t_map, rss_build_mb=rss, n0=len(host.events))
        return (td, path), {}

    rounds = 1 if n > (1 << 20) else TEARDOWN_ROUNDS
    td = benchmark.pedantic(_teardown_scale, setup=setup, rounds=rounds, iterations=1)
    host = state["host"]
    assert td.vm.is_destroyed and host.leaks == () and host.free_frames == state["free"]
    events = len(host.events) - state["n0"]
    st = benchmark.stats.stats
    per_page = st.median / n
    _SCALE[path] = per_page
    info: Dict[str, Any] = {"path": path, "private_pages": n, "vcpus": 2, "seed": SEED, "accepted": False,
                            "us_per_page_median": per_page * 1e6, "events_in_teardown": events,
                            "s_at_env_pages": per_page * SCALE_PAGES, "s_64GiB": per_page * PAGES_64G,
                            "extrapolated_64GiB": n != PAGES_64G, "map_s": state["map_s"],
                            "rss_build_mb": state["rss_build_mb"],
                            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if path == "terminate_batch":
        info["target_s_64GiB"] = 60
        for base in ("dynamic_per_page", "terminate_per_page"):
            if base in _SCALE:
                info[f"{base}_over_batch"] = _SCALE[base] / per_page
    elif path == "terminate_per_page" and "dynamic_per_page" in _SCALE:
        info["dynamic_over_terminate_per_page"] = _SCALE["dynamic_per_page"] / per_page
    benchmark.extra_info.update(info)
