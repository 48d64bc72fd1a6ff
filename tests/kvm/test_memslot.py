"""Memslots: create / move / delete / flags, every error rule, gmem binding (issue 5 item 2).

Cites upstream ``set_memory_region_test.c`` (move/delete, slot limit, bad flags, gmem fds and
offsets, overlapping ranges) and ``__kvm_set_memory_region``/``kvm_gmem_bind`` (6.18); errnos are
the real kernel's (``tests/kernel``).
"""

from __future__ import annotations

import errno

import pytest

from tdxcore.constants import KVM_USER_MEM_SLOTS, MODEL_MAXPHYADDR, PAGE_SHIFT, PAGE_SIZE, MemFlag, VmType
from tdxcore.errors import KvmError, TdxTypeError, TdxValueError
from tdxcore.kvm import Kvm
from tdxcore.kvm.memslot import UserMemoryRegion, kvm_set_memory_region
from tdxcore.module.host import Host
from tdxcore.sched import PREEMPT, WRITE, Actor, Driver

P = PAGE_SIZE
MiB = 1 << 20
GPA = 0xC000_0000
GM = MemFlag.GUEST_MEMFD
RO = MemFlag.READONLY
LOG = MemFlag.LOG_DIRTY_PAGES


@pytest.fixture
def hva(host):
    return host.mmap(64 * MiB)


def slots(vm):
    return [(s.id, s.base_gfn, s.npages, s.flags, s.userspace_addr, s.gmem, s.gmem_pgoff)
            for s in vm.memslots]


def err(exc_info):
    return exc_info.value.errno


def test_create_move_flags_delete(vm, hva):
    vm.set_user_memory_region2(0, 0, GPA, 2 * MiB, hva)
    assert slots(vm) == [(0, GPA >> PAGE_SHIFT, 512, 0, hva, None, 0)]
    vm.set_user_memory_region2(0, 0, GPA, 2 * MiB, hva)  # nothing to change
    vm.set_user_memory_region2(0, 0, GPA + 4 * MiB, 2 * MiB, hva)  # move
    assert vm.memslots.gfn_to_memslot((GPA + 4 * MiB) >> PAGE_SHIFT).id == 0
    assert vm.memslots.gfn_to_memslot(GPA >> PAGE_SHIFT) is None
    vm.set_user_memory_region(0, LOG, GPA + 4 * MiB, 2 * MiB, hva)  # flags only, via v1
    assert slots(vm)[0][3] == LOG
    vm.set_user_memory_region2(0, LOG, GPA + 4 * MiB, 0, hva)  # delete
    assert slots(vm) == []
    s = vm.memslots
    vm.set_user_memory_region2(0, 0, GPA, 2 * MiB, hva)
    assert len(s) == 1 and s.id_to_memslot(0, 0).gfn_to_hva((GPA >> PAGE_SHIFT) + 1) == hva + P


@pytest.mark.parametrize("kw,e,match", [
    (dict(slot=KVM_USER_MEM_SLOTS), errno.EINVAL, "KVM_USER_MEM_SLOTS"),
    (dict(slot=0xFFFF), errno.EINVAL, "KVM_USER_MEM_SLOTS"),
    (dict(slot=(1 << 16) | 5), errno.EINVAL, "address space 1"),
    (dict(flags=1 << 3), errno.EINVAL, "outside valid"),
    (dict(flags=GM | RO, guest_memfd=100000), errno.EINVAL, "outside valid"),
    (dict(flags=GM | LOG), errno.EINVAL, "outside valid"),
    (dict(guest_phys_addr=GPA + 1), errno.EINVAL, "guest_phys_addr .* not page aligned"),
    (dict(memory_size=P - 1), errno.EINVAL, "memory_size .* not page aligned"),
    (dict(userspace_off=8), errno.EINVAL, "userspace_addr .* not page aligned"),
    (dict(userspace_addr=(1 << 47) - 2 * MiB), errno.EINVAL, "not a user range"),
    (dict(userspace_addr=1 << 63), errno.EINVAL, "not a user range"),
    (dict(guest_phys_addr=(1 << 64) - MiB), errno.EINVAL, "wraps"),
    (dict(guest_phys_addr=1 << MODEL_MAXPHYADDR), errno.EINVAL, "max gfn"),
    (dict(memory_size=0), errno.EINVAL, "does not exist"),
    (dict(flags=GM, guest_memfd=100000), errno.EBADF, "not an open fd"),
    (dict(flags=GM, guest_memfd_offset=1, guest_memfd=100000), errno.EINVAL, "unaligned or wraps"),
])
def test_errors_change_nothing(vm, hva, host, kw, e, match):
    args = dict(slot=0, flags=0, guest_phys_addr=GPA, memory_size=2 * MiB, userspace_addr=hva,
                guest_memfd_offset=0, guest_memfd=0)
    args["userspace_addr"] += kw.pop("userspace_off", 0)
    args.update(kw)
    vm.set_user_memory_region2(1, 0, GPA + 64 * MiB, MiB, hva)
    before = slots(vm)
    with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION2: .*" + match) as ei:
        vm.set_user_memory_region2(**args)
    assert err(ei) == e and slots(vm) == before


def test_boundaries_accepted(vm):
    vm.set_user_memory_region2(KVM_USER_MEM_SLOTS - 1, 0, GPA, 2 * MiB, 0)
    vm.set_user_memory_region2(1, 0, GPA + 2 * MiB, 2 * MiB, (1 << 47) - P - 2 * MiB)
    vm.set_user_memory_region2(2, 0, (1 << MODEL_MAXPHYADDR) - 2 * MiB, 2 * MiB, 0x10000)
    assert len(vm.memslots) == 3


def test_overlap_eexist_and_adjacent(vm, hva):
    vm.set_user_memory_region2(0, 0, GPA, 2 * MiB, hva)
    for gpa in (GPA + MiB, GPA - MiB, GPA):
        with pytest.raises(KvmError, match="overlaps slot 0") as ei:
            vm.set_user_memory_region2(1, 0, gpa, 2 * MiB, hva)
        assert err(ei) == errno.EEXIST
    vm.set_user_memory_region2(1, 0, GPA + 2 * MiB, 2 * MiB, hva)  # adjacent, same user memory
    with pytest.raises(KvmError) as ei:  # a move onto another slot
        vm.set_user_memory_region2(0, 0, GPA + 3 * MiB, 2 * MiB, hva)
    assert err(ei) == errno.EEXIST


@pytest.mark.parametrize("kw", [dict(memory_size=MiB), dict(userspace_addr=8 * MiB), dict(flags=RO)])
def test_existing_slot_immutable_fields(vm, hva, kw):
    vm.set_user_memory_region2(0, 0, GPA, 2 * MiB, hva)
    args = dict(slot=0, flags=0, guest_phys_addr=GPA + 8 * MiB, memory_size=2 * MiB, userspace_addr=hva)
    if "userspace_addr" in kw:
        kw = dict(userspace_addr=hva + kw["userspace_addr"])
    args.update(kw)
    with pytest.raises(KvmError, match="cannot change") as ei:
        vm.set_user_memory_region2(**args)
    assert err(ei) == errno.EINVAL


def test_v1_rejects_v2_flags(vm, hva):
    for flags in (GM, 1 << 3):
        with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION: flags .* v1") as ei:
            vm.set_user_memory_region(0, flags, GPA, 2 * MiB, hva)
        assert err(ei) == errno.EINVAL
    vm.set_user_memory_region(0, RO | LOG, GPA, 2 * MiB, hva)


def test_gmem_bind_rules(vm, kvm, hva):
    g = vm.create_guest_memfd(8 * P)
    vm2 = kvm.create_vm()
    g2 = vm2.create_guest_memfd(8 * P)
    memfd = kvm.memfd_create()
    for fd in (memfd, vm.fd, kvm.fd, g2, g2.fd):
        with pytest.raises(KvmError) as ei:
            vm.set_user_memory_region2(0, GM, GPA, 4 * P, hva, 0, fd)
        assert err(ei) == errno.EINVAL
    for off in (1, P - 1, P * 5, (1 << 63)):
        with pytest.raises(KvmError) as ei:
            vm.set_user_memory_region2(0, GM, GPA, 4 * P, hva, off, g)
        assert err(ei) == errno.EINVAL
    vm.set_user_memory_region2(0, GM, GPA, 4 * P, hva, 0, g)
    assert g.bindings == ((0, 4, 0),) and vm.memslots.id_to_memslot(0, 0).gmem is g
    with pytest.raises(KvmError, match="already bound") as ei:  # disjoint GPA, overlapping file pages
        vm.set_user_memory_region2(1, GM, GPA + MiB, 4 * P, hva, 2 * P, g)
    assert err(ei) == errno.EINVAL and g.bindings == ((0, 4, 0),)
    with pytest.raises(KvmError) as ei:  # both overlap: the GPA check comes first
        vm.set_user_memory_region2(1, GM, GPA + 2 * P, 4 * P, hva, 2 * P, g)
    assert err(ei) == errno.EEXIST
    vm.set_user_memory_region2(1, GM, GPA + MiB, 4 * P, hva, 4 * P, g.fd)
    assert g.bindings == ((0, 4, 0), (4, 8, 1))
    with pytest.raises(KvmError, match="can only be deleted") as ei:
        vm.set_user_memory_region2(1, GM, GPA + 2 * MiB, 4 * P, hva, 4 * P, g)
    assert err(ei) == errno.EINVAL
    vm.set_user_memory_region2(1, 0, GPA + MiB, 0, hva)
    assert g.bindings == ((0, 4, 0),)


def test_bind_rolled_back_when_arch_check_fails(vm, hva):
    g = vm.create_guest_memfd(4 * P)
    with pytest.raises(KvmError, match="max gfn"):
        vm.set_user_memory_region2(0, GM, 1 << MODEL_MAXPHYADDR, 4 * P, hva, 0, g)
    assert g.bindings == () and len(vm.memslots) == 0


def test_closed_gmem_object_and_number_are_ebadf(vm, hva):
    g = vm.create_guest_memfd(4 * P)
    fd = g.fd
    g.close()
    for x in (g, fd):
        with pytest.raises(KvmError) as ei:
            vm.set_user_memory_region2(0, GM, GPA, 4 * P, hva, 0, x)
        assert err(ei) == errno.EBADF


def test_close_while_bound_keeps_slot(vm, hva):
    g = vm.create_guest_memfd(4 * P)
    vm.set_user_memory_region2(0, GM, GPA, 4 * P, hva, 0, g)
    g.close()
    s = vm.memslots.id_to_memslot(0, 0)
    assert s is not None and s.gmem is None
    vm.set_user_memory_region2(0, GM, GPA, 0, hva)
    g1 = vm.create_guest_memfd(4 * P)
    vm.set_user_memory_region2(0, GM, GPA, 4 * P, hva, 0, g1)
    assert g1.bindings == ((0, 4, 0),)


def test_sw_protected_vm(kvm, hva):
    vm = kvm.create_vm(VmType.SW_PROTECTED)
    assert vm.has_private_mem and vm.nr_memslot_as_ids == 1
    g = vm.create_guest_memfd(4 * P)
    vm.set_user_memory_region2(0, GM, GPA, 4 * P, hva, 0, g)
    vm.set_user_memory_region2(1, RO, GPA + MiB, 4 * P, hva)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(slot=-1), TdxValueError, "slot"), (dict(slot=1 << 32), TdxValueError, "slot"),
    (dict(flags=1 << 32), TdxValueError, "flags"),
    (dict(guest_phys_addr=-P), TdxValueError, "guest_phys_addr"),
    (dict(memory_size=1.0), TdxTypeError, "memory_size"),
    (dict(guest_memfd="3"), TdxTypeError, "guest_memfd"),
    (dict(guest_memfd=1 << 32), TdxValueError, "guest_memfd"),
    (dict(guest_memfd=True), TdxTypeError, "guest_memfd"),
])
def test_python_misuse(vm, kw, exc, name):
    args = dict(slot=0, flags=0, guest_phys_addr=GPA, memory_size=2 * MiB, userspace_addr=0)
    args.update(kw)
    with pytest.raises(exc, match=name):
        vm.set_user_memory_region2(**args)
    assert len(vm.memslots) == 0


def test_delete_marks_slot_invalid_before_commit(vm, hva):
    """DELETE/MOVE yield with the old slot KVM_MEMSLOT_INVALID, holding slots_lock (SPEC §5)."""
    vm.set_user_memory_region2(0, 0, GPA, 2 * MiB, hva)
    old = vm.memslots.id_to_memslot(0, 0)
    d = Driver()
    a = Actor("delete", kvm_set_memory_region(vm, UserMemoryRegion(0, 0, GPA, 0, hva), v1=False))
    d.step(a)  # asks for slots_lock
    d.step(a)  # takes it, marks the slot invalid, yields
    assert a.waiting_on is None and old.invalid and vm.memslots.id_to_memslot(0, 0) is old
    assert vm.slots_lock.is_held_by(a, WRITE)
    b = Actor("create", kvm_set_memory_region(vm, UserMemoryRegion(1, 0, GPA + 4 * MiB, MiB, hva), v1=False))
    d.step(b)
    assert not d.runnable(b)  # blocked on slots_lock
    while not a.done:         # synchronize_srcu, the zap under mmu_lock, then the commit
        d.step(a)
    assert a.done and a.result == (0, "") and len(vm.memslots) == 0
    d.step(b)
    assert b.done and len(vm.memslots) == 1
    assert PREEMPT is not None


# --------------------------------------------------------------------------------------------
# Stateful: random ioctls keep the memslot/guest_memfd invariants, and a failure changes nothing
# --------------------------------------------------------------------------------------------
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402

from tdxcore.constants import FallocFlag  # noqa: E402


class MemslotMachine(RuleBasedStateMachine):
    """Memslots and guest_memfd under random create/move/delete/bind/punch/close sequences."""

    @initialize()
    def setup(self):
        self.host = Host(packages=1, cpus_per_package=1, memory=8 << 20)
        self.kvm = Kvm(self.host)
        self.vm = self.kvm.create_vm(VmType.DEFAULT)
        self.other = self.kvm.create_vm(VmType.DEFAULT).create_guest_memfd(8 * P)
        self.hva = self.host.mmap(64 * MiB)
        self.free0 = self.host.free_frames
        self.files = [self.vm.create_guest_memfd(8 * P), self.vm.create_guest_memfd(16 * P)]

    def _snapshot(self):
        return self.vm.state_bytes() + b"".join(f.state_bytes() for f in self.files), self.host.free_frames

    def _expect_no_change_on_error(self, call):
        before = self._snapshot()
        try:
            call()
        except KvmError:
            assert self._snapshot() == before

    @rule(slot=st.integers(0, 3), gpa=st.integers(0, 12), size=st.sampled_from([2, 4, 8]),
          which=st.sampled_from([0, 0, 1, 1, -1, -2]), off=st.sampled_from([0, 2, 4, 8, 12]))
    def bind(self, slot, gpa, size, which, off):
        target = self.files[which] if which >= 0 else (self.other, 100000)[which + 2]
        self._expect_no_change_on_error(lambda: self.vm.set_user_memory_region2(
            slot, GM, GPA + gpa * P, size * P, self.hva, off * P, target))

    @rule(slot=st.integers(0, 3), flags=st.sampled_from([0, LOG, RO, GM | RO, 1 << 3]),
          gpa=st.integers(0, 12), size=st.sampled_from([2, 4, 8]), uaddr=st.sampled_from([0, 0, 4, 1]),
          v1=st.booleans())
    def plain(self, slot, flags, gpa, size, uaddr, v1):
        f = self.vm.set_user_memory_region if v1 else self.vm.set_user_memory_region2
        self._expect_no_change_on_error(lambda: f(slot, flags, GPA + gpa * P, size * P, self.hva + uaddr * P))

    @rule(i=st.integers(0, 7))
    def delete(self, i):
        """Delete an existing slot (mostly), or a missing one (EINVAL)."""
        existing = [s.id for s in self.vm.memslots]
        slot = existing[i % len(existing)] if existing and i < 6 else 4
        self._expect_no_change_on_error(lambda: self.vm.set_user_memory_region2(slot, 0, GPA, 0, self.hva))

    @rule(i=st.integers(0, 1), mode=st.sampled_from([1, 1, 3, 2, 0]), off=st.integers(0, 17),
          n=st.integers(0, 8))
    def fallocate(self, i, mode, off, n):
        self._expect_no_change_on_error(lambda: self.files[i].fallocate(FallocFlag(mode), off * P, n * P))

    @rule(i=st.integers(0, 1))
    def reopen(self, i):
        """Close file i (EBADF if already closed) and make a fresh one in its place."""
        self._expect_no_change_on_error(self.files[i].close)
        self.files[i] = self.vm.create_guest_memfd((8, 16)[i] * P)

    @invariant()
    def slots_and_bindings_agree(self):
        if not hasattr(self, "vm"):
            return
        slots = list(self.vm.memslots)
        for a in slots:
            assert self.vm.memslots.overlaps(a.as_id, a.id, a.base_gfn, a.end_gfn) is None
            if a.gmem is not None:
                assert not a.gmem.is_closed and a.gmem.vm is self.vm
                assert (a.gmem_pgoff, a.gmem_pgoff + a.npages, a.id) in a.gmem.bindings
        for f in self.files:
            bs = f.bindings
            for (_, e1, _), (s2, _, _) in zip(bs, bs[1:], strict=False):
                assert e1 <= s2
            for _, e, sid in bs:
                slot = self.vm.memslots.id_to_memslot(0, sid)
                assert slot is not None and slot.gmem is f and e <= f.size >> PAGE_SHIFT
        open_pages = sum(f.nr_pages for f in self.files) + self.other.nr_pages
        assert self.host.free_frames + open_pages == self.free0


TestMemslotMachine = MemslotMachine.TestCase
TestMemslotMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_machine_catches_a_lost_unbind(monkeypatch):
    """Mutation: deleting a gmem slot that forgets to unbind the file is found by the machine."""
    from hypothesis.stateful import run_state_machine_as_test

    from tdxcore.kvm.gmem import GuestMemfd

    monkeypatch.setattr(GuestMemfd, "_unbind", lambda self, slot: None)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(MemslotMachine, settings=settings(
            max_examples=60, stateful_step_count=30, deadline=None, database=None))
