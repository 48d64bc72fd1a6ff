"""Scenarios A20–A23 (anchors §2.4) for the TD control-structure lifecycle, without private memory.

Modelled on the upstream selftest ``tools/testing/selftests/kvm/x86/tdx_vm_test`` (TD creation,
vCPU init, finalize, teardown); KVM_RUN joins with the memory slice. The last scenario adds
initial memory (guest_memfd + INIT_MEM_REGION) and checks the zap and S-EPT reclaim of teardown.
"""

from __future__ import annotations

import errno

import pytest

from tdxcore.constants import TDCS_NR_PAGES, TDVPS_NR_PAGES, Cap, VmType
from tdxcore.errors import KvmError
from tdxcore.invariants import check_invariants
from tdxcore.kvm import Kvm, TdState
from tdxcore.module.host import Host
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_ATTRIBUTES,
    OPERAND_ID_OP_STATE,
    TDX_FLUSHVP_NOT_DONE,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_INVALID,
    TDX_RND_NO_ENTROPY,
    Leaf,
)


def _host():
    return Host(packages=2, cpus_per_package=2, memory=32 << 20)


def _td(host):
    kvm = Kvm(host)
    vm = kvm.create_vm(VmType.TDX)
    vm.enable_cap(Cap.SPLIT_IRQCHIP, 24)
    return kvm, vm


def _leaves(host, since=0):
    return [e[1][2] for e in host.events.filter(kind="seamcall_end") if e[0] >= since]


def test_a20_happy_path_order_and_states():
    host = _host()
    kvm, vm = _td(host)
    n0 = len(host.events)
    states = [vm.td_state]
    vm.init_vm(gpaw=48)
    states.append(vm.td_state)
    assert len(host.keyids.allocated) == 1
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    for v in vcpus:
        v.init_vcpu()
        assert 1 + len(v.tdcx) == TDVPS_NR_PAGES
    vm.finalize_vm()
    states.append(vm.td_state)
    assert states == [TdState.UNINITIALIZED, TdState.INITIALIZED, TdState.RUNNABLE]
    assert len(vm.tdcs) == TDCS_NR_PAGES and len(host.keyids.allocated) == 1
    expected = ([Leaf.TDH_MNG_CREATE] + [Leaf.TDH_MNG_KEY_CONFIG] * host.nr_packages
                + [Leaf.TDH_MNG_ADDCX] * TDCS_NR_PAGES + [Leaf.TDH_MNG_INIT] + [Leaf.TDH_MNG_RD] * 2
                + ([Leaf.TDH_VP_CREATE] + [Leaf.TDH_VP_ADDCX] * (TDVPS_NR_PAGES - 1) + [Leaf.TDH_VP_INIT]) * 2
                + [Leaf.TDH_MR_FINALIZE])
    assert _leaves(host, n0) == expected
    check_invariants(host)


def test_a21_lifecycle_misuse_errors():
    host = _host()
    kvm, vm = _td(host)
    with pytest.raises(KvmError) as ei:           # vCPU before INIT_VM
        vm.create_vcpu(0)
    assert ei.value.errno == errno.EIO
    with pytest.raises(KvmError) as ei:           # GPAW 50
        vm.init_vm(gpaw=50)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as ei:           # hw_error preset
        vm.init_vm(hw_error=1)
    assert ei.value.errno == errno.EINVAL
    vm.init_vm()
    with pytest.raises(KvmError) as ei:           # INIT_VM twice, no vCPUs
        vm.init_vm()
    assert ei.value.errno == errno.EINVAL
    vm.create_vcpu(0).init_vcpu()
    with pytest.raises(KvmError) as ei:           # INIT_VM twice, with vCPUs: still EINVAL (state first)
        vm.init_vm()
    assert ei.value.errno == errno.EINVAL
    vm.nr_premapped = 1                           # one premapped page not yet ADDed
    with pytest.raises(KvmError) as ei:
        vm.finalize_vm()
    assert ei.value.errno == errno.EINVAL
    vm.nr_premapped = 0
    busy = TDX_OPERAND_BUSY | OPERAND_ID_OP_STATE
    host.tdx.inject(Leaf.TDH_MR_FINALIZE, busy)
    with pytest.raises(KvmError) as ei:
        vm.finalize_vm()
    assert ei.value.errno == errno.EBUSY and ei.value.hw_error == busy
    with pytest.raises(KvmError) as ei:
        vm.finalize_vm(hw_error=1)
    assert ei.value.errno == errno.EINVAL
    vm.finalize_vm()
    with pytest.raises(KvmError) as ei:           # already RUNNABLE
        vm.finalize_vm()
    assert ei.value.errno == errno.EINVAL


@pytest.mark.parametrize("n,ok", [(10, False), (9, True)])
def test_a22_entropy_on_create(n, ok):
    host = _host()
    kvm, vm = _td(host)
    free0, nfree = host.free_frames, host.keyids.nr_free
    host.tdx.inject(Leaf.TDH_MNG_CREATE, TDX_RND_NO_ENTROPY, count=n)
    if ok:
        vm.init_vm()
        assert vm.td_state is TdState.INITIALIZED
        return
    with pytest.raises(KvmError) as ei:
        vm.init_vm()
    assert ei.value.errno == errno.EAGAIN
    assert host.free_frames == free0 and host.keyids.nr_free == nfree and host.leaks == ()


def test_a22_mng_init_operand_invalid_full_teardown():
    host = _host()
    kvm, vm = _td(host)
    free0, nfree = host.free_frames, host.keyids.nr_free
    host.tdx.inject(Leaf.TDH_MNG_INIT, TDX_OPERAND_INVALID | OPERAND_ID_ATTRIBUTES)
    n0 = len(host.events)
    with pytest.raises(KvmError) as ei:
        vm.init_vm()
    assert ei.value.errno == errno.EINVAL and ei.value.hw_error == 0xC000010000000040
    lv = _leaves(host, n0)
    for leaf in (Leaf.TDH_MNG_VPFLUSHDONE, Leaf.TDH_PHYMEM_CACHE_WB, Leaf.TDH_MNG_KEY_FREEID):
        assert leaf in lv
    assert lv.count(Leaf.TDH_PHYMEM_PAGE_RECLAIM) == 1 + TDCS_NR_PAGES
    assert host.free_frames == free0 and host.keyids.nr_free == nfree and host.leaks == ()


@pytest.mark.parametrize("leak", [True, False], ids=["flushvp_not_done", "clean"])
def test_a23_teardown(leak):
    host = _host()
    kvm, vm = _td(host)
    free0 = host.free_frames
    vm.init_vm()
    for i in range(2):
        v = vm.create_vcpu(i)
        v.init_vcpu()
        v.close()
    vm.finalize_vm()
    tdr, hkid = vm.tdr, vm.hkid
    if leak:
        host.tdx.inject(Leaf.TDH_MNG_VPFLUSHDONE, TDX_FLUSHVP_NOT_DONE)
    n0 = len(host.events)
    vm.close()
    pages = [lk for lk in vm.leaks if lk.pfn is not None]
    if leak:
        assert hkid in host.keyids.allocated
        assert Leaf.TDH_PHYMEM_PAGE_RECLAIM not in _leaves(host, n0)
        assert len(pages) == 1 + TDCS_NR_PAGES + 2 * TDVPS_NR_PAGES
        assert [lk.what for lk in vm.leaks if lk.pfn is None] == ["hkid"]
    else:
        assert vm.leaks == () and host.keyids.allocated == ()
        assert host.pamt.child_count(tdr) == 0 and host.tdx.tds == {}
    assert host.free_frames + len(pages) == free0
    check_invariants(host)


def test_td_with_initial_memory_build_finalize_destroy_exact():
    """A TD with measured initial memory (memslot + guest_memfd + INIT_MEM_REGION), finalized and
    destroyed: exact SEAMCALL order of populate, zap (at guest_memfd release, HKID assigned) and
    reclaim (after HKID release), no leaks, every frame back."""
    from tdxcore.constants import MemAttr, MemFlag

    npages, nvcpu = 4, 2
    host = _host()
    kvm, vm = _td(host)
    free0 = host.free_frames
    vm.init_vm(gpaw=48)
    gmem = vm.create_guest_memfd(size=2 << 20)
    vm.set_user_memory_region2(slot=0, flags=MemFlag.GUEST_MEMFD, guest_phys_addr=4 << 30,
                               memory_size=2 << 20, userspace_addr=host.mmap(2 << 20), guest_memfd=gmem)
    vm.set_memory_attributes(4 << 30, 2 << 20, MemAttr.PRIVATE)
    vcpus = [vm.create_vcpu(i) for i in range(nvcpu)]
    for v in vcpus:
        v.init_vcpu()
    n0 = len(host.events)
    vcpus[0].init_mem_region(source=bytes(range(256)) * 16 * npages, gpa=4 << 30, nr_pages=npages,
                             measure=True)
    page = [Leaf.TDH_MEM_PAGE_ADD] + [Leaf.TDH_MR_EXTEND] * 16
    assert _leaves(host, n0) == [Leaf.TDH_MEM_SEPT_ADD] * 3 + page * npages
    assert vm.nr_premapped == 0
    vm.finalize_vm()
    assert vm.td_state == TdState.RUNNABLE
    check_invariants(host)
    n1 = len(host.events)
    stats0 = host.stats.as_dict()
    for v in vcpus:
        v.close()
    gmem.close()
    vm.close()
    order = _leaves(host, n1)
    zap = [Leaf.TDH_MEM_RANGE_BLOCK, Leaf.TDH_MEM_TRACK, Leaf.TDH_MEM_PAGE_REMOVE,
           Leaf.TDH_PHYMEM_PAGE_WBINVD]
    reclaim_vcpus = TDVPS_NR_PAGES * nvcpu
    assert order == (zap * npages
                     + [Leaf.TDH_MNG_VPFLUSHDONE] + [Leaf.TDH_PHYMEM_CACHE_WB] * host.nr_packages
                     + [Leaf.TDH_MNG_KEY_FREEID]
                     + [Leaf.TDH_PHYMEM_PAGE_RECLAIM] * (reclaim_vcpus + 3 + TDCS_NR_PAGES + 1)
                     + [Leaf.TDH_PHYMEM_PAGE_WBINVD])
    st = host.stats.as_dict()
    assert st.get("nr_kicks", 0) - stats0.get("nr_kicks", 0) == npages
    assert st.get("nr_zap_busy_retries", 0) == stats0.get("nr_zap_busy_retries", 0)
    assert vm.is_destroyed and vm.leaks == () and host.leaks == ()
    assert host.free_frames == free0 and host.keyids.allocated == ()
    check_invariants(host)
