"""Scenarios A01–A07 (anchors.md §2.4, "Memory attributes and mmu_invalidate"): the attribute
ioctl's validation and no-op rule, the invalidation bookkeeping, a fault racing a conversion under
a forced schedule, memory-fault exits and implicit conversion — on a RUNNABLE TD with GPAW 48, one
16 MiB guest_memfd slot at 4 GiB, attributes shared, no injection."""

from __future__ import annotations

import errno

import pytest

import tdxcore as tdx
from tdxcore import guest
from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE, ExitReason, MemAttr
from tdxcore.errors import KvmError
from tdxcore.invariants import check_invariants
from tdxcore.kvm import helpers
from tdxcore.sched import PREEMPT
from tdxcore.storm.scheduler import Scheduler

BASE = 4 << 30
G = BASE >> PAGE_SHIFT
MiB = 1 << 20
PRIVATE = int(MemAttr.PRIVATE)


@pytest.fixture
def td():
    host = tdx.Host(packages=2, cpus_per_package=2, memory=128 << 20, tdx_keyids=8, seed=0)
    t = helpers.td_create(tdx.Kvm(host), vcpus=2, memory=16 * MiB, gpa=BASE, initial_pages=0)
    t.vm.set_memory_attributes(BASE, 16 * MiB, 0)             # the scenarios start shared
    yield t
    t.close()
    assert host.leaks == ()


def _kinds(host, n0, kind):
    return [e for e in list(host.events)[n0:] if e[0] == kind]


@pytest.mark.parametrize(("kwargs", "what"), [
    ({"address": BASE, "size": 2 * MiB, "attributes": PRIVATE, "flags": 1}, "flags"),
    ({"address": BASE, "size": 2 * MiB, "attributes": 0x1}, "supported"),
    ({"address": BASE, "size": 0, "attributes": PRIVATE}, "empty"),
    ({"address": (1 << 64) - 4096, "size": 8192, "attributes": PRIVATE}, "wraps"),
    ({"address": 0x1000_0800, "size": 4096, "attributes": PRIVATE}, "aligned"),
    ({"address": BASE, "size": 0x800, "attributes": PRIVATE}, "aligned"),
])
def test_a01_validation_changes_nothing(td, kwargs, what):
    vm = td.vm
    seq, runs = vm.mmu_invalidate.seq, list(vm.mem_attr.runs())
    with pytest.raises(KvmError, match=what) as ei:
        vm.set_memory_attributes(**kwargs)
    assert ei.value.errno == errno.EINVAL
    assert vm.mmu_invalidate.seq == seq and list(vm.mem_attr.runs()) == runs


def test_a01_precedence_flags_first(td):
    with pytest.raises(KvmError, match="flags"):
        td.vm.set_memory_attributes(0x1000_0800, 0, 0x1, flags=1)
    with pytest.raises(KvmError, match="supported"):
        td.vm.set_memory_attributes(0x1000_0800, 0, 0x1)
    with pytest.raises(KvmError, match="empty"):
        td.vm.set_memory_attributes(0x1000_0800, 0, PRIVATE)


def test_a01_valid_call(td):
    vm = td.vm
    vm.set_memory_attributes(0x1_0000_0000, 2 * MiB, PRIVATE)
    assert all(vm.get_memory_attributes(g) == PRIVATE for g in range(G, G + 512))
    assert vm.get_memory_attributes(0x100200) == 0


def test_a02_idempotent_set_does_nothing(td):
    vm, host = td.vm, td.vm.kvm.host
    vm.set_memory_attributes(BASE, 2 * MiB, PRIVATE)
    seq = vm.mmu_invalidate.seq
    seen = []
    vm.add_hook("pre_set_memory_attributes", lambda v, **kw: seen.append(kw))
    n0 = len(host.events)
    vm.set_memory_attributes(BASE, 2 * MiB, PRIVATE)
    vm.set_memory_attributes(BASE, 2 * MiB - PAGE_SIZE, PRIVATE)
    assert vm.mmu_invalidate.seq == seq and seen == []
    assert _kinds(host, n0, "invalidate_begin") == [] and _kinds(host, n0, "invalidate_end") == []
    vm.set_memory_attributes(BASE, 2 * MiB, 0)
    assert len(_kinds(host, n0, "invalidate_begin")) == 1 and len(_kinds(host, n0, "invalidate_end")) == 1
    assert vm.mmu_invalidate.seq == seq + 1 and len(seen) == 1


def test_a03_invalidate_bookkeeping_inside_the_window(td):
    vm = td.vm
    seq = vm.mmu_invalidate.seq
    inside = []
    vm.add_hook("pre_set_memory_attributes",
                lambda v, **kw: inside.append((v.mmu_invalidate.in_progress, v.mmu_invalidate.range)))
    vm.set_memory_attributes(BASE, 512 * PAGE_SIZE, PRIVATE)
    assert inside == [(1, (G, G + 512))]
    assert vm.mmu_invalidate.in_progress == 0 and vm.mmu_invalidate.seq == seq + 1


def test_a03_nested_invalidations_merge_to_the_hull(td):
    """An attribute change of [G, G+16) paused in its window, then an MMU-notifier invalidation of
    [G+8, G+64) (madvise of the slot's userspace pages): in_progress 2, range the hull; each end
    bumps seq; the next 0→1 begin resets the range."""
    vm, host = td.vm, td.vm.kvm.host
    seq = vm.mmu_invalidate.seq
    slot = vm.memslots.gfn_to_memslot(G)
    s = Scheduler(seed=0)
    conv = s.add(vm.set_memory_attributes_gen(BASE, 16 * PAGE_SIZE, PRIVATE), "convert")
    s.run_until(conv, PREEMPT)                                 # inside its window
    assert vm.mmu_invalidate.in_progress == 1 and vm.mmu_invalidate.range == (G, G + 16)
    mad = s.add(host.madvise_dontneed_gen(slot.gfn_to_hva(G + 8), 56 * PAGE_SIZE), "madvise")
    seen = []
    vm_end = vm.invalidate_end_locked

    def spy(lo, hi):
        seen.append((vm.mmu_invalidate.in_progress, vm.mmu_invalidate.range))
        vm_end(lo, hi)
    vm.invalidate_end_locked = spy
    try:
        while not mad.done:
            s.step(mad)
        assert seen[0] == (2, (G, G + 64))
        assert vm.mmu_invalidate.in_progress == 1 and vm.mmu_invalidate.seq == seq + 1
        while not conv.done:
            s.step(conv)
    finally:
        del vm.invalidate_end_locked
    assert vm.mmu_invalidate.in_progress == 0 and vm.mmu_invalidate.seq == seq + 2
    vm.set_memory_attributes(BASE + 100 * PAGE_SIZE, PAGE_SIZE, PRIVATE)
    assert vm.mmu_invalidate.seq == seq + 3            # range reset at 0→1: only that gfn was added
    check_invariants(host)


def test_a04_fault_retries_when_a_conversion_races_it(td):
    """vCPU0 faults on private gfn G and snapshots seq; before it takes mmu_lock a conversion of
    [G, G+1) to shared completes: the locked check retries, no S-EPT entry; the second attempt is
    still private but the gfn is shared → KVM_EXIT_MEMORY_FAULT flags PRIVATE."""
    vm, host = td.vm, td.vm.kvm.host
    vm.set_memory_attributes(BASE, 2 * MiB, PRIVATE)
    v = td.vcpus[0]
    s = Scheduler(seed=0)
    a = s.add(v.run_gen([guest.read(BASE)]), "vcpu0")
    s.run_until(a, lambda y: y is PREEMPT and v.stats.get("nr_faults", 0) == 1)
    seq = vm.mmu_invalidate.seq
    vm.set_memory_attributes(BASE, PAGE_SIZE, 0)              # runs to completion meanwhile
    assert vm.mmu_invalidate.seq == seq + 1
    while not a.done:
        s.step(a)
    run = v.kvm_run
    assert v.stats["nr_fault_retries"] == 1 and v.stats["nr_faults"] == 2
    assert run.exit_reason == ExitReason.MEMORY_FAULT and run.ret == -errno.EFAULT
    assert (run.memory_fault.flags, run.memory_fault.gpa, run.memory_fault.size) == (1 << 3, BASE, 4096)
    assert vm.mmu.leaf(G) is None
    assert host.tdx.td(vm.tdr).sept.walk(BASE)[0] != 0 or vm.mmu.leaves == ()
    check_invariants(host)
    v._queue.clear()


def test_a05_invalidation_elsewhere_does_not_force_a_retry(td):
    vm, host = td.vm, td.vm.kvm.host
    vm.set_memory_attributes(BASE, 2 * MiB, PRIVATE)
    H = G + 256
    s = Scheduler(seed=0)
    conv = s.add(vm.set_memory_attributes_gen(H << PAGE_SHIFT, 16 * PAGE_SIZE, 0), "convert")
    s.run_until(conv, PREEMPT)                                 # [H, H+16) in progress
    old = vm.mmu_invalidate.seq
    run = td.vcpus[0].run([guest.read(BASE)])                  # G is outside that range
    assert run.exit_reason == ExitReason.HLT and td.vcpus[0].stats.get("nr_fault_retries", 0) == 0
    assert vm.mmu.leaf(G) is not None
    while not conv.done:
        s.step(conv)
    assert vm.mmu_invalidate.seq == old + 1
    assert vm.mmu_invalidate.retry_gfn(old, G)                 # an accepted false positive
    check_invariants(host)


def test_a06_private_access_to_a_slot_without_gmem(td):
    vm, host = td.vm, td.vm.kvm.host
    vm.set_user_memory_region2(10, 0, 0xC000_0000, PAGE_SIZE, host.mmap(PAGE_SIZE))
    vm.set_memory_attributes(0xC000_0000, PAGE_SIZE, PRIVATE)
    run = td.vcpus[0].run([guest.read(0xC000_0000)])
    assert run.exit_reason == ExitReason.MEMORY_FAULT and run.ret == -errno.EFAULT
    assert (run.memory_fault.flags, run.memory_fault.gpa, run.memory_fault.size) == (8, 0xC000_0000, 4096)
    assert td.vcpus[0].stats["nr_memory_fault_exits"] == 1
    td.vcpus[0]._queue.clear()


def test_a07_implicit_conversion_both_ways(td):
    vm, host = td.vm, td.vm.kvm.host
    v = td.vcpus[0]
    F = BASE + 5 * PAGE_SIZE
    vm.set_memory_attributes(F, PAGE_SIZE, PRIVATE)
    shared = F | vm.gpa_shared_mask
    run = v.run([guest.write(shared, 0x1234), guest.read(shared)])
    assert run.exit_reason == ExitReason.MEMORY_FAULT
    assert (run.memory_fault.flags, run.memory_fault.gpa, run.memory_fault.size) == (0, F, 4096)
    assert vm.mmu.leaf(F >> PAGE_SHIFT) is None
    helpers.handle_memory_conversion(vm, run)                  # userspace converts F to shared
    assert vm.get_memory_attributes(F >> PAGE_SHIFT) == 0
    run = v.run()
    assert run.exit_reason == ExitReason.HLT and v.guest_log[-1].value == 0x1234
    slot = vm.memslots.gfn_to_memslot(F >> PAGE_SHIFT)
    assert host.read(slot.gfn_to_hva(F >> PAGE_SHIFT), 8) == (0x1234).to_bytes(8, "little")
    # reverse: a private access to a shared gfn
    run = v.run([guest.read(F)])
    assert run.exit_reason == ExitReason.MEMORY_FAULT and run.memory_fault.flags == 8
    helpers.handle_memory_conversion(vm, run)
    run = v.run()
    assert run.exit_reason == ExitReason.HLT and v.guest_log[-1].value == 0   # fresh private page
    assert vm.direct.get(F >> PAGE_SHIFT) is None               # the shared mapping was zapped
    check_invariants(host)


def test_upm_private_memory_is_zeroed_after_conversion_back(td):
    """tdx_upm_test: write private, convert to shared (explicitly), then back: the page reads 0."""
    vm = td.vm
    v = td.vcpus[0]
    gpa = BASE + 7 * PAGE_SIZE
    vm.set_memory_attributes(gpa, PAGE_SIZE, PRIVATE)
    assert v.run([guest.write(gpa, 0xDEADBEEF), guest.read(gpa)]).exit_reason == ExitReason.HLT
    assert v.guest_log[-1].value == 0xDEADBEEF
    vm.set_memory_attributes(gpa, PAGE_SIZE, 0)
    assert vm.mmu.leaf(gpa >> PAGE_SHIFT) is None
    vm.set_memory_attributes(gpa, PAGE_SIZE, PRIVATE)
    assert v.run([guest.read(gpa)]).exit_reason == ExitReason.HLT
    assert v.guest_log[-1].value == 0 and v.guest_log[-1].ve is not None
