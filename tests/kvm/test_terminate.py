"""KVM_TDX_TERMINATE_VM, the opt-in extension (not in 6.18; SPEC §3.2, linux-6.18.md §6).

Upstream series "KVM: TDX: Add sub-ioctl KVM_TDX_TERMINATE_VM" (v4 e4775f57ad51, reworked as
5/5 of Jul 2025): under kvm->lock, trylock every vCPU, mark the VM dead and terminated, release
the HKID; closing the guest_memfds then reclaims each private page with one PAGE.RECLAIM.
"""

from __future__ import annotations

import errno
from collections import Counter

import pytest

from tdxcore.constants import TDCS_NR_PAGES, TDVPS_NR_PAGES
from tdxcore.errors import KvmError
from tdxcore.guest import hlt
from tdxcore.invariants import check_invariants
from tdxcore.kvm import Kvm, TdState
from tdxcore.kvm.helpers import td_create, vcpu_run_until_hlt
from tdxcore.module.host import Host
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    TDX_FLUSHVP_NOT_DONE,
    TDX_OPERAND_BUSY,
    Leaf,
)

NPAGES = 8
RELEASE = [Leaf.TDH_MNG_VPFLUSHDONE, Leaf.TDH_PHYMEM_CACHE_WB, Leaf.TDH_PHYMEM_CACHE_WB,
           Leaf.TDH_MNG_KEY_FREEID]


def _host(**kw):
    kw.setdefault("memory", 32 << 20)
    return Host(packages=2, cpus_per_package=2, **kw)


def _td(enabled=True, vcpus=2, pages=NPAGES, **kw):
    host = _host(**kw)
    kvm = Kvm(host, terminate_vm=enabled)
    Kvm(host).create_vm(5).close()              # enable the module outside the measured window
    free0, nfree = host.free_frames, host.keyids.nr_free
    td = td_create(kvm, vcpus=vcpus, memory=2 << 20, initial_pages=pages, measure=False)
    return host, td, free0, nfree


def _leaves(host, since):
    return [e[1][2] for e in host.events.filter(kind="seamcall_end") if e[0] >= since]


def _counts(host, since):
    return Counter(_leaves(host, since))


def _close_all(td):
    for v in td.vcpus:
        v.close()
    td.gmem.close()


def test_disabled_is_an_unknown_command_einval_nothing_changes():
    host, td, _, _ = _td(enabled=False)
    vm = td.vm
    n0 = len(host.events)
    with pytest.raises(KvmError) as ei:
        vm.terminate_vm()
    assert ei.value.errno == errno.EINVAL and "not in 6.18" in str(ei.value)
    assert _leaves(host, n0) == [] and vm.hkid is not None and not vm.is_dead and not vm.is_terminated
    with pytest.raises(KvmError) as ei:
        vm.terminate_vm()
    assert ei.value.errno == errno.EINVAL
    td.close()
    assert host.leaks == ()


@pytest.mark.parametrize("enabled", [False, True])
def test_hw_error_preset_einval_first(enabled):
    host, td, _, _ = _td(enabled=enabled)
    with pytest.raises(KvmError) as ei:
        td.vm.terminate_vm(hw_error=1)
    assert ei.value.errno == errno.EINVAL and "hw_error" in str(ei.value)
    assert not td.vm.is_dead and td.vm.hkid is not None


def test_terminate_releases_hkid_marks_dead_not_bugged():
    host, td, free0, nfree = _td()
    vm = td.vm
    n0 = len(host.events)
    vm.terminate_vm()
    assert _leaves(host, n0) == RELEASE
    assert vm.is_dead and not vm.is_bugged and vm.is_terminated and vm.hkid is None
    assert host.keyids.allocated == () and host.keyids.nr_free == nfree
    assert vm.td_state is TdState.RUNNABLE and not vm.is_destroyed    # KVM state untouched until destroy
    for call in (vm.terminate_vm, vm.finalize_vm, lambda: vm.create_vcpu(7)):
        with pytest.raises(KvmError) as ei:           # kvm_vm_ioctl on a dead VM
            call()
        assert ei.value.errno == errno.EIO
    with pytest.raises(KvmError) as ei:
        td.vcpus[0].run([hlt()])
    assert ei.value.errno == errno.EIO
    check_invariants(host)
    td.close()
    assert vm.is_destroyed and vm.leaks == () and host.leaks == ()
    assert host.free_frames == free0 and host.tdx.tds == {}
    check_invariants(host)


def test_vcpu_mutex_held_ebusy_nothing_changed():
    host, td, _, _ = _td()
    vm, v = td.vm, td.vcpus[1]
    token = object()
    assert v.mutex.try_acquire(token, "write")       # a vCPU inside KVM_RUN holds its mutex
    n0 = len(host.events)
    with pytest.raises(KvmError) as ei:
        vm.terminate_vm()
    assert ei.value.errno == errno.EBUSY and "vCPU 1" in str(ei.value)
    assert _leaves(host, n0) == [] and not vm.is_dead and vm.hkid is not None
    assert td.vcpus[0].mutex.holders() == ()         # the trylocks taken before it were dropped
    v.mutex.release(token, "write")
    vm.terminate_vm()
    assert vm.is_terminated


def test_associated_vcpus_are_flushed_first():
    host, td, free0, _ = _td()
    for v in td.vcpus:
        vcpu_run_until_hlt(v, [hlt()])
    n0 = len(host.events)
    td.vm.terminate_vm()
    assert _leaves(host, n0) == [Leaf.TDH_VP_FLUSH] * 2 + RELEASE
    td.close()
    assert host.leaks == () and host.free_frames == free0


def test_private_pages_reclaimed_once_each_then_destroy():
    host, td, free0, _ = _td()
    vm = td.vm
    nsept = len(vm.mmu.nonleaf)
    vm.terminate_vm()
    n1 = len(host.events)
    _close_all(td)
    assert _counts(host, n1) == {Leaf.TDH_PHYMEM_PAGE_RECLAIM: NPAGES}
    assert vm.mmu.leaves == () and host.stats.as_dict().get("nr_kicks", 0) == 0
    check_invariants(host)
    n2 = len(host.events)
    vm.close()
    assert _counts(host, n2) == {Leaf.TDH_PHYMEM_PAGE_RECLAIM: 2 * TDVPS_NR_PAGES + nsept + TDCS_NR_PAGES + 1,
                                 Leaf.TDH_PHYMEM_PAGE_WBINVD: 1}
    assert vm.leaks == () and host.free_frames == free0
    check_invariants(host)


def test_terminate_before_finalize_reclaims_added_pages():
    host = _host()
    kvm = Kvm(host, terminate_vm=True)
    kvm.create_vm(5).close()
    free0 = host.free_frames
    vm = kvm.create_vm(5)
    from tdxcore.kvm.helpers import td_initialize, vm_userspace_mem_region_add
    td_initialize(vm)
    gmem = vm_userspace_mem_region_add(vm, 0, 4 << 30, 2 << 20)
    v = vm.create_vcpu(0)
    v.init_vcpu()
    v.init_mem_region(bytes(4096 * 3), 4 << 30, 3, measure=False)
    vm.terminate_vm()
    assert vm.td_state is TdState.INITIALIZED and vm.is_terminated
    n0 = len(host.events)
    v.close()
    gmem.close()
    assert _counts(host, n0) == {Leaf.TDH_PHYMEM_PAGE_RECLAIM: 3}
    vm.close()
    assert host.leaks == () and host.free_frames == free0
    check_invariants(host)


def test_terminate_without_hkid_only_marks_dead():
    host = _host()
    kvm = Kvm(host, terminate_vm=True)
    vm = kvm.create_vm(5)
    n0 = len(host.events)
    vm.terminate_vm()
    assert vm.is_dead and vm.is_terminated and _leaves(host, n0) == []
    vm.close()
    assert vm.is_destroyed and host.leaks == ()


def test_flushvp_not_done_keeps_hkid_release_retried_at_destroy():
    host, td, free0, nfree = _td()
    vm = td.vm
    host.tdx.inject(Leaf.TDH_MNG_VPFLUSHDONE, TDX_FLUSHVP_NOT_DONE, count=1)
    vm.terminate_vm()                                # succeeds: tdx_terminate_vm ignores the release
    assert vm.is_terminated and vm.hkid is not None and vm.leaks == ()
    n0 = len(host.events)
    _close_all(td)                                   # HKID still assigned: the 6.18 dynamic path
    c = _counts(host, n0)
    assert c[Leaf.TDH_MEM_RANGE_BLOCK] == c[Leaf.TDH_MEM_PAGE_REMOVE] == NPAGES
    assert c[Leaf.TDH_PHYMEM_PAGE_RECLAIM] == 0
    vm.close()                                       # vm_pre_destroy releases it this time
    assert vm.leaks == () and host.keyids.nr_free == nfree and host.free_frames == free0
    check_invariants(host)


def test_flushvp_not_done_twice_leaks_hkid_once():
    host, td, free0, _ = _td()
    vm = td.vm
    hkid = vm.hkid
    host.tdx.inject(Leaf.TDH_MNG_VPFLUSHDONE, TDX_FLUSHVP_NOT_DONE, count=2)
    vm.terminate_vm()
    td.close()
    assert [lk.what for lk in vm.leaks if lk.pfn is None] == ["hkid"]
    assert host.keyids.allocated == (hkid,)
    assert host.free_frames + sum(1 for lk in host.leaks if lk.pfn is not None) == free0
    check_invariants(host)


def test_reclaim_failure_leaks_that_page_only():
    host, td, free0, _ = _td()
    vm = td.vm
    victim = vm.mmu.leaves[3][1]
    vm.terminate_vm()
    host.tdx.inject(Leaf.TDH_PHYMEM_PAGE_RECLAIM, TDX_OPERAND_BUSY | OPERAND_ID_RCX,
                    match=lambda call: call.rcx == victim << 12)
    _close_all(td)
    assert [(lk.pfn, lk.what) for lk in vm.leaks] == [(victim, "private")]
    assert not vm.is_bugged and host.frames.is_allocated(victim)
    vm.close()
    # the page is still a child of the TDR in the PAMT: TDR RECLAIM answers TD_ASSOCIATED_PAGES_EXIST
    assert sorted(lk.what for lk in vm.leaks) == ["private", "tdr"]
    assert host.free_frames + 2 == free0 and len(host.leaks) == 2
    check_invariants(host)


def test_erratum_host_resets_reclaimed_private_pages():
    host, td, _, _ = _td(cpu_erratum_pw_mce=True)
    vm = td.vm
    pfns = [p for _, p in vm.mmu.leaves]
    assert all(host.frame_keyid(p) == vm.hkid for p in pfns)
    vm.terminate_vm()
    _close_all(td)
    assert all(host.frame_keyid(p) is None for p in pfns)
    vm.close()
    check_invariants(host)


def test_no_erratum_host_does_not_clear():
    host, td, _, _ = _td()
    vm = td.vm
    hkid = vm.hkid
    pfns = [p for _, p in vm.mmu.leaves]
    vm.terminate_vm()
    _close_all(td)
    assert all(host.frame_keyid(p) == hkid for p in pfns)     # 6.18: reset only with the erratum
