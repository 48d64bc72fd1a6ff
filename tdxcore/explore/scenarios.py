"""The explorer's catalogue: small scenarios named after the upstream races they model (issue 11 item 3).

A :class:`Scenario` builds a fresh :class:`World` (host, KVM, one or two TDs, the actors and the
scenario's own property) for a :class:`~tdxcore.explore.variants.Variant`; the explorer re-builds
it for every branch (stateless search). Setup runs synchronously, before any actor exists, so
only the actors' steps are interleaved. Every actor is finite (bounded loops), so a scenario
terminates under every schedule unless the variant under test livelocks it.

Each entry says which upstream race it models and which broken variants it must catch; under
``LINUX_6_18`` each is proven (no violation) within its ``max_steps`` bound.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generator, List, Optional, Tuple

from tdxcore import guest
from tdxcore.constants import HC, PAGE_SHIFT, PAGE_SIZE, Cap, ExitReason, FallocFlag, MemAttr
from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.explore.variants import BlindInvalidate, Variant
from tdxcore.sched import PREEMPT

__all__ = ["World", "Scenario", "SCENARIOS", "get_scenario", "BASE"]

#: First GPA of every scenario's TD memory.
BASE = 4 << 30
_P = BASE                       # the contended page
_Q = BASE + PAGE_SIZE           # a page the vCPU keeps using
_PUNCH = int(FallocFlag.PUNCH_HOLE | FallocFlag.KEEP_SIZE)

Property = Callable[["World"], Optional[str]]


@dataclass
class World:
    """One execution's objects: the host, its KVMs, TDs, the actors and the scenario's checks.

    Attributes
    ----------
    actors : list of (name, generator, vcpu or None)
        In add order; the vCPU is the one whose private fields the actor owns.
    check : callable, optional
        Called after every step: a message when the scenario's safety property is broken.
    final : callable, optional
        Called once every actor has finished (may tear the TDs down): a message on failure.
    """

    host: Any
    kvms: Tuple[Any, ...]
    tds: Tuple[Any, ...]
    actors: List[Tuple[str, Any, Optional[Any]]] = field(default_factory=list)
    check: Optional[Property] = None
    final: Optional[Property] = None

    @property
    def vm(self) -> Any:
        """The first TD's VM."""
        return self.tds[0].vm


@dataclass(frozen=True)
class Scenario:
    """A catalogue entry.

    Attributes
    ----------
    name : str
        ``tdxcore explore NAME``.
    race : str
        The upstream race it models, in one line.
    build : callable
        ``build(variant) -> World``.
    max_steps : int
        The default (small) bound, run by the default test suite.
    long_max_steps : int
        A larger bound for ``long`` tests.
    catches : tuple of str
        Broken variants the explorer must find a counterexample for.
    """

    name: str
    race: str
    build: Callable[[Variant], World]
    max_steps: int
    long_max_steps: int
    catches: Tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- setup
def _busy_sept() -> int:
    from tdxcore.status import OPERAND_ID_SEPT_TREE, TDX_OPERAND_BUSY  # type: ignore[attr-defined]

    return int(TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE)


def _td(variant: Variant, vcpus: int = 1, pages: int = 8, host: Any = None, kvm: Any = None,
        memory: int = 8 << 20) -> Tuple[Any, Any, Any]:
    """Build a host (8 MiB, one package) and a RUNNABLE TD of ``pages`` private pages at :data:`BASE`."""
    from tdxcore.kvm import Kvm, helpers
    from tdxcore.module.host import Host

    if host is None:
        host = Host(packages=1, cpus_per_package=2, memory=memory, tdx_keyids=4, seed=0)
    if kvm is None:
        kvm = Kvm(host, policy=variant.policy)
    td = helpers.td_create(kvm, vcpus=vcpus, memory=pages * PAGE_SIZE, gpa=BASE, initial_pages=0)
    if "no_invalidate_retry" in variant.hooks:
        td.vm.mmu_invalidate = BlindInvalidate(td.vm.mmu_invalidate)  # type: ignore[assignment]
    return host, kvm, td


def _map(td: Any, *gpas: int) -> None:
    """Map and accept private pages (synchronously, during setup)."""
    ops: List[Any] = []
    for g in gpas:
        ops += [guest.accept(g), guest.write(g, 0x5A)]
    run = td.vcpus[0].run(ops)
    assert run.exit_reason == ExitReason.HLT


def _vcpu(v: Any, ops: List[Any], max_runs: int = 6, on_map_gpa: bool = True) -> Generator[Any, Any, str]:
    """Play KVM_RUN plus its userspace: answer MapGPA (convert, ret 0), give up on a missing slot.

    Returns the exit that ended the program (``hlt``, ``no_slot``, ``memory_fault``, ``eio`` or
    ``runs``: the bound on re-runs was reached).
    """
    vm = v.vm
    ret = yield from v.run_gen(ops)
    for _ in range(max_runs):
        if ret[0] == -_errno.EIO:
            return "eio"
        if ret[0] < 0:
            msg = f"KVM_RUN failed {ret}"
            raise AssertionError(msg)
        run = v.kvm_run
        reason = run.exit_reason
        if reason == ExitReason.HLT:
            return "hlt"
        if reason == ExitReason.MEMORY_FAULT:
            gfn = run.memory_fault.gpa >> PAGE_SHIFT
            if vm.memslots.gfn_to_memslot(gfn) is None:
                v.clear_queue()
                return "no_slot"
            v.clear_queue()
            return "memory_fault"
        if reason == ExitReason.HYPERCALL and on_map_gpa:
            gpa, npages, attrs = run.hypercall.args[:3]
            shared = attrs == 0 or attrs == 2       # MAP_GPA_RANGE_DECRYPTED
            attrs_to = 0 if shared else MemAttr.PRIVATE
            r = yield from vm.set_memory_attributes_gen(gpa, npages * PAGE_SIZE, attrs_to)
            run.hypercall.ret = 0 if r[0] == 0 else 1
        ret = yield from v.run_gen()
    v.clear_queue()
    return "runs"


def _convert(vm: Any, gpa: int, private: bool) -> Generator[Any, Any, Any]:
    r = yield from vm.set_memory_attributes_gen(gpa, PAGE_SIZE, MemAttr.PRIVATE if private else 0)
    return r


def _no_bug(world: World) -> Optional[str]:
    for td in world.tds:
        if td.vm.is_bugged:
            return f"KVM_BUG: {td.vm.bug_reason}"
    return None


def _teardown_clean(world: World) -> Optional[str]:
    """Close every TD; fail on a KVM_BUG or a leak."""
    bug = _no_bug(world)
    if bug:
        return bug
    for td in world.tds:
        td.close()
    if world.host.leaks:
        lk = world.host.leaks[0]
        return f"leak after teardown: {lk.what} pfn={lk.pfn} ({lk.reason})"
    return None


def _stale_private_leaf(world: World) -> Optional[str]:
    """Find a present private mirror leaf whose gfn is shared, outside any invalidation in progress."""
    vm = world.vm
    inv = vm.mmu_invalidate
    if inv.in_progress:
        return None
    for gfn, _pfn in vm.mmu.leaves:
        if not vm.is_private(gfn):
            return f"gfn {gfn:#x} is shared but still has a private mapping (stale fault)"
    return None


# ---------------------------------------------------------------------------------------------- 1
def _memslot_delete_vs_local_retry(variant: Variant) -> World:
    from tdxcore.kvm.memslot import UserMemoryRegion, kvm_set_memory_region
    from tdxcore.status import Leaf  # type: ignore[attr-defined]

    host, kvm, td = _td(variant)
    vm, v = td.vm, td.vcpus[0]
    # the AUG of P keeps answering BUSY: the vCPU stays in the local retry loop
    host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, _busy_sept(), count=None, match=lambda call: call.gpa == _P)
    slot = vm.memslots.id_to_memslot(0, 0)
    region = UserMemoryRegion(0, slot.flags, BASE, 0, slot.userspace_addr, 0, None)

    def delete() -> Generator[Any, Any, Any]:
        r = yield from vm._guard(kvm_set_memory_region(vm, region, v1=False))
        if r[0] != 0:
            msg = f"memslot delete failed: {r}"
            raise AssertionError(msg)
        return r

    def final(w: World) -> Optional[str]:
        if vm.memslots.id_to_memslot(0, 0) is not None:
            return "the memslot was not deleted"
        return _no_bug(w)

    return World(host, (kvm,), (td,), [("vcpu0", _vcpu(v, [guest.read(_P)]), v), ("delete", delete(), None)],
                 check=_no_bug, final=final)


# ---------------------------------------------------------------------------------------------- 2
def _zap_busy_vs_vcpu_entry(variant: Variant) -> World:
    from tdxcore.status import Leaf  # type: ignore[attr-defined]

    host, kvm, td = _td(variant)
    vm, v = td.vm, td.vcpus[0]
    _map(td, _P, _Q)
    # the zap's first BLOCK answers BUSY (the storm's allowlisted injection: never on the retry)
    host.tdx.inject(Leaf.TDH_MEM_RANGE_BLOCK, _busy_sept(), count=1,
                    match=lambda call: not vm.wait_for_sept_zap)
    actors = [("vcpu0", _vcpu(v, [guest.read(_Q), guest.read(_Q)]), v),
              ("convert", _convert(vm, _P, False), None)]
    return World(host, (kvm,), (td,), actors, check=_no_bug, final=_teardown_clean)


# ---------------------------------------------------------------------------------------------- 3
def _conversion_vs_fault_retry(variant: Variant) -> World:
    host, kvm, td = _td(variant)
    vm, v = td.vm, td.vcpus[0]

    def check(w: World) -> Optional[str]:
        return _no_bug(w) or _stale_private_leaf(w)

    actors = [("vcpu0", _vcpu(v, [guest.read(_P)]), v), ("convert", _convert(vm, _P, False), None)]
    return World(host, (kvm,), (td,), actors, check=check, final=_teardown_clean)


# ---------------------------------------------------------------------------------------------- 4
def _double_zap(variant: Variant) -> World:
    host, kvm, td = _td(variant)
    vm = td.vm
    _map(td, _P)

    def punch() -> Generator[Any, Any, Any]:
        r = yield from td.gmem._fallocate(_PUNCH, _P - BASE, PAGE_SIZE)
        return r

    actors = [("punch", punch(), None), ("convert", _convert(vm, _P, False), None)]
    return World(host, (kvm,), (td,), actors, check=_no_bug, final=_teardown_clean)


# ---------------------------------------------------------------------------------------------- 5
def _accept_vs_block(variant: Variant) -> World:
    host, kvm, td = _td(variant)
    vm, v = td.vm, td.vcpus[0]
    actors = [("vcpu0", _vcpu(v, [guest.accept(_P), guest.read(_P)]), v),
              ("convert", _convert(vm, _P, False), None)]
    return World(host, (kvm,), (td,), actors, check=_no_bug, final=_teardown_clean)


# ---------------------------------------------------------------------------------------------- 6
def _track_vs_vp_enter(variant: Variant) -> World:
    host, kvm, td = _td(variant)
    vm, v = td.vm, td.vcpus[0]
    _map(td, _P, _Q)
    actors = [("vcpu0", _vcpu(v, [guest.read(_Q), guest.read(_Q)]), v),
              ("convert", _convert(vm, _P, False), None)]
    return World(host, (kvm,), (td,), actors, check=_no_bug, final=_teardown_clean)


# ---------------------------------------------------------------------------------------------- 7
def _hkid_release_vs_reclaim(variant: Variant) -> World:
    host, kvm, td1 = _td(variant, pages=2)
    _, _, td2 = _td(variant, host=host, kvm=kvm, pages=2)
    for td in (td1, td2):
        _map(td, _P)

    def teardown(td: Any) -> Generator[Any, Any, None]:
        # userspace tears a TD down: punch the guest memory (zaps it while the HKID is assigned),
        # then drop every reference; the last one runs kvm_destroy_vm (6.18 order: release the
        # HKID under tdx_lock — VP.FLUSH, VPFLUSHDONE, CACHE.WB, KEY.FREEID — then free the vCPUs
        # and reclaim the S-EPT and control pages)
        r = yield from td.gmem._fallocate(_PUNCH, 0, 2 * PAGE_SIZE)
        if r[0] != 0:
            msg = f"punch failed: {r}"
            raise AssertionError(msg)
        for x in td.vcpus:
            yield PREEMPT
            x.close()
        yield PREEMPT
        td.gmem.close()
        yield PREEMPT
        td.vm.close()

    def eager_reclaim(td: Any) -> Generator[Any, Any, None]:
        # broken on purpose: free the vCPU pages (RECLAIM the TDVPR/TDCX) from another thread,
        # without waiting for kvm_destroy_vm's HKID release
        yield PREEMPT
        for x in td.vcpus:
            td.vm._vcpu_free(x)

    def final(w: World) -> Optional[str]:
        if w.host.leaks:
            lk = w.host.leaks[0]
            return f"leak: {lk.what} pfn={lk.pfn} ({lk.reason})"
        if not (td1.vm.is_destroyed and td2.vm.is_destroyed):
            return "a TD was not destroyed"
        return None

    def check(w: World) -> Optional[str]:
        if w.host.leaks:                            # a page leaked is never reclaimed again
            lk = w.host.leaks[0]
            return f"leak: {lk.what} pfn={lk.pfn} ({lk.reason})"
        return _no_bug(w)

    actors: List[Tuple[str, Any, Optional[Any]]] = [("teardown1", teardown(td1), None),
                                                    ("teardown2", teardown(td2), None)]
    if "eager_reclaim" in variant.hooks:
        actors.append(("reclaim1", eager_reclaim(td1), None))
    return World(host, (kvm,), (td1, td2), actors, check=check, final=final)


# ---------------------------------------------------------------------------------------------- 8
def _mapgpa_chunk_vs_pending_event(variant: Variant) -> World:
    from tdxcore.constants import TdvmcallStatus

    size = 4 << 20                                  # two 2 MiB chunks
    host, kvm, td = _td(variant, pages=size // PAGE_SIZE, memory=16 << 20)
    vm, v = td.vm, td.vcpus[0]
    vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << HC.MAP_GPA_RANGE)     # MapGPA exits to userspace
    shared_bit = vm.gpa_shared_mask

    def guest_kernel() -> Generator[Any, Any, str]:
        # the guest's MapGPA loop: re-issue from R11 while KVM answers RETRY
        gpa, end = BASE, BASE + size
        out = "hlt"
        for _ in range(4):
            out = yield from _vcpu(v, [guest.map_gpa(gpa | shared_bit, end - gpa, shared=True)])
            ev = [e for e in v.guest_log if e.status is not None][-1]
            if ev.status == int(TdvmcallStatus.RETRY):
                gpa = ev.r11 & ~shared_bit
                continue
            if ev.status != int(TdvmcallStatus.SUCCESS):
                msg = f"MapGPA answered {ev.status:#x} at r11={ev.r11:#x}"
                raise AssertionError(msg)
            break
        return out

    def irq() -> Generator[Any, Any, None]:
        yield PREEMPT
        v.queue_interrupt(0x30)

    def final(w: World) -> Optional[str]:
        for gfn in range(BASE >> PAGE_SHIFT, (BASE + size) >> PAGE_SHIFT, 64):
            if vm.is_private(gfn):
                return f"gfn {gfn:#x} is still private after MapGPA to shared completed"
        return _teardown_clean(w)

    actors = [("vcpu0", guest_kernel(), v), ("irq", irq(), None)]
    return World(host, (kvm,), (td,), actors, check=_no_bug, final=final)


# ---------------------------------------------------------------------------------------------- 9
def _independent_vcpu_reads(variant: Variant) -> World:
    host, kvm, td = _td(variant, vcpus=2)
    _map(td, _P, _Q)
    v0, v1 = td.vcpus
    actors = [("vcpu0", _vcpu(v0, [guest.read(_P)] * 6), v0),
              ("vcpu1", _vcpu(v1, [guest.read(_Q)] * 6), v1)]
    return World(host, (kvm,), (td,), actors, check=_no_bug, final=_teardown_clean)


SCENARIOS: Dict[str, Scenario] = {s.name: s for s in (
    Scenario("memslot_delete_vs_local_retry",
             "memslot deletion vs the EPT-violation handler's local retry (the 6.18 invalid-memslot exit)",
             _memslot_delete_vs_local_retry, 18, 30, ("NO_MEMSLOT_CHECK",)),
    Scenario("zap_busy_vs_vcpu_entry",
             "zap SEAMCALL BUSY vs a vCPU entering the guest (wait_for_sept_zap + kick, retry once)",
             _zap_busy_vs_vcpu_entry, 11, 20, ("NO_KICK_ZAP_RETRY", "NO_SEPT_ZAP_FLAG")),
    Scenario("conversion_vs_fault_retry",
             "private->shared conversion vs a private fault in its mmu_invalidate window",
             _conversion_vs_fault_retry, 14, 24, ("NO_INVALIDATE_RETRY",)),
    Scenario("double_zap",
             "guest_memfd punch-hole and a conversion zapping the same private page",
             _double_zap, 14, 24, ("NO_MIRROR_CLEAR",)),
    Scenario("accept_vs_block",
             "guest TDG.MEM.PAGE.ACCEPT vs host RANGE.BLOCK on one entry (host-priority bit)",
             _accept_vs_block, 16, 24, ("NO_KICK_ZAP_RETRY",)),
    Scenario("track_vs_vp_enter",
             "TDH.MEM.TRACK vs TDH.VP.ENTER holding the TD epoch",
             _track_vs_vp_enter, 11, 20, ("NO_SEPT_ZAP_FLAG",)),
    Scenario("hkid_release_vs_reclaim",
             "HKID release (VPFLUSHDONE, CACHE.WB, KEY.FREEID under tdx_lock) vs reclaiming TD pages",
             _hkid_release_vs_reclaim, 10, 20, ("EAGER_RECLAIM",)),
    Scenario("mapgpa_chunk_vs_pending_event",
             "MapGPA 2 MiB chunks vs an interrupt made pending between them (RETRY from R11)",
             _mapgpa_chunk_vs_pending_event, 22, 30, ()),
    Scenario("independent_vcpu_reads",
             "control, not a race: two vCPUs reading their own mapped pages (the reduction's showcase)",
             _independent_vcpu_reads, 18, 24, ()),
)}


def get_scenario(name: object) -> Scenario:
    """Return the catalogue entry ``name`` (``TdxTypeError``/``TdxValueError`` otherwise)."""
    if not isinstance(name, str):
        msg = f"scenario={name!r} must be a str naming a catalogue scenario"
        raise TdxTypeError(msg, name="scenario", value=name)
    if name not in SCENARIOS:
        msg = f"scenario={name!r} is not one of {sorted(SCENARIOS)}"
        raise TdxValueError(msg, name="scenario", value=name)
    return SCENARIOS[name]
