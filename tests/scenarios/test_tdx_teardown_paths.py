"""Scenario A24 (anchors §2.4, corrected): terminate-first reclaim versus dynamic removal.

A TD with N = 1024 private pages mapped (KVM_TDX_INIT_MEM_REGION before finalize), torn down:

* path (a), 6.18: close the guest_memfd while the TD is RUNNABLE — per page RANGE.BLOCK, MEM.TRACK
  (+ kick), PAGE.REMOVE, PAGE.WBINVD with the HKID (6.18 tracks once per page, no batching);
* path (b), the opt-in KVM_TDX_TERMINATE_VM first (HKID released, TD in TEARDOWN), then close:
  exactly one PHYMEM.PAGE.RECLAIM per page and no BLOCK / TRACK / REMOVE / per-page WBINVD.

Both end with no private page left, no leak, and free + owned + leaked == total frames; the
SEAMCALL counts of every phase are asserted exactly, per leaf.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tdxcore.constants import TDCS_NR_PAGES, TDVPS_NR_PAGES, PageType, VmType
from tdxcore.invariants import check_invariants
from tdxcore.invariants.kvm import frame_balance
from tdxcore.kvm import Kvm
from tdxcore.kvm.helpers import td_create
from tdxcore.module.host import Host
from tdxcore.status import Leaf  # type: ignore[attr-defined]

N = 1024
NVCPU = 2
L = Leaf


def _seamcalls(host, since):
    """Completed SEAMCALLs per leaf since event ``since`` (the per-leaf view of ``nr_seamcalls``)."""
    return Counter(L(e[1][2]) for e in host.events.filter(kind="seamcall_end") if e[0] >= since)


def _build(cpu_erratum_pw_mce=False):
    host = Host(packages=2, cpus_per_package=2, memory=32 << 20, cpu_erratum_pw_mce=cpu_erratum_pw_mce)
    kvm = Kvm(host, terminate_vm=True)
    kvm.create_vm(VmType.TDX).close()            # module enabled outside the accounting
    free0, hkids0 = host.free_frames, host.keyids.nr_free
    td = td_create(kvm, vcpus=NVCPU, memory=N << 12, initial_pages=N, measure=False)
    assert len(td.vm.mmu.leaves) == N and td.vm.nr_premapped == 0
    return host, td, free0, hkids0


def _private_pages(host, tdr):
    return sum(1 for p in range(host.nr_frames)
               if host.pamt.page_type(p) == PageType.PT_REG and host.pamt.owner(p) == tdr)


def _release(npkg):
    return {L.TDH_MNG_VPFLUSHDONE: 1, L.TDH_PHYMEM_CACHE_WB: npkg, L.TDH_MNG_KEY_FREEID: 1}


@pytest.mark.parametrize("path", ["dynamic", "terminate"])
def test_a24_reclaim_paths_exact_seamcall_counts(path):
    host, td, free0, hkids0 = _build()
    vm = td.vm
    tdr, nsept = vm.tdr, len(vm.mmu.nonleaf)
    assert _private_pages(host, tdr) == N
    npkg = host.nr_packages
    stats0 = host.stats
    n0 = len(host.events)
    if path == "terminate":
        vm.terminate_vm()
        assert _seamcalls(host, n0) == _release(npkg)
        assert vm.hkid is None and host.tdx.td(tdr).lifecycle.name == "TEARDOWN"
    n1 = len(host.events)
    for v in td.vcpus:
        v.close()
    td.gmem.close()
    zap = _seamcalls(host, n1)
    if path == "dynamic":
        assert zap == {L.TDH_MEM_RANGE_BLOCK: N, L.TDH_MEM_TRACK: N, L.TDH_MEM_PAGE_REMOVE: N,
                       L.TDH_PHYMEM_PAGE_WBINVD: N}
        assert host.stats.nr_kicks - stats0.as_dict().get("nr_kicks", 0) == N    # one kick per TRACK
    else:
        assert zap == {L.TDH_PHYMEM_PAGE_RECLAIM: N}
        assert host.stats.as_dict().get("nr_kicks", 0) == stats0.as_dict().get("nr_kicks", 0)
    assert vm.mmu.leaves == () and _private_pages(host, tdr) == 0      # 0 private pages left
    check_invariants(host)
    n2 = len(host.events)
    vm.close()
    control = NVCPU * TDVPS_NR_PAGES + nsept + TDCS_NR_PAGES + 1
    destroy = {L.TDH_PHYMEM_PAGE_RECLAIM: control, L.TDH_PHYMEM_PAGE_WBINVD: 1}   # + TDR WBINVD
    if path == "dynamic":
        destroy.update(_release(npkg))
    assert _seamcalls(host, n2) == destroy
    total = _seamcalls(host, n0)
    assert host.stats.nr_seamcalls_total - stats0.nr_seamcalls_total == sum(total.values())
    assert vm.is_destroyed and vm.leaks == () and host.leaks == ()
    assert host.free_frames == free0 and host.keyids.nr_free == hkids0 and host.tdx.tds == {}
    free, owned, leaked, all_frames = frame_balance(host)
    assert leaked == 0 and free + owned + leaked == all_frames
    check_invariants(host)


def test_a24_both_paths_same_pages_reclaimed_and_ratio():
    """The two paths give back the same frames; (a) costs 4 SEAMCALLs + 1 kick per page, (b) 1."""
    per_page = {}
    for path in ("dynamic", "terminate"):
        host, td, free0, _ = _build()
        pfns = sorted(p for _, p in td.vm.mmu.leaves)
        if path == "terminate":
            td.vm.terminate_vm()
        n0 = len(host.events)
        for v in td.vcpus:
            v.close()
        td.gmem.close()
        per_page[path] = sum(_seamcalls(host, n0).values()) / N
        assert not any(host.frames.is_allocated(p) for p in pfns)
        td.vm.close()
        assert host.free_frames == free0
    assert per_page == {"dynamic": 4.0, "terminate": 1.0}


def test_a24_terminate_path_on_erratum_host_resets_each_page():
    host, td, free0, _ = _build(cpu_erratum_pw_mce=True)
    pfns = [p for _, p in td.vm.mmu.leaves]
    td.vm.terminate_vm()
    td.close()
    assert all(host.frame_keyid(p) is None for p in pfns) and host.free_frames == free0
    check_invariants(host)
