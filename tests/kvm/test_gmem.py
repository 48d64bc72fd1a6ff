"""guest_memfd: creation rules, fallocate, frames, host view, close (issue 5 item 2).

Cites upstream ``guest_memfd_test.c`` (sizes, flags, fallocate, punch-hole reads zero) and the
real-kernel answers of ``tests/kernel`` (SPEC §4.11).
"""

from __future__ import annotations

import errno

import pytest

from tdxcore.constants import KVM_CAP_GUEST_MEMFD_FLAGS, PAGE_SIZE, FallocFlag, GmemFlag, VmType
from tdxcore.errors import KvmError, TdxTypeError, TdxValueError
from tdxcore.kvm import GuestMemfd, Kvm
from tdxcore.module.host import Host
from tdxcore.sched import WRITE, Actor, Driver

P = PAGE_SIZE
KEEP = FallocFlag.KEEP_SIZE
PUNCH = FallocFlag.PUNCH_HOLE


def test_create_basic(vm, kvm):
    g = vm.create_guest_memfd(4 * P)
    assert isinstance(g, GuestMemfd) and g.size == 4 * P and g.flags == 0 and g.nr_pages == 0
    assert kvm.fds.get(g.fd) is g and vm.users_count == 2


@pytest.mark.parametrize("size", [0, 1, P - 1, P + 1, 1 << 63, (1 << 64) - P])
def test_create_bad_size(vm, kvm, size):
    n = len(kvm.fds)
    with pytest.raises(KvmError, match=r"KVM_CREATE_GUEST_MEMFD: size .* positive multiple") as e:
        vm.create_guest_memfd(size)
    assert e.value.errno == errno.EINVAL and len(kvm.fds) == n and vm.users_count == 1


def test_create_huge_is_sparse(vm, host):
    free = host.free_frames
    g = vm.create_guest_memfd((1 << 63) - P)
    assert g.size == (1 << 63) - P and host.free_frames == free


@pytest.mark.parametrize("flags", [1 << 2, 1 << 63, GmemFlag.MMAP | (1 << 5)])
def test_create_unknown_flags(vm, flags):
    with pytest.raises(KvmError, match=r"flags .* outside supported 0x3") as e:
        vm.create_guest_memfd(P, flags)
    assert e.value.errno == errno.EINVAL


def test_flags_checked_before_size(vm):
    with pytest.raises(KvmError, match="flags"):
        vm.create_guest_memfd(0, 1 << 2)


def test_sw_protected_has_no_init_shared(kvm):
    vm = kvm.create_vm(VmType.SW_PROTECTED)
    assert vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) == GmemFlag.MMAP
    vm.create_guest_memfd(P, GmemFlag.MMAP)
    with pytest.raises(KvmError) as e:
        vm.create_guest_memfd(P, GmemFlag.INIT_SHARED)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("size,flags,exc,name", [
    (-1, 0, TdxValueError, "size"), (1 << 64, 0, TdxValueError, "size"), ("4096", 0, TdxTypeError, "size"),
    (P, -1, TdxValueError, "flags"), (P, True, TdxTypeError, "flags"),
])
def test_create_python_misuse(vm, kvm, size, flags, exc, name):
    n = len(kvm.fds)
    with pytest.raises(exc, match=name) as e:
        vm.create_guest_memfd(size, flags)
    assert e.value.name == name and len(kvm.fds) == n


def test_fallocate_takes_and_returns_frames(vm, host):
    g = vm.create_guest_memfd(8 * P)
    free = host.free_frames
    g.fallocate(KEEP, 0, 4 * P)
    assert g.nr_pages == 4 and host.free_frames == free - 4
    g.fallocate(KEEP, 2 * P, 4 * P)  # overlaps: only the two holes are backed
    assert g.nr_pages == 6 and host.free_frames == free - 6
    g.fallocate(KEEP | PUNCH, P, 2 * P)
    assert g.nr_pages == 4 and g.pfn_of(1) is None and g.pfn_of(0) is not None
    g.fallocate(KEEP | PUNCH, 0, 1 << 40)  # far past the end: punches to the end only
    assert g.nr_pages == 0 and host.free_frames == free


def test_punched_page_reads_zero(vm):
    g = vm.create_guest_memfd(4 * P, GmemFlag.MMAP | GmemFlag.INIT_SHARED)
    assert g.read(0, 4 * P) == bytes(4 * P)
    g.write(0, b"\xaa" * (4 * P))
    g.fallocate(KEEP | PUNCH, P, P)
    assert g.read(0, P) == b"\xaa" * P and g.read(P, P) == bytes(P)
    assert g.read(2 * P, 2 * P) == b"\xaa" * (2 * P)
    g.fallocate(KEEP, P, P)  # a fresh frame is zeroed even if the host reuses the old one
    assert g.read(P, P) == bytes(P)


def test_host_view_needs_mmap_and_init_shared(vm):
    g = vm.create_guest_memfd(P, GmemFlag.MMAP)
    with pytest.raises(TdxValueError, match="INIT_SHARED"):
        g.read(0, 1)
    g2 = vm.create_guest_memfd(P, GmemFlag.MMAP | GmemFlag.INIT_SHARED)
    with pytest.raises(TdxValueError, match="size"):
        g2.read(0, P + 1)
    with pytest.raises(TdxTypeError, match="data"):
        g2.write(0, "x")


@pytest.mark.parametrize("mode,offset,length,err,match", [
    (0, 0, P, errno.EOPNOTSUPP, "without FALLOC_FL_KEEP_SIZE"),
    (PUNCH, 0, P, errno.EOPNOTSUPP, "PUNCH_HOLE without KEEP_SIZE"),
    (KEEP | FallocFlag.ZERO_RANGE, 0, P, errno.EOPNOTSUPP, "not allocate or punch"),
    (FallocFlag.COLLAPSE_RANGE | KEEP, 0, P, errno.EOPNOTSUPP, "range-shifting"),
    (FallocFlag.INSERT_RANGE, 0, P, errno.EOPNOTSUPP, "without FALLOC_FL_KEEP_SIZE"),
    (KEEP | (1 << 10), 0, P, errno.EOPNOTSUPP, "unknown mode"),
    (PUNCH | FallocFlag.ZERO_RANGE | KEEP, 0, P, errno.EOPNOTSUPP, "several operations"),
    (KEEP, 1, P, errno.EINVAL, "not page aligned"),
    (KEEP | PUNCH, 0, P + 1, errno.EINVAL, "not page aligned"),
    (KEEP, 4 * P, P, errno.EINVAL, "past the end"),
    (KEEP, 3 * P, 2 * P, errno.EINVAL, "past the end"),
    (KEEP, 0, 0, errno.EINVAL, "length 0 <= 0"),
    (KEEP, -P, P, errno.EINVAL, "< 0"),
    (KEEP, 1 << 62, 1 << 62, errno.EFBIG, "MAX_LFS_FILESIZE"),
    (0, 1, P, errno.EOPNOTSUPP, "KEEP_SIZE"),  # the mode is checked before alignment
])
def test_fallocate_errors(vm, host, mode, offset, length, err, match):
    g = vm.create_guest_memfd(4 * P)
    free = host.free_frames
    with pytest.raises(KvmError, match=match) as e:
        g.fallocate(mode, offset, length)
    assert e.value.errno == err and str(e.value).startswith(f"[Errno {err}] fallocate: ")
    assert host.free_frames == free and g.nr_pages == 0


def test_fallocate_enomem_rolls_back():
    host = Host(packages=1, cpus_per_package=1, memory=4 << 20)
    vm = Kvm(host).create_vm()
    g = vm.create_guest_memfd(1 << 40)
    free = host.free_frames
    g.fallocate(KEEP, 0, 2 * P)
    with pytest.raises(KvmError, match="no host frame") as e:
        g.fallocate(KEEP, 0, (free + 1) * P)
    assert e.value.errno == errno.ENOMEM and host.free_frames == free - 2 and g.nr_pages == 2
    with pytest.raises(KvmError, match="no host frame") as e:  # fails fast, never loops 2^28 times
        g.fallocate(KEEP, 0, 1 << 40)
    g.fallocate(KEEP, 0, free * P)  # exactly enough: the 2 backed pages need no frame
    assert host.free_frames == 0 and g.nr_pages == free


def test_fallocate_enomem_midway_rolls_back(monkeypatch):
    """A frame allocation failing part-way (precheck passed) leaves nothing allocated."""
    from tdxcore.errors import HostError

    host = Host(packages=1, cpus_per_package=1, memory=4 << 20)
    g = Kvm(host).create_vm().create_guest_memfd(16 * P)
    free, real, calls = host.free_frames, host.alloc_frame, []

    def flaky():
        calls.append(1)
        if len(calls) == 3:
            raise HostError(errno.ENOMEM, "injected")
        return real()

    monkeypatch.setattr(host, "alloc_frame", flaky)
    with pytest.raises(KvmError) as e:
        g.fallocate(KEEP, 0, 8 * P)
    assert e.value.errno == errno.ENOMEM and host.free_frames == free and g.nr_pages == 0


def test_fallocate_python_misuse(vm):
    g = vm.create_guest_memfd(P)
    with pytest.raises(TdxTypeError, match="offset"):
        g.fallocate(KEEP, 0.0, P)
    with pytest.raises(TdxValueError, match="mode"):
        g.fallocate(-1, 0, P)


def test_close_frees_and_drops_reference(vm, host, kvm):
    free = host.free_frames
    g = vm.create_guest_memfd(4 * P)
    g.fallocate(KEEP, 0, 4 * P)
    g.close()
    assert g.is_closed and host.free_frames == free and vm.users_count == 1 and g.fd not in kvm.fds
    with pytest.raises(KvmError) as e:
        g.close()
    assert e.value.errno == errno.EBADF
    with pytest.raises(KvmError, match="guest_memfd is closed") as e:
        g.fallocate(KEEP, 0, P)
    assert e.value.errno == errno.EBADF


def test_punch_waits_for_invalidate_lock(vm):
    """The punch is a generator that takes filemap_invalidate_lock for write (SPEC §5)."""
    g = vm.create_guest_memfd(4 * P)
    g.fallocate(KEEP, 0, 4 * P)
    holder = object()
    assert g.invalidate_lock.try_acquire(holder, WRITE)
    d = Driver()
    a = Actor("punch", g._fallocate(int(KEEP | PUNCH), 0, P))
    d.step(a)
    assert not d.runnable(a) and g.nr_pages == 4
    g.invalidate_lock.release(holder, WRITE)
    d.step(a)
    assert a.done and a.result == (0, "") and g.nr_pages == 3


def test_ioctl_events_logged(vm, host):
    with pytest.raises(KvmError):
        vm.create_guest_memfd(0)
    ev = [e for e in host.events if e[0] == "ioctl"]
    assert ev[-1] == ("ioctl", "host", "KVM_CREATE_GUEST_MEMFD", vm.id, errno.EINVAL)
    assert ev[0] == ("ioctl", "host", "KVM_CREATE_VM", None, 0)
