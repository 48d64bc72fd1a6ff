"""Scenario A09 (anchors §2.4): guest_memfd and memslot validation on a DEFAULT VM and a TD.

``tests/kvm/test_gmem.py`` and ``tests/kvm/test_memslot.py`` cover each rule on a DEFAULT VM (and
``tests/kernel`` against the real kernel); this runs the anchor's list as written — including
the sizes it names (slot A on gmem [0, 4M), slot B on [2M, 6M)), a punch whose *offset* is
unaligned, and a punch starting at or past the end — on both VM types, and checks that every
failure changes nothing.
"""

from __future__ import annotations

import errno

import pytest

from tdxcore.constants import FallocFlag, MemFlag, VmType
from tdxcore.errors import KvmError
from tdxcore.kvm import Kvm
from tdxcore.kvm.helpers import td_initialize
from tdxcore.module.host import Host

P = 4096
MiB = 1 << 20
GM = MemFlag.GUEST_MEMFD
KEEP, PUNCH = FallocFlag.KEEP_SIZE, FallocFlag.PUNCH_HOLE
GPA = 4 << 30


def _vm(kind):
    host = Host(packages=1, cpus_per_package=2, memory=32 << 20)
    kvm = Kvm(host)
    vm = kvm.create_vm(kind)
    if kind == VmType.TDX:
        td_initialize(vm)
    return host, kvm, vm


def _slots(vm):
    return [(s.id, s.base_gfn, s.npages, s.flags, s.gmem_pgoff) for s in vm.memslots]


def _fails(e, call, *args, **kw):
    with pytest.raises(KvmError) as ei:
        call(*args, **kw)
    assert ei.value.errno == e, str(ei.value)


@pytest.mark.parametrize("kind", [VmType.DEFAULT, VmType.TDX], ids=["default", "tdx"])
def test_a09_expected_failures_and_successes(kind):
    host, kvm, vm = _vm(kind)
    hva = host.mmap(16 * MiB)
    fds0 = len(kvm.fds)
    for size in (1, 2048, 4095):                       # gmem size in 1..4095
        _fails(errno.EINVAL, vm.create_guest_memfd, size)
    assert len(kvm.fds) == fds0
    g = vm.create_guest_memfd(8 * MiB)
    for off in (1, 2048, 4095):                        # binding offsets 1..4095
        _fails(errno.EINVAL, vm.set_user_memory_region2, 0, GM, GPA, 4 * MiB, hva, off, g)
    other = kvm.create_vm(VmType.DEFAULT)
    g_other = other.create_guest_memfd(8 * MiB)
    for fd in (vm.fd, kvm.memfd_create(), g_other):    # the VM fd, a non-gmem fd, another VM's gmem
        _fails(errno.EINVAL, vm.set_user_memory_region2, 0, GM, GPA, 4 * MiB, hva, 0, fd)
    _fails(errno.EINVAL, vm.set_user_memory_region2, 0, GM | MemFlag.LOG_DIRTY_PAGES, GPA, 4 * MiB, hva, 0, g)
    assert _slots(vm) == [] and g.bindings == ()
    # slot A on gmem [0, 4M); slot B at a disjoint GPA on gmem [2M, 6M): the range is already bound
    vm.set_user_memory_region2(0, GM, GPA, 4 * MiB, hva, 0, g)
    before = _slots(vm)
    _fails(errno.EINVAL, vm.set_user_memory_region2, 1, GM, GPA + 8 * MiB, 4 * MiB, hva, 2 * MiB, g)
    # a slot whose GPA range overlaps slot A: EEXIST (set_memory_region_test's EEXIST)
    _fails(errno.EEXIST, vm.set_user_memory_region2, 1, GM, GPA + 2 * MiB, 4 * MiB, hva, 4 * MiB, g)
    assert _slots(vm) == before and g.bindings == ((0, 1024, 0),)
    # punch-hole with offset or length not page aligned
    g.fallocate(KEEP, 0, 2 * P)
    pages = g.nr_pages
    _fails(errno.EINVAL, g.fallocate, KEEP | PUNCH, 1, P)
    _fails(errno.EINVAL, g.fallocate, KEEP | PUNCH, 0, P + 1)
    assert g.nr_pages == pages
    # successes: a punch at offset >= size is a no-op; an allocate starting at >= size fails
    free = host.free_frames
    g.fallocate(KEEP | PUNCH, 8 * MiB, P)
    g.fallocate(KEEP | PUNCH, 64 * MiB, 4 * MiB)
    assert g.nr_pages == pages and host.free_frames == free
    _fails(errno.EINVAL, g.fallocate, KEEP, 8 * MiB, P)
    # the disjoint gmem range binds fine
    vm.set_user_memory_region2(1, GM, GPA + 8 * MiB, 4 * MiB, hva, 4 * MiB, g)
    assert g.bindings == ((0, 1024, 0), (1024, 2048, 1))
