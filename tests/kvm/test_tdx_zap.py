"""The 6.18 private zap path and S-EPT page reclaim (``kvm/tdx_mmu.py``; tdx-facts §3.4, §3.6, §4.1,
§5.7, §5.8; linux-6.18.md §1, §7): BLOCK → TRACK + kick → REMOVE → WBINVD per 4K page, the one retry
after a kick with ``wait_for_sept_zap`` set, KVM_BUG and a pinned (leaked) page on a second failure,
``free_external_spt`` (RECLAIM + clear, or leak) after HKID release."""

from __future__ import annotations

import errno

import pytest

from tdxcore.constants import PAGE_SHIFT
from tdxcore.errors import KvmError
from tdxcore.invariants import check_invariants
from tdxcore.kvm.tdx_mmu import pg_level_to_tdx_sept_level
from tdxcore.sched import WaitOutOfGuest, run_to_completion
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    OPERAND_ID_SEPT_TREE,
    OPERAND_ID_TD_EPOCH,
    TDX_FLUSHVP_NOT_DONE,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_INVALID,
    Leaf,
)
from tests.kvm.test_init_mem_region import BASE, MEM, leaves_since, src, td_with_slot
from tests.kvm.test_tdx_vm_init import page_leaks

NPAGES = 3
ZAP = [Leaf.TDH_MEM_RANGE_BLOCK, Leaf.TDH_MEM_TRACK, Leaf.TDH_MEM_PAGE_REMOVE, Leaf.TDH_PHYMEM_PAGE_WBINVD]


def runnable_td(nvcpu=2, erratum=False, finalize=True):
    host, kvm, vm, gmem, vcpus, free0 = td_with_slot(nvcpu=nvcpu, erratum=erratum)
    vcpus[0].init_mem_region(source=src(NPAGES), gpa=BASE, nr_pages=NPAGES, measure=True)
    if finalize:
        vm.finalize_vm()
    for v in vcpus:
        v.close()
    return host, kvm, vm, gmem, free0


def counter(host, name):
    return host.stats.as_dict().get(name, 0)


def accounted(host, vm, free0):
    return host.free_frames + page_leaks(host) == free0


def zap_only(host, n0):
    return [lf for lf in leaves_since(host, n0) if lf in ZAP]


def test_level_conversion():
    assert pg_level_to_tdx_sept_level(1) == 0 and pg_level_to_tdx_sept_level(4) == 3


def test_clean_zap_order_per_page_then_sept_reclaim():
    host, kvm, vm, gmem, free0 = runnable_td()
    k0 = counter(host, "nr_kicks")
    pfns = [p for _, p in vm.mmu.leaves]
    n0 = len(host.events)
    gmem.close()                      # kvm_gmem_release zaps every private page, HKID assigned
    assert leaves_since(host, n0) == ZAP * NPAGES
    assert counter(host, "nr_kicks") - k0 == NPAGES and counter(host, "nr_zap_busy_retries") == 0
    assert vm.mmu.leaves == () and len(vm.mmu.nonleaf) == 3 and not vm.is_destroyed
    for p in pfns:
        assert host.pamt.page_type(p) == 0
    n1 = len(host.events)
    vm.close()
    order = leaves_since(host, n1)
    assert Leaf.TDH_MEM_RANGE_BLOCK not in order
    i = order.index(Leaf.TDH_MNG_KEY_FREEID)
    # TDCX/TDVPR of 2 vCPUs, then the 3 S-EPT pages, TDCS, TDR, WBINVD (TDR)
    assert order[i + 1:].count(Leaf.TDH_PHYMEM_PAGE_RECLAIM) == vm_pages(host) + 3
    assert vm.leaks == () and host.free_frames == free0
    check_invariants(host)


def vm_pages(host):
    from tdxcore.constants import TDCS_NR_PAGES, TDVPS_NR_PAGES
    return 1 + TDCS_NR_PAGES + 2 * TDVPS_NR_PAGES


def test_pre_finalize_zap_has_no_track():
    host, kvm, vm, gmem, free0 = runnable_td(finalize=False)
    n0 = len(host.events)
    gmem.close()
    assert zap_only(host, n0) == [Leaf.TDH_MEM_RANGE_BLOCK, Leaf.TDH_MEM_PAGE_REMOVE,
                                  Leaf.TDH_PHYMEM_PAGE_WBINVD] * NPAGES
    vm.close()
    assert vm.leaks == () and host.free_frames == free0


BUSY = {Leaf.TDH_MEM_RANGE_BLOCK: TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE,
        Leaf.TDH_MEM_TRACK: TDX_OPERAND_BUSY | OPERAND_ID_TD_EPOCH,
        Leaf.TDH_MEM_PAGE_REMOVE: TDX_OPERAND_BUSY | OPERAND_ID_RCX}


@pytest.mark.parametrize("leaf", list(BUSY), ids=lambda lf: lf.name)
def test_busy_once_retried_after_kick(leaf):
    host, kvm, vm, gmem, free0 = runnable_td()
    host.tdx.inject(leaf, BUSY[leaf], count=1)
    k0 = counter(host, "nr_kicks")
    gfn, pfn = vm.mmu.leaves[0]
    seen = []

    def observe(gen):
        send = None
        while True:
            try:
                y = gen.send(send)
            except StopIteration as e:
                return e.value
            seen.append((isinstance(y, WaitOutOfGuest), vm.wait_for_sept_zap))
            send = yield y

    n0 = len(host.events)
    assert run_to_completion(observe(vm.mmu.zap_private_leaf(gfn))) == 0
    expect = list(ZAP)
    expect.insert(expect.index(leaf) + 1, leaf)
    assert zap_only(host, n0) == expect
    assert counter(host, "nr_zap_busy_retries") == 1 and counter(host, "nr_kicks") - k0 == 2
    # the retry's kick runs with wait_for_sept_zap set; tdx_track's own kick without it
    kicks = [flag for is_kick, flag in seen if is_kick]
    assert kicks == ([True, False] if leaf != Leaf.TDH_MEM_PAGE_REMOVE else [False, True])
    assert not vm.wait_for_sept_zap and not vm.is_bugged
    gmem.close()
    vm.close()
    assert vm.leaks == () and host.free_frames == free0


@pytest.mark.parametrize("leaf", list(BUSY), ids=lambda lf: lf.name)
def test_busy_twice_is_kvm_bug_and_the_page_leaks(leaf):
    host, kvm, vm, gmem, free0 = runnable_td()
    host.tdx.inject(leaf, BUSY[leaf], count=2)
    gfn, pfn = vm.mmu.leaves[0]
    gmem.close()
    assert vm.is_bugged and leaf.name.replace("TDH_", "").split("_")[-1] in vm.bug_reason.replace(".", "_")
    assert counter(host, "nr_zap_busy_retries") == 1
    with pytest.raises(KvmError) as ei:
        vm.finalize_vm()
    assert ei.value.errno == errno.EIO
    vm.close()
    priv = [lk for lk in vm.leaks if lk.what == "private"]
    assert [lk.pfn for lk in priv] == [pfn]
    # the page is still owned by the TD: CHLDCNT ≠ 0 keeps the TDR too (tdx-facts §5.8)
    assert [lk.what for lk in vm.leaks] == ["private", "tdr"]
    assert "TD_ASSOCIATED_PAGES_EXIST" in vm.leaks[1].reason
    assert accounted(host, vm, free0)


def test_wbinvd_failure_leaks_the_page():
    host, kvm, vm, gmem, free0 = runnable_td()
    host.tdx.inject(Leaf.TDH_PHYMEM_PAGE_WBINVD, TDX_OPERAND_INVALID | OPERAND_ID_RCX, count=1)
    _, pfn = vm.mmu.leaves[0]
    gmem.close()
    vm.close()
    assert vm.is_bugged and [(lk.what, lk.pfn) for lk in vm.leaks] == [("private", pfn)]
    assert accounted(host, vm, free0)


def test_sept_reclaim_failure_leaks_that_page():
    host, kvm, vm, gmem, free0 = runnable_td()
    spt = vm.mmu.nonleaf[-1][2]
    vm_tdr = [vm.tdr]
    host.tdx.inject(Leaf.TDH_PHYMEM_PAGE_RECLAIM, TDX_OPERAND_INVALID | OPERAND_ID_RCX, count=1,
                    match=lambda call: call.rcx == spt << PAGE_SHIFT)
    gmem.close()
    vm.close()
    # the S-EPT page stays the TD's (CHLDCNT ≠ 0), so the TDR's RECLAIM fails too
    assert [(lk.what, lk.pfn) for lk in vm.leaks] == [("sept", spt), ("tdr", vm_tdr[0])]
    assert accounted(host, vm, free0)


def test_sept_free_with_hkid_assigned_is_kvm_bug_and_leaks():
    host, kvm, vm, gmem, free0 = runnable_td()
    septs = [s for _, _, s in vm.mmu.nonleaf]
    host.tdx.inject(Leaf.TDH_MNG_VPFLUSHDONE, TDX_FLUSHVP_NOT_DONE)
    gmem.close()
    vm.close()
    assert vm.is_bugged and "free_external_spt" in vm.bug_reason
    assert sorted(lk.pfn for lk in vm.leaks if lk.what == "sept") == sorted(septs)
    assert accounted(host, vm, free0)


@pytest.mark.parametrize("erratum", [False, True])
def test_private_page_cleared_only_on_erratum_hosts(erratum):
    host, kvm, vm, gmem, free0 = runnable_td(erratum=erratum)
    pfns = [p for _, p in vm.mmu.leaves]
    gmem.close()
    assert all((host.frame_keyid(p) is None) == erratum for p in pfns)
    vm.close()


def test_sept_add_error_is_kvm_bug():
    host, kvm, vm, gmem, vcpus, free0 = td_with_slot()
    host.tdx.inject(Leaf.TDH_MEM_SEPT_ADD, TDX_OPERAND_INVALID | OPERAND_ID_RCX, count=1)
    with pytest.raises(KvmError) as ei:
        vcpus[0].init_mem_region(source=src(1), gpa=BASE, nr_pages=1)
    assert ei.value.errno == errno.EIO and vm.is_bugged and vm.mmu.nonleaf == ()
    vcpus[0].close()
    gmem.close()
    vm.close()
    assert vm.leaks == () and host.free_frames == free0


def test_zap_without_hkid_is_kvm_bug():
    host, kvm, vm, gmem, free0 = runnable_td()
    gfn, pfn = vm.mmu.leaves[0]
    hkid, vm.hkid = vm.hkid, None
    assert run_to_completion(vm.mmu.zap_private_leaf(gfn)) == -errno.EINVAL
    vm.hkid = hkid
    assert vm.is_bugged and vm.leaks[-1].what == "private"


def test_runnable_map_augs_and_destroy_zaps_what_is_left():
    host, kvm, vm, gmem, free0 = runnable_td()
    gfn = (BASE + MEM) >> PAGE_SHIFT                # past the slot, same 2M table: no SEPT.ADD
    pfn = host.alloc_frame()
    host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE, count=1)
    assert run_to_completion(vm.mmu.map_private(gfn, pfn)) == -errno.EBUSY and vm.mmu.leaf(gfn) is None
    n0 = len(host.events)
    assert run_to_completion(vm.mmu.map_private(gfn, pfn)) == 0
    assert leaves_since(host, n0) == [Leaf.TDH_MEM_PAGE_AUG] and vm.nr_premapped == 0
    assert host.tdx.td(vm.tdr).sept.walk(gfn << PAGE_SHIFT)[2] is not None
    gmem.close()                                    # zaps the bound gfns, not the one past the slot
    assert vm.mmu.leaves == ((gfn, pfn),)
    n1 = len(host.events)
    vm.close()                                      # kvm_destroy_vm zaps it with the HKID assigned
    assert leaves_since(host, n1)[:5] == ZAP + [Leaf.TDH_MNG_VPFLUSHDONE]
    host.free_frame(pfn)
    assert vm.leaks == () and host.free_frames == free0


def test_aug_error_is_kvm_bug():
    host, kvm, vm, gmem, free0 = runnable_td()
    gfn = vm.mmu.leaves[-1][0] + 1
    host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, TDX_OPERAND_INVALID | OPERAND_ID_RCX, count=1)
    pfn = host.alloc_frame()
    assert run_to_completion(vm.mmu.map_private(gfn, pfn)) == -errno.EIO
    assert vm.is_bugged and vm.mmu.leaf(gfn) is None


def test_same_run_same_state_hash():
    hashes = []
    for _ in range(2):
        host, kvm, vm, gmem, free0 = runnable_td()
        host.tdx.inject(Leaf.TDH_MEM_RANGE_BLOCK, BUSY[Leaf.TDH_MEM_RANGE_BLOCK], count=1)
        h1 = host.state_hash()
        gmem.close()
        vm.close()
        hashes.append((h1, host.state_hash()))
    assert hashes[0] == hashes[1]
