"""KVM_CREATE_VCPU, KVM_TDX_INIT_VCPU, KVM_TDX_FINALIZE_VM on a TD: errnos, precedence, KVM_BUG,
vCPU lifetime (tdx-facts §5.4, §5.6; anchors §2.3, A21)."""

from __future__ import annotations

import errno

import pytest

from tdxcore.constants import KVM_MAX_VCPU_IDS, TDVPS_NR_PAGES, Cap, VmType
from tdxcore.errors import KvmError
from tdxcore.invariants import check_invariants
from tdxcore.kvm import TdState, Vcpu, VcpuTdState
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_OP_STATE,
    OPERAND_ID_RCX,
    TDX_MAX_VCPUS_EXCEEDED,
    TDX_OP_STATE_INCORRECT,
    TDX_OPERAND_BUSY,
    TDX_SYS_NOT_READY,
    Leaf,
)
from tests.kvm.test_tdx_vm_init import new_td, seamcalls


@pytest.fixture
def td():
    host, kvm, vm = new_td()
    vm.init_vm()
    return host, kvm, vm


def test_create_vcpu_before_init_vm_eio():
    host, kvm, vm = new_td()
    with pytest.raises(KvmError) as ei:
        vm.create_vcpu(0)
    assert ei.value.errno == errno.EIO and vm.created_vcpus == 0 and vm.users_count == 1


def test_create_vcpu_needs_split_irqchip():
    host, kvm, vm = new_td(split=False)
    vm.init_vm()
    with pytest.raises(KvmError, match="SPLIT_IRQCHIP") as ei:
        vm.create_vcpu(0)
    assert ei.value.errno == errno.EINVAL and vm.vcpus == []


def test_create_vcpu_id_limits_and_duplicates(td):
    host, kvm, vm = td
    with pytest.raises(KvmError) as ei:
        vm.create_vcpu(KVM_MAX_VCPU_IDS)
    assert ei.value.errno == errno.EINVAL
    v = vm.create_vcpu(KVM_MAX_VCPU_IDS - 1)
    assert isinstance(v, Vcpu) and kvm.fds.get(v.fd) is v and vm.users_count == 2
    with pytest.raises(KvmError) as ei:
        vm.create_vcpu(KVM_MAX_VCPU_IDS - 1)
    assert ei.value.errno == errno.EEXIST and vm.created_vcpus == 1
    for i in range(vm.max_vcpus - 1):
        vm.create_vcpu(i)
    with pytest.raises(KvmError, match="max_vcpus") as ei:
        vm.create_vcpu(100)
    assert ei.value.errno == errno.EINVAL


def test_init_vcpu_and_finalize_happy(td):
    host, kvm, vm = td
    free0 = host.free_frames
    v = vm.create_vcpu(0)
    v.init_vcpu(rcx=0x1234)
    assert v.state is VcpuTdState.INITIALIZED and len(v.tdcx) == TDVPS_NR_PAGES - 1
    assert host.free_frames == free0 - TDVPS_NR_PAGES
    mv = host.tdx.vcpu(v.tdvpr)
    assert mv.initialized and mv.x2apic_id == 0
    with pytest.raises(KvmError) as ei:
        v.init_vcpu()
    assert ei.value.errno == errno.EINVAL
    vm.finalize_vm()
    assert vm.td_state is TdState.RUNNABLE and vm.pre_fault_allowed
    with pytest.raises(KvmError) as ei:
        vm.finalize_vm()
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as ei:      # tdx_vcpu_ioctl: TD already RUNNABLE
        vm.create_vcpu(1).init_vcpu()
    assert ei.value.errno == errno.EIO or ei.value.errno == errno.EINVAL
    check_invariants(host)


def test_init_vcpu_bad_input(td):
    host, kvm, vm = td
    v = vm.create_vcpu(0)
    free0 = host.free_frames
    for kw, frag in ((dict(hw_error=1), "hw_error"), (dict(flags=1), "flags")):
        with pytest.raises(KvmError, match=frag) as ei:
            v.init_vcpu(**kw)
        assert ei.value.errno == errno.EINVAL and v.state is VcpuTdState.UNINITIALIZED
    assert host.free_frames == free0 and seamcalls(host, Leaf.TDH_VP_CREATE) == 0


def test_finalize_errors(td):
    host, kvm, vm = td
    with pytest.raises(KvmError, match="hw_error") as ei:
        vm.finalize_vm(hw_error=5)
    assert ei.value.errno == errno.EINVAL
    vm.nr_premapped = 1
    with pytest.raises(KvmError, match="pre-mapped") as ei:
        vm.finalize_vm()
    assert ei.value.errno == errno.EINVAL and vm.td_state is TdState.INITIALIZED
    vm.nr_premapped = 0
    busy = TDX_OPERAND_BUSY | OPERAND_ID_OP_STATE
    host.tdx.inject(Leaf.TDH_MR_FINALIZE, busy)
    with pytest.raises(KvmError) as ei:
        vm.finalize_vm()
    assert ei.value.errno == errno.EBUSY and ei.value.hw_error == busy and not vm.is_bugged
    vm.finalize_vm()
    assert vm.td_state is TdState.RUNNABLE and vm.last_hw_error == 0


def test_finalize_uninitialized_einval():
    host, kvm, vm = new_td()
    with pytest.raises(KvmError) as ei:
        vm.finalize_vm()
    assert ei.value.errno == errno.EINVAL and seamcalls(host, Leaf.TDH_MR_FINALIZE) == 0


def test_finalize_other_error_kvm_bug(td):
    host, kvm, vm = td
    host.tdx.inject(Leaf.TDH_MR_FINALIZE, TDX_OP_STATE_INCORRECT)
    with pytest.raises(KvmError) as ei:
        vm.finalize_vm()
    assert ei.value.errno == errno.EIO and ei.value.hw_error == TDX_OP_STATE_INCORRECT
    assert vm.is_bugged and vm.is_dead
    for call in (vm.finalize_vm, lambda: vm.create_vcpu(0), lambda: vm.check_extension(Cap.SPLIT_IRQCHIP)):
        with pytest.raises(KvmError) as ei:
            call()
        assert ei.value.errno == errno.EIO


INIT_VCPU_INJECT = [
    (Leaf.TDH_VP_CREATE, TDX_MAX_VCPUS_EXCEEDED, None, None),
    (Leaf.TDH_VP_CREATE, TDX_OPERAND_BUSY | OPERAND_ID_RCX, None, None),
    (Leaf.TDH_VP_ADDCX, TDX_OPERAND_BUSY | OPERAND_ID_RCX, 1, 0),
    (Leaf.TDH_VP_ADDCX, TDX_OPERAND_BUSY | OPERAND_ID_RCX, 3, 2),
    (Leaf.TDH_VP_INIT, TDX_SYS_NOT_READY, None, TDVPS_NR_PAGES - 1),
]


@pytest.mark.parametrize("leaf,status,nth,held_tdcx", INIT_VCPU_INJECT,
                         ids=[f"{c[0].name}-{c[1]:#x}-{c[2]}" for c in INIT_VCPU_INJECT])
def test_init_vcpu_injection_kvm_bug(td, leaf, status, nth, held_tdcx):
    host, kvm, vm = td
    free_vm = host.free_frames + 1 + len(vm.tdcs)   # frames before INIT_VM, less the TD
    v = vm.create_vcpu(0)
    free0 = host.free_frames
    seen = [0]

    def m(call):
        seen[0] += 1
        return nth is None or seen[0] == nth
    host.tdx.inject(leaf, status, match=m)
    with pytest.raises(KvmError) as ei:
        v.init_vcpu()
    assert ei.value.errno == errno.EIO and vm.is_bugged and v.state is VcpuTdState.UNINITIALIZED
    held = 0 if held_tdcx is None else 1 + held_tdcx
    assert host.free_frames == free0 - held and len(v.tdcx) == (held_tdcx or 0)
    with pytest.raises(KvmError) as ei:
        v.init_vcpu()
    assert ei.value.errno == errno.EIO
    check_invariants(host)
    v.close()
    assert not vm.is_destroyed
    vm.close()
    # the HKID is released at destroy, so the held TDVPR/TDCX pages are reclaimed
    assert vm.is_destroyed and host.leaks == () and host.free_frames == free_vm
    assert host.keyids.allocated == ()


def test_vcpu_fd_keeps_vm_alive(td):
    host, kvm, vm = td
    v = vm.create_vcpu(0)
    v.init_vcpu()
    vm.close()
    assert not vm.is_destroyed and vm.users_count == 1 and vm.hkid is not None
    with pytest.raises(KvmError) as ei:
        vm.finalize_vm()
    assert ei.value.errno == errno.EBADF
    kvm.close(v.fd)
    assert vm.is_destroyed and host.vms == () and host.keyids.allocated == ()
    with pytest.raises(KvmError) as ei:
        v.close()
    assert ei.value.errno == errno.EBADF
    with pytest.raises(KvmError) as ei:
        v.init_vcpu()
    assert ei.value.errno == errno.EBADF
    assert VmType.TDX == vm.type
