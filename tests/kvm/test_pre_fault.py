"""KVM_PRE_FAULT_MEMORY (``vcpu.pre_fault_memory``): validation, EOPNOTSUPP before finalize, private
pages AUGed (the guest still accepts them), shared pages mapped in the direct root, progress
written back, and the stops of 6.18 (signal, invalid memslot -EAGAIN)."""

from __future__ import annotations

import errno

import pytest

import tdxcore as tdx
from tdxcore import guest
from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE, ExitReason, MemAttr
from tdxcore.errors import KvmError
from tdxcore.invariants import check_invariants
from tdxcore.kvm import helpers

BASE = 4 << 30


@pytest.fixture
def td():
    host = tdx.Host(packages=1, cpus_per_package=2, memory=64 << 20, tdx_keyids=4, seed=0)
    t = helpers.td_create(tdx.Kvm(host), vcpus=1, memory=1 << 20, gpa=BASE, initial_pages=0)
    yield t
    t.close()
    assert host.leaks == ()


@pytest.mark.parametrize(("kwargs", "err"), [
    ({"gpa": BASE, "size": PAGE_SIZE, "flags": 1}, errno.EINVAL),
    ({"gpa": BASE + 1, "size": PAGE_SIZE}, errno.EINVAL),
    ({"gpa": BASE, "size": 0}, errno.EINVAL),
    ({"gpa": (1 << 64) - PAGE_SIZE, "size": 2 * PAGE_SIZE}, errno.EINVAL),
    ({"gpa": 0x1000, "size": PAGE_SIZE}, errno.ENOENT),          # no memslot: MMIO
])
def test_bad_ranges(td, kwargs, err):
    with pytest.raises(KvmError) as ei:
        td.vcpus[0].pre_fault_memory(**kwargs)
    assert ei.value.errno == err and td.vm.mmu.leaves == ()


def test_private_pages_are_augmented_and_accepted_later(td):
    vm, v = td.vm, td.vcpus[0]
    assert v.pre_fault_memory(BASE, 4 * PAGE_SIZE) == (BASE + 4 * PAGE_SIZE, 0)
    assert [g for g, _ in vm.mmu.leaves] == [(BASE >> PAGE_SHIFT) + i for i in range(4)]
    run = v.run([guest.read(BASE + PAGE_SIZE)])
    assert run.exit_reason == ExitReason.HLT and v.guest_log[-1].ve.kind == "pending"
    assert v.stats.get("nr_ept_violations", 0) == 0          # no fault: only the #VE
    check_invariants(vm.kvm.host)


def test_shared_pages_map_the_direct_root(td):
    vm, v = td.vm, td.vcpus[0]
    vm.set_memory_attributes(BASE, 2 * PAGE_SIZE, 0)
    assert v.pre_fault_memory(BASE, 2 * PAGE_SIZE)[1] == 0
    assert [g for g, _ in vm.direct.items()] == [BASE >> PAGE_SHIFT, (BASE >> PAGE_SHIFT) + 1]
    assert vm.mmu.leaves == ()


def test_before_finalize_is_eopnotsupp():
    host = tdx.Host(packages=1, cpus_per_package=2, memory=64 << 20, tdx_keyids=4, seed=0)
    vm = tdx.Kvm(host).create_vm(tdx.VmType.TDX)
    helpers.td_initialize(vm)
    gmem = helpers.vm_userspace_mem_region_add(vm, 0, BASE, 1 << 20)
    v = vm.create_vcpu(0)
    v.init_vcpu()
    with pytest.raises(KvmError) as ei:
        v.pre_fault_memory(BASE, PAGE_SIZE)
    assert ei.value.errno == errno.EOPNOTSUPP
    v.close()
    gmem.close()
    vm.close()


def test_signal_stops_with_progress_or_eintr(td):
    v = td.vcpus[0]
    v.raise_signal()
    with pytest.raises(KvmError) as ei:
        v.pre_fault_memory(BASE, PAGE_SIZE)
    assert ei.value.errno == errno.EINTR and td.vm.mmu.leaves == ()


def test_attribute_mismatch_cannot_happen_but_no_gmem_is_efault(td):
    vm, v = td.vm, td.vcpus[0]
    host = vm.kvm.host
    vm.set_user_memory_region2(5, 0, 0xC000_0000, PAGE_SIZE, host.mmap(PAGE_SIZE))
    vm.set_memory_attributes(0xC000_0000, PAGE_SIZE, MemAttr.PRIVATE)
    with pytest.raises(KvmError) as ei:
        v.pre_fault_memory(0xC000_0000, PAGE_SIZE)
    assert ei.value.errno == errno.EFAULT
