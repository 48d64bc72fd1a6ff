"""TD teardown when the last reference goes (6.18 order; tdx-facts §5.7) and its leak rules
(§5.8): injection at every teardown SEAMCALL, exact frame accounting, HKID return, cycles."""

from __future__ import annotations

import pytest

from tdxcore.constants import PAGE_SHIFT, TDCS_NR_PAGES, TDVPS_NR_PAGES, VmType
from tdxcore.invariants import check_invariants
from tdxcore.kvm import Kvm, TdState
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_KOT,
    OPERAND_ID_RCX,
    OPERAND_ID_WBCACHE,
    TDX_FLUSHVP_NOT_DONE,
    TDX_OPERAND_BUSY,
    TDX_WBCACHE_NOT_COMPLETE,
    Leaf,
)
from tests.kvm.test_tdx_vm_init import make_host, new_td, page_leaks, seamcalls

NVCPU = 2
ALL_PAGES = 1 + TDCS_NR_PAGES + NVCPU * TDVPS_NR_PAGES


def full_td(host=None, nvcpu=NVCPU, erratum=False):
    """A finalized TD with ``nvcpu`` initialized vCPUs whose fds are closed; (host, kvm, vm, free0)."""
    host = host or make_host(cpu_erratum_pw_mce=erratum)
    host, kvm, vm = new_td(host)
    free0 = host.free_frames
    vm.init_vm()
    for i in range(nvcpu):
        v = vm.create_vcpu(i)
        v.init_vcpu()
        v.close()
    vm.finalize_vm()
    return host, kvm, vm, free0


def _pa_is(pfn):
    return lambda call: call.rcx == pfn << PAGE_SHIFT


def test_clean_teardown_order_and_accounting():
    host, kvm, vm, free0 = full_td()
    hkid, tdr, tdcs = vm.hkid, vm.tdr, list(vm.tdcs)
    n0 = len(host.events)
    vm.close()
    assert vm.is_destroyed and vm.td_state is TdState.UNINITIALIZED and vm.leaks == ()
    assert host.free_frames == free0 and host.keyids.allocated == () and hkid is not None
    assert host.tdx.tds == {} and host.pamt.child_count(tdr) == 0
    order = [e[1][2] for e in host.events.filter(kind="seamcall_end") if e[0] >= n0]
    # VPFLUSHDONE, CACHE.WB per package, FREEID, RECLAIM TDCX..TDVPR per vCPU, TDCS, TDR, WBINVD
    assert order[0] == Leaf.TDH_MNG_VPFLUSHDONE
    assert order[1:1 + host.nr_packages] == [Leaf.TDH_PHYMEM_CACHE_WB] * host.nr_packages
    assert order[1 + host.nr_packages] == Leaf.TDH_MNG_KEY_FREEID
    assert order[2 + host.nr_packages:] == ([Leaf.TDH_PHYMEM_PAGE_RECLAIM] * ALL_PAGES
                                            + [Leaf.TDH_PHYMEM_PAGE_WBINVD])
    del tdcs
    check_invariants(host)


def test_erratum_clears_reclaimed_pages():
    host, kvm, vm, free0 = full_td(erratum=True)
    tdr = vm.tdr
    vm.close()
    assert host.free_frames == free0
    assert host.frame_read(tdr, 0, 16, 0) == bytes(16)


def test_cache_wb_resume_loop():
    host, kvm, vm, free0 = full_td()
    host.tdx.pending_interrupt(0, count=3)
    vm.close()
    assert vm.leaks == () and host.free_frames == free0 and host.keyids.allocated == ()
    assert seamcalls(host, Leaf.TDH_PHYMEM_CACHE_WB) == host.nr_packages + 3


# (leaf, status, match-builder(vm) or None, bugged, expected leak kinds(vm))
def _all(vm):
    return sorted(["hkid", "tdr"] + ["tdcs"] * TDCS_NR_PAGES + ["tdvpr"] * NVCPU
                  + ["tdcx"] * (NVCPU * (TDVPS_NR_PAGES - 1)))


TEARDOWN_INJECT = [
    ("flushvp_not_done", Leaf.TDH_MNG_VPFLUSHDONE, TDX_FLUSHVP_NOT_DONE, None, False, _all),
    ("vpflushdone_busy", Leaf.TDH_MNG_VPFLUSHDONE, TDX_OPERAND_BUSY | OPERAND_ID_KOT, None, True, _all),
    ("cache_wb_busy", Leaf.TDH_PHYMEM_CACHE_WB, TDX_OPERAND_BUSY | OPERAND_ID_WBCACHE, None, True, _all),
    ("freeid_wbcache", Leaf.TDH_MNG_KEY_FREEID, TDX_WBCACHE_NOT_COMPLETE, None, True, _all),
    ("reclaim_tdcx", Leaf.TDH_PHYMEM_PAGE_RECLAIM, TDX_OPERAND_BUSY | OPERAND_ID_RCX,
     lambda vm: _pa_is(vm.vcpus[0].tdcx[0]), False, lambda vm: ["tdcx", "tdr"]),
    ("reclaim_tdvpr", Leaf.TDH_PHYMEM_PAGE_RECLAIM, TDX_OPERAND_BUSY | OPERAND_ID_RCX,
     lambda vm: _pa_is(vm.vcpus[1].tdvpr), False, lambda vm: ["tdr", "tdvpr"]),
    ("reclaim_tdcs", Leaf.TDH_PHYMEM_PAGE_RECLAIM, TDX_OPERAND_BUSY | OPERAND_ID_RCX,
     lambda vm: _pa_is(vm.tdcs[2]), False, lambda vm: ["tdcs", "tdr"]),
    ("reclaim_tdr", Leaf.TDH_PHYMEM_PAGE_RECLAIM, TDX_OPERAND_BUSY | OPERAND_ID_RCX,
     lambda vm: _pa_is(vm.tdr), False, lambda vm: ["tdr"]),
    ("wbinvd_tdr", Leaf.TDH_PHYMEM_PAGE_WBINVD, TDX_OPERAND_BUSY | OPERAND_ID_RCX, None, True,
     lambda vm: ["tdr"]),
]


@pytest.mark.parametrize("name,leaf,status,mk,bugged,kinds", TEARDOWN_INJECT,
                         ids=[c[0] for c in TEARDOWN_INJECT])
def test_teardown_injection_leaks_as_predicted(name, leaf, status, mk, bugged, kinds):
    host, kvm, vm, free0 = full_td()
    hkid = vm.hkid
    expected = sorted(kinds(vm))
    host.tdx.inject(leaf, status, match=None if mk is None else mk(vm))
    n_reclaim0 = seamcalls(host, Leaf.TDH_PHYMEM_PAGE_RECLAIM)
    vm.close()
    assert vm.is_destroyed and vm.is_bugged == bugged
    assert sorted(lk.what for lk in vm.leaks) == expected
    assert tuple(host.leaks) and len(host.leaks) == len(vm.leaks)
    assert all(lk.hkid == hkid and lk.reason for lk in vm.leaks)
    # exact accounting: every frame is free again or recorded as leaked
    assert host.free_frames + page_leaks(host) == free0
    hkid_leaked = "hkid" in expected
    assert host.keyids.allocated == ((hkid,) if hkid_leaked else ())
    if hkid_leaked:
        assert seamcalls(host, Leaf.TDH_PHYMEM_PAGE_RECLAIM) == n_reclaim0   # no RECLAIM attempted
    for lk in vm.leaks:
        if lk.pfn is not None:
            assert host.pamt.page_type(lk.pfn) == lk.page_type
            # only the TDR whose WBINVD failed is already reclaimed (PT_NDA) when abandoned
            assert lk.page_type != 0 or "WBINVD" in lk.reason
    check_invariants(host)


def test_leaked_hkid_is_not_reused():
    host, kvm, vm, _ = full_td()
    host.tdx.inject(Leaf.TDH_MNG_VPFLUSHDONE, TDX_FLUSHVP_NOT_DONE)
    hkid = vm.hkid
    vm.close()
    vm2 = kvm.create_vm(VmType.TDX)
    from tdxcore.constants import Cap
    vm2.enable_cap(Cap.SPLIT_IRQCHIP, 0)
    vm2.init_vm()
    assert vm2.hkid != hkid and set(host.keyids.allocated) == {hkid, vm2.hkid}


def _cycles(n):
    host = make_host()
    kvm = Kvm(host)
    from tdxcore.constants import Cap
    kvm.create_vm(VmType.TDX).close()          # enable the module outside the measured window
    free0, nfree = host.free_frames, host.keyids.nr_free
    for _ in range(n):
        vm = kvm.create_vm(VmType.TDX)
        vm.enable_cap(Cap.SPLIT_IRQCHIP, 24)
        vm.init_vm()
        v = vm.create_vcpu(0)
        v.init_vcpu()
        vm.finalize_vm()
        v.close()
        vm.close()
        assert vm.is_destroyed
    assert host.free_frames == free0 and host.keyids.nr_free == nfree and host.leaks == ()
    assert host.keyids.nr_configured == 0 and host.tdx.tds == {} and host.vms == ()
    check_invariants(host)


def test_100_cycles_return_hkids_and_frames():
    _cycles(100)


@pytest.mark.slow
def test_2000_cycles_return_hkids_and_frames():
    _cycles(2000)


def _associate(host, vm, cpu=1):
    """Enter and leave the guest once on ``cpu`` (stands in for KVM_RUN of the memory slice)."""
    for v in vm.vcpus:
        assert not host.tdx.tdh_vp_enter(v.tdvpr, cpu=cpu).status.is_error
        assert host.tdx.vcpu(v.tdvpr).associated_cpu == cpu


def test_vp_flush_on_associated_cpu_then_clean():
    host, kvm, vm, free0 = full_td()
    _associate(host, vm)
    n0 = len(host.events)
    vm.close()
    flushes = [e for e in host.events.filter(kind="seamcall_end", leaf=Leaf.TDH_VP_FLUSH) if e[0] >= n0]
    assert len(flushes) == NVCPU and vm.leaks == () and host.free_frames == free0
    check_invariants(host)


def test_vp_flush_failure_kvm_bug_and_flushvp_not_done_leaks_all():
    host, kvm, vm, free0 = full_td()
    _associate(host, vm)
    hkid = vm.hkid
    host.tdx.inject(Leaf.TDH_VP_FLUSH, TDX_OPERAND_BUSY | OPERAND_ID_RCX, count=1)
    vm.close()
    # the vCPU stays associated, so VPFLUSHDONE really answers FLUSHVP_NOT_DONE: stop, leak all
    assert vm.is_bugged and sorted(lk.what for lk in vm.leaks) == _all(vm)
    assert host.keyids.allocated == (hkid,) and host.free_frames + page_leaks(host) == free0
    check_invariants(host)
