"""The storm's actors: vCPUs in the four roles of ``tdx_upm_parallel_test`` and the host mixes (SPEC §8).

Every actor is a generator (SPEC §5) that loops until the storm's ``stop`` flag, one *operation*
at a time: a vCPU's ``KVM_RUN`` of a few guest ops plus userspace's handling of the exits it
causes (implicit conversion on ``KVM_EXIT_MEMORY_FAULT``, MMIO answers, re-runs after a signal);
a host actor's one ioctl or syscall. ``ActorState.in_op`` marks an operation in progress, which
is how ``--no-interleave`` runs each to completion. Programs and targets come from the actor's
own seeded stream (``host.rng("storm.<name>")``), so the run is a function of the seed.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass, field
from typing import Any, Dict, Generator, List, Optional

from tdxcore import guest
from tdxcore.constants import (
    MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
    ExitReason,
    FallocFlag,
    MemAttr,
    MemFlag,
)
from tdxcore.kvm.memslot import UserMemoryRegion, kvm_set_memory_region
from tdxcore.sched import PREEMPT

__all__ = ["StormContext", "ActorState", "vcpu_actor", "host_actor", "MMIO_GPA", "HOST_KINDS"]

#: A GPA with no memslot: a shared access there is MMIO (the #VE the guest turns into TDVMCALL).
MMIO_GPA = 0xC000_0000
_PUNCH = int(FallocFlag.PUNCH_HOLE | FallocFlag.KEEP_SIZE)
#: Host actor kinds (SPEC §8 mixes).
HOST_KINDS = ("punch", "madvise", "to_private", "to_shared", "slot")


@dataclass
class ActorState:
    """Per-actor bookkeeping the storm loop reads."""

    name: str
    in_op: bool = False
    ops: int = 0


@dataclass
class StormContext:
    """What the actors share: the TD, its area, the stop flag and the per-mix counters."""

    host: Any
    vm: Any
    gmem: Any
    slot_id: int
    slot_flags: int
    hva: int
    area_gpa: int
    area_pages: int
    ops_per_run: int
    stop: bool = False
    counts: Dict[str, int] = field(default_factory=dict)
    dead: List[str] = field(default_factory=list)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the per-mix counter ``name``."""
        self.counts[name] = self.counts.get(name, 0) + n

    def page(self, rng: Any, half: Optional[int] = None) -> int:
        """Return a random page GPA of the area (shared bit clear): anywhere, or in half 0 or 1.

        The vCPU roles keep to their half (private roles the first, shared ones the second, as
        the area starts) so two vCPUs do not convert one page back and forth; the host mixes
        work on the whole area.
        """
        if half is None or self.area_pages < 2:
            return self.area_gpa + rng.randrange(self.area_pages) * PAGE_SIZE
        n = self.area_pages // 2
        return self.area_gpa + (half * n + rng.randrange(n)) * PAGE_SIZE


def _program(ctx: StormContext, role: str, rng: Any, vcpu_id: int) -> List[Any]:
    shared = ctx.vm.gpa_shared_mask
    ops: List[Any] = []
    half = 0 if role in ("private_accept", "private") else 1
    for _ in range(1 + rng.randrange(ctx.ops_per_run)):
        gpa = ctx.page(rng, half) + 8 * rng.randrange(PAGE_SIZE // 8)
        value = (vcpu_id << 56) | rng.getrandbits(48)
        if role == "private_accept":
            page = gpa & ~(PAGE_SIZE - 1)
            ops += [guest.accept(page), guest.write(gpa, value)]
        elif role == "private":
            ops.append(guest.write(gpa, value) if rng.random() < 0.5 else guest.read(gpa))
        elif role == "shared":
            ops.append(guest.write(gpa | shared, value) if rng.random() < 0.5 else guest.read(gpa | shared))
        else:
            write = rng.random() < 0.5
            ops.append(guest.mmio(MMIO_GPA | shared, 4, write, value & 0xFFFF_FFFF))
            ops.append(guest.read(gpa | shared))
    return ops


def vcpu_actor(ctx: StormContext, v: Any, role: str, rng: Any, st: ActorState) -> Generator[Any, Any, None]:
    """Run programs of ``role`` on ``v`` and answer its exits, until ``ctx.stop``."""
    vm = v.vm
    while not ctx.stop:
        st.in_op = True
        try:
            ret = yield from v.run_gen(_program(ctx, role, rng, v.vcpu_id))
            runs = 0
            while True:
                runs += 1
                if ret[0] < 0:
                    if ret[0] == -_errno.EIO:            # the VM is dead: nothing runs any more
                        ctx.dead.append(f"{st.name}: {ret[1]}")
                        return
                    msg = f"{st.name}: KVM_RUN failed {ret}"
                    raise AssertionError(msg)
                run = v.kvm_run
                reason = run.exit_reason
                if reason == ExitReason.HLT:
                    break
                if runs > 64:                             # a program that cannot progress: give up
                    v.clear_queue()
                    ctx.count("abandoned_programs")
                    break
                if reason == ExitReason.MEMORY_FAULT:
                    ctx.count("memory_fault_exits")
                    gfn = run.memory_fault.gpa >> PAGE_SHIFT
                    if vm.memslots.gfn_to_memslot(gfn) is None:
                        v.clear_queue()                   # no slot (being deleted): give up this program
                        ctx.count("abandoned_programs")
                        break
                    attrs = MemAttr.PRIVATE if run.memory_fault.flags & MEMORY_EXIT_FLAG_PRIVATE else 0
                    r = yield from vm.set_memory_attributes_gen(run.memory_fault.gpa, PAGE_SIZE, attrs)
                    if r[0] == -_errno.EIO:
                        ctx.dead.append(f"{st.name}: {r[1]}")
                        return
                    ctx.count("implicit_conversions")
                elif reason == ExitReason.MMIO:
                    ctx.count("mmio_exits")
                    if not run.mmio.is_write:
                        run.mmio.data = (0xA5A5A5A5).to_bytes(8, "little")
                elif reason == ExitReason.INTR:
                    ctx.count("signal_exits")
                else:
                    ctx.count(f"exit_{reason.name.lower()}")
                ret = yield from v.run_gen()
        finally:
            st.in_op = False
        st.ops += 1
        yield PREEMPT


def _slot_region(ctx: StormContext, delete: bool) -> UserMemoryRegion:
    size = 0 if delete else ctx.area_pages * PAGE_SIZE
    return UserMemoryRegion(ctx.slot_id, ctx.slot_flags, ctx.area_gpa, size, ctx.hva, 0,
                            None if delete else ctx.gmem)


def host_actor(ctx: StormContext, kind: str, rng: Any, st: ActorState) -> Generator[Any, Any, None]:
    """One host thread of ``kind`` (see :data:`HOST_KINDS`), looping until ``ctx.stop``."""
    vm, host = ctx.vm, ctx.host
    deleted = False
    while not ctx.stop or deleted:
        st.in_op = True
        try:
            gpa = ctx.page(rng)
            if kind == "punch":
                off = gpa - ctx.area_gpa
                r = yield from ctx.gmem._fallocate(_PUNCH, off, PAGE_SIZE)
                ctx.count("punches")
            elif kind == "madvise":
                yield from host.madvise_dontneed_gen(ctx.hva + gpa - ctx.area_gpa, PAGE_SIZE)
                r = (0, "")
                ctx.count("madvise")
            elif kind in ("to_private", "to_shared"):
                attrs = MemAttr.PRIVATE if kind == "to_private" else 0
                r = yield from vm.set_memory_attributes_gen(gpa, PAGE_SIZE, attrs)
                ctx.count("conversions")
            else:
                r = yield from vm._guard(kvm_set_memory_region(vm, _slot_region(ctx, not deleted), v1=False))
                if r[0] == 0:
                    deleted = not deleted
                    ctx.count("slot_deletes" if deleted else "slot_readds")
            if r[0] == -_errno.EIO:
                ctx.dead.append(f"{st.name}: {r[1]}")
                return
            if r[0] < 0:
                msg = f"{st.name}: {kind} failed {r}"
                raise AssertionError(msg)
        finally:
            st.in_op = False
        st.ops += 1
        for _ in range(1 + rng.randrange(4)):
            yield PREEMPT


def make_slot_flags() -> int:
    """Return the area slot's flags (a guest_memfd slot)."""
    return int(MemFlag.GUEST_MEMFD)


def first_slot(vm: Any) -> Optional[Any]:
    """Return the area's memslot (slot 0), or None while deleted."""
    return vm.memslots.id_to_memslot(0, 0)
