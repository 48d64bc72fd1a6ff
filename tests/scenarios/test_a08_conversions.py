"""Scenario A08 (anchors.md §2.4): the pattern of ``private_mem_conversions_test`` on a TD.

4 vCPUs, 4 memslots of 4 MiB on one 16 MiB guest_memfd (slot i at file offset 4i MiB), a
2 MiB + 4 KiB chunk per vCPU. Each vCPU is an actor with its own userspace thread (a generator
that runs the vCPU and answers its exits), interleaved by the seeded scheduler. Explicit phase: for
each (offset, size) stage, the guest checks the host's shared pattern, converts the range to
private with MapGPA, writes and checks a private pattern, converts the odd pages back to shared
and then the whole range, checking through the shared view each time — with and without the
discard (fallocate/madvise) that QEMU does. Punch phase: each chunk's 513 pages private and
faulted in, then each stage's range punched: a punched private page reads back 0.
"""

from __future__ import annotations

from typing import Any, Generator, List

import pytest

import tdxcore as tdx
from tdxcore import guest
from tdxcore.constants import (
    HC,
    MAP_GPA_RANGE_ENCRYPTED,
    PAGE_SHIFT,
    PAGE_SIZE,
    Cap,
    ExitReason,
    FallocFlag,
    MemAttr,
    MemFlag,
)
from tdxcore.invariants import check_invariants
from tdxcore.kvm import helpers
from tdxcore.storm.scheduler import Scheduler

BASE = 4 << 30
MiB = 1 << 20
NVCPU = 4
SLOT = 4 * MiB
CHUNK = 2 * MiB + PAGE_SIZE
STAGES = ((0, PAGE_SIZE), (0, 2 * MiB), (PAGE_SIZE, PAGE_SIZE), (PAGE_SIZE, 2 * MiB), (2 * MiB, PAGE_SIZE))
PUNCH = int(FallocFlag.PUNCH_HOLE | FallocFlag.KEEP_SIZE)


def _build():
    host = tdx.Host(packages=2, cpus_per_package=2, memory=256 << 20, tdx_keyids=8, seed=0)
    kvm = tdx.Kvm(host)
    vm = kvm.create_vm(tdx.VmType.TDX)
    helpers.td_initialize(vm)
    vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << HC.MAP_GPA_RANGE)
    gmem = vm.create_guest_memfd(NVCPU * SLOT)
    for i in range(NVCPU):
        vm.set_user_memory_region2(i, MemFlag.GUEST_MEMFD, BASE + i * SLOT, SLOT, host.mmap(SLOT),
                                   guest_memfd_offset=i * SLOT, guest_memfd=gmem)
    vcpus = [vm.create_vcpu(i) for i in range(NVCPU)]
    for v in vcpus:
        v.init_vcpu()
    helpers.td_finalize(vm)
    return host, vm, gmem, vcpus


def _convert_gen(vm: Any, gmem: Any, gpa: int, size: int, private: bool,
                 discard: bool) -> Generator[Any, Any, None]:
    """What QEMU's kvm_convert_memory does, as a generator (this thread may be preempted)."""
    ret = yield from vm.set_memory_attributes_gen(gpa, size, MemAttr.PRIVATE if private else 0)
    assert ret == (0, "")
    if not discard:
        return
    slot = vm.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
    if private:
        yield from vm.kvm.host.madvise_dontneed_gen(slot.gfn_to_hva(gpa >> PAGE_SHIFT), size)
    else:
        off = (slot.gmem_pgoff << PAGE_SHIFT) + gpa - (slot.base_gfn << PAGE_SHIFT)
        assert (yield from gmem._fallocate(PUNCH, off, size)) == (0, "")


def _run(v: Any, ops: List[Any], gmem: Any, discard: bool, log: List[Any]) -> Generator[Any, Any, Any]:
    """Run ``ops`` on ``v`` to HLT, answering MapGPA exits as userspace does."""
    vm = v.vm
    ret = yield from v.run_gen(ops)
    while True:
        assert ret == (0, ""), ret
        run = v.kvm_run
        if run.exit_reason == ExitReason.HLT:
            return run
        if run.exit_reason == ExitReason.INTR:     # KVM_RUN -EINTR: userspace just runs again
            ret = yield from v.run_gen()
            continue
        assert run.exit_reason == ExitReason.HYPERCALL and run.hypercall.nr == HC.MAP_GPA_RANGE, run
        gpa, npages, attrs = run.hypercall.args[:3]
        log.append((v.vcpu_id, gpa, npages))
        yield from _convert_gen(vm, gmem, gpa, npages << PAGE_SHIFT, bool(attrs & MAP_GPA_RANGE_ENCRYPTED),
                                discard)
        run.hypercall.ret = 0
        ret = yield from v.run_gen()


def _pat(i: int, stage: int, kind: int) -> int:
    return ((kind << 56) | (i << 48) | (stage << 40) | 0x5A5A) & ((1 << 64) - 1)


def _worker(host: Any, vm: Any, gmem: Any, v: Any, discard: bool, log: List[Any],
            seen: List[Any]) -> Generator[Any, Any, None]:
    i = v.vcpu_id
    base = BASE + i * SLOT
    shared = vm.gpa_shared_mask
    slot = vm.memslots.gfn_to_memslot(base >> PAGE_SHIFT)
    hva = slot.userspace_addr
    for k, (off, size) in enumerate(STAGES):
        first, last = base + off, base + off + size - 8
        # the host writes the shared pattern; the guest checks it through the shared alias
        a = _pat(i, k, 1)
        for g in (first, last):
            host.write(hva + g - base, a.to_bytes(8, "little"))
        run = yield from _run(v, [guest.read(first | shared), guest.read(last | shared)], gmem, discard, log)
        assert [e.value for e in v.guest_log[-2:]] == [a, a]
        # convert to private (MapGPA), write and check a private pattern
        b = _pat(i, k, 2)
        yield from _run(v, [guest.map_gpa(base + off, size, shared=False), guest.write(first, b),
                            guest.write(last, b), guest.read(first), guest.read(last)], gmem, discard, log)
        assert [e.value for e in v.guest_log[-2:]] == [b, b]
        for g in (first, last):                  # the host never sees the private data
            data = host.read(hva + g - base, 8)
            seen.append(data)
            assert data != b.to_bytes(8, "little")
        # odd pages back to shared, written by the guest and seen by the host
        c = _pat(i, k, 3)
        odd = [p for p in range(base + off, base + off + size, PAGE_SIZE) if (p - base) // PAGE_SIZE % 2]
        ops: List[Any] = []
        for p in odd:
            ops += [guest.map_gpa(p, PAGE_SIZE, shared=True), guest.write(p | shared, c)]
        if ops:
            yield from _run(v, ops, gmem, discard, log)
            for p in odd:
                assert host.read(hva + p - base, 8) == c.to_bytes(8, "little")
        # the whole range shared: the guest's writes are visible to the host
        d = _pat(i, k, 4)
        yield from _run(v, [guest.map_gpa(base + off, size, shared=True), guest.write(first | shared, d),
                            guest.write(last | shared, d)], gmem, discard, log)
        for g in (first, last):
            assert host.read(hva + g - base, 8) == d.to_bytes(8, "little")
    if discard:                                  # map the whole chunk shared, with the punch
        yield from _convert_gen(vm, gmem, base, CHUNK, False, True)


@pytest.mark.parametrize("discard", [True, False], ids=["fallocate", "no-fallocate"])
def test_a08_explicit_then_punch_phase(discard):
    host, vm, gmem, vcpus = _build()
    log: List[Any] = []
    seen: List[Any] = []
    s = Scheduler(seed=8)
    for v in vcpus:
        s.add(_worker(host, vm, gmem, v, discard, log, seen), f"vcpu{v.vcpu_id}")
    s.run(max_steps=2_000_000)
    assert all(r is None for r in s.results.values()) and not vm.is_bugged
    # no vCPU converted outside its own chunk
    for i, gpa, npages in log:
        lo = BASE + i * SLOT
        assert lo <= gpa and gpa + (npages << PAGE_SHIFT) <= lo + CHUNK
    # after the explicit phase: everything shared, no private leaf; with the discard, gmem empty
    g0 = BASE >> PAGE_SHIFT
    assert vm.mem_attr.has_range(g0, g0 + NVCPU * SLOT // PAGE_SIZE, int(MemAttr.PRIVATE), 0)
    assert vm.mmu.leaves == ()
    if discard:
        assert gmem.nr_pages == 0
    check_invariants(host)

    # punch phase: each chunk's 513 pages private and faulted in, then each stage range punched
    s = Scheduler(seed=9)
    npages = CHUNK // PAGE_SIZE

    def puncher(v):
        i = v.vcpu_id
        base = BASE + i * SLOT
        yield from _convert_gen(vm, gmem, base, CHUNK, True, False)
        yield from _run(v, [guest.write(base + p * PAGE_SIZE, 0xAB00 + p) for p in range(npages)],
                        gmem, False, log)
        for off, size in STAGES:
            assert (yield from gmem._fallocate(PUNCH, i * SLOT + off, size)) == (0, "")
            yield from _run(v, [guest.read(base + off), guest.read(base + off + size - 8)], gmem, False, log)
            assert [e.value for e in v.guest_log[-2:]] == [0, 0]
    for v in vcpus:
        s.add(puncher(v), f"punch{v.vcpu_id}")
    s.run(max_steps=2_000_000)
    for i in range(NVCPU):
        lo = g0 + i * SLOT // PAGE_SIZE
        assert vm.mem_attr.has_range(lo, lo + npages, int(MemAttr.PRIVATE), int(MemAttr.PRIVATE))
        assert vm.mem_attr.has_range(lo + npages, lo + SLOT // PAGE_SIZE, int(MemAttr.PRIVATE), 0)
    check_invariants(host)
    for v in vcpus:
        v.close()
    gmem.close()
    vm.close()
    assert host.leaks == ()
