"""VM objects: creation, capabilities, the fd table, and upstream lifetime (SPEC §3.2).

A VM lives while its fd or any of its guest_memfds is open (``__kvm_gmem_create`` takes a VM
reference, ``kvm_gmem_release`` puts it); memslots hold none.
"""

from __future__ import annotations

import errno

import pytest

from tdxcore.constants import (
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_READONLY_MEM,
    KVM_USER_MEM_SLOTS,
    PAGE_SIZE,
    Cap,
    FallocFlag,
    MemAttr,
    MemFlag,
    VmType,
)
from tdxcore.errors import KvmError, TdxTypeError, TdxValueError
from tdxcore.kvm import Kvm, Memfd, Vm
from tdxcore.module.host import Host

P = PAGE_SIZE
GPA = 0xC000_0000


@pytest.fixture
def host():
    return Host(packages=1, cpus_per_package=1, memory=8 << 20)


@pytest.fixture
def kvm(host):
    return Kvm(host)


def test_create_registers_and_close_destroys(kvm, host):
    vm = kvm.create_vm()
    assert isinstance(vm, Vm) and vm.type is VmType.DEFAULT and host.vms == (vm,)
    assert kvm.fds.get(vm.fd) is vm and vm.users_count == 1 and not vm.is_destroyed
    vm.close()
    assert vm.is_destroyed and vm.is_closed and host.vms == () and vm.fd not in kvm.fds


def test_gmem_keeps_vm_alive(kvm, host):
    free = host.free_frames
    vm = kvm.create_vm()
    g1 = vm.create_guest_memfd(4 * P)
    g2 = vm.create_guest_memfd(4 * P)
    g1.fallocate(FallocFlag.KEEP_SIZE, 0, 4 * P)
    vm.close()
    assert not vm.is_destroyed and vm.users_count == 2 and host.vms == (vm,)
    g1.close()
    assert not vm.is_destroyed
    g2.close()
    assert vm.is_destroyed and host.vms == () and host.free_frames == free and len(kvm.fds) == 1


def test_bound_gmem_closed_first_then_vm(kvm, host):
    vm = kvm.create_vm()
    hva = host.mmap(1 << 20)
    g = vm.create_guest_memfd(4 * P)
    vm.set_user_memory_region2(0, MemFlag.GUEST_MEMFD, GPA, 4 * P, hva, 0, g)
    vm.set_user_memory_region2(1, 0, GPA + (1 << 20), 4 * P, hva)
    g.close()  # the slot does not pin the file, the file pins the VM
    assert vm.memslots.id_to_memslot(0, 0).gmem is None and vm.users_count == 1
    vm.close()
    assert vm.is_destroyed and len(vm.memslots) == 0


def test_closed_vm_fd_is_ebadf(kvm):
    vm = kvm.create_vm()
    g = vm.create_guest_memfd(P)
    vm.close()
    for call in (lambda: vm.create_guest_memfd(P), lambda: vm.check_extension(Cap.GUEST_MEMFD),
                 lambda: vm.set_user_memory_region(0, 0, GPA, P, 0),
                 lambda: vm.set_user_memory_region2(0, 0, GPA, P, 0), vm.close):
        with pytest.raises(KvmError, match="VM fd is closed") as e:
            call()
        assert e.value.errno == errno.EBADF
    g.fallocate(FallocFlag.KEEP_SIZE, 0, P)  # the file still works while the VM lives
    g.close()
    assert vm.is_destroyed


def test_vm_types(kvm):
    assert kvm.create_vm(VmType.SW_PROTECTED).type is VmType.SW_PROTECTED
    for t in (VmType.SEV, VmType.SEV_ES, VmType.SNP, 6, 1 << 40):   # TDX: kvm/tdx_vm.py
        with pytest.raises(KvmError, match=f"KVM_CREATE_VM: VM type {int(t)} is not supported") as e:
            kvm.create_vm(t)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(TdxValueError, match="type"):
        kvm.create_vm(-1)
    with pytest.raises(TdxTypeError, match="type"):
        kvm.create_vm("DEFAULT")


def test_check_extension(kvm):
    d, s = kvm.create_vm(), kvm.create_vm(VmType.SW_PROTECTED)
    assert kvm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) == 3
    assert d.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) == 3
    assert s.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) == 1
    assert kvm.check_extension(Cap.MEMORY_ATTRIBUTES) == MemAttr.PRIVATE
    assert d.check_extension(Cap.MEMORY_ATTRIBUTES) == 0
    assert s.check_extension(Cap.MEMORY_ATTRIBUTES) == MemAttr.PRIVATE
    assert d.check_extension(Cap.NR_MEMSLOTS) == KVM_USER_MEM_SLOTS
    assert d.check_extension(KVM_CAP_READONLY_MEM) == 1
    assert d.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE) == 0
    assert kvm.check_extension(Cap.VM_TYPES) == ((1 << VmType.DEFAULT) | (1 << VmType.SW_PROTECTED)
                                                 | (1 << VmType.TDX))
    assert kvm.check_extension(99999) == 0 and kvm.check_extension(-5) == 0
    for cap in (Cap.GUEST_MEMFD, Cap.USER_MEMORY2, Cap.USER_MEMORY):
        assert d.check_extension(cap) == 1


def test_fd_table(kvm):
    assert kvm.fd == 3 and kvm.fds.get(3) is kvm
    vm = kvm.create_vm()
    m = kvm.memfd_create("x")
    g = vm.create_guest_memfd(P)
    assert (vm.fd, m, g.fd) == (4, 5, 6) and isinstance(kvm.fds.get(m), Memfd)
    kvm.close(m)
    assert m not in kvm.fds
    m2 = kvm.memfd_create()
    assert m2 == m  # lowest free number is reused, as close(2)/open(2) do
    for bad in (m + 100, 0):
        with pytest.raises(KvmError, match=f"close: fd {bad} is not open") as e:
            kvm.close(bad)
        assert e.value.errno == errno.EBADF
    with pytest.raises(TdxValueError, match="/dev/kvm"):
        kvm.close(kvm.fd)
    kvm.close(g.fd)
    assert g.is_closed
    kvm.close(vm.fd)
    assert vm.is_destroyed
    assert list(kvm.fds) == [3, m2]
    with pytest.raises(TdxTypeError, match="name"):
        kvm.memfd_create(5)


def test_kvm_needs_a_host():
    with pytest.raises(TdxTypeError, match="host"):
        Kvm(object())


def test_reference_underflow_and_get_after_destroy(kvm):
    vm = kvm.create_vm()
    vm.close()
    with pytest.raises(TdxValueError, match="destroyed"):
        vm.get()
    with pytest.raises(TdxValueError, match="underflow"):
        vm.put()


def test_many_vms_return_every_frame(kvm, host):
    free = host.free_frames
    for i in range(20):
        vm = kvm.create_vm(VmType.SW_PROTECTED if i % 2 else VmType.DEFAULT)
        g = vm.create_guest_memfd(8 * P)
        g.fallocate(FallocFlag.KEEP_SIZE, 0, 8 * P)
        if i % 3:
            vm.close()
            g.close()
        else:
            g.close()
            vm.close()
        assert vm.is_destroyed
    assert host.free_frames == free and host.vms == () and len(kvm.fds) == 1


def test_ioctl_boundary_raises_with_check_name(host):
    """kvm/ioctl.py is the one place a -errno becomes KvmError, named '<IOCTL>: <check>'."""
    from tdxcore.kvm.ioctl import fail, fd_call, ioctl

    def op():
        yield from ()
        return fail(errno.EPERM, "the check")

    with pytest.raises(KvmError, match=r"^\[Errno 1\] KVM_X: the check$") as e:
        ioctl(host, "KVM_X", 7, op())
    assert e.value.errno == errno.EPERM and e.value.hw_error == 0
    assert fd_call(host, "close", None, (0, "")) == 0
    assert [ev for ev in host.events if ev[0] == "ioctl"] == [
        ("ioctl", "host", "KVM_X", 7, errno.EPERM), ("ioctl", "host", "close", None, 0)]


def _scenario(seed):
    host = Host(packages=1, cpus_per_package=1, memory=8 << 20, seed=seed)
    kvm = Kvm(host)
    vm = kvm.create_vm()
    hva = host.mmap(1 << 20)
    g = vm.create_guest_memfd(8 * P)
    g.fallocate(FallocFlag.KEEP_SIZE, 0, 4 * P)
    vm.set_user_memory_region2(0, MemFlag.GUEST_MEMFD, GPA, 4 * P, hva, 0, g)
    vm2 = kvm.create_vm(VmType.SW_PROTECTED)
    vm2.create_guest_memfd(P)
    vm2.close()
    return kvm, vm, g, hva


def test_state_hash_is_stable_and_sensitive():
    k1, vm, g, hva = _scenario(0)
    k2 = _scenario(0)[0]
    assert k1.state_hash() == k2.state_hash()
    h = k1.state_hash()
    vm.set_user_memory_region2(1, 0, GPA + (1 << 20), 4 * P, hva)
    h2 = k1.state_hash()
    g.fallocate(FallocFlag.KEEP_SIZE | FallocFlag.PUNCH_HOLE, 0, P)
    h3 = k1.state_hash()
    assert len({h, h2, h3}) == 3
