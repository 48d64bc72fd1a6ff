"""``KVM_RUN`` of a TD vCPU: entry, the guest's execution, and the exit handling (SPEC §3.3, §5).

One :func:`vcpu_run` call is ``vcpu_run`` → ``tdx_vcpu_run`` / ``tdx_handle_exit`` (6.18) in a
loop: complete userspace's answer to the last exit; then, until an exit needs userspace, check
for a signal (−EINTR), a dead VM (EIO) and ``wait_for_sept_zap`` (no entry), enter through the
module's VP.ENTER (BUSY: re-enter), deliver queued interrupts, let the guest run its queued ops,
and handle the TD exit under ``kvm->srcu``.

The guest part plays the CPU (:func:`_guest`): loads and stores of private GPAs walk the S-EPT
through the module (:meth:`TdxModule.guest_translate`), shared GPAs the VM's direct root; a
PENDING page raises a #VE whose default handler accepts it and retries (or, with
``SEPT_VE_DISABLE``, an EPT-violation exit the host treats as fatal); a missing mapping is an
EPT-violation exit; a shared access that hits an MMIO SPTE raises the #VE the guest turns into a
TDVMCALL<MMIO>; ACCEPT is the module's TDCALL (in flight across a preemption point); every other
op is a TDVMCALL exit dispatched by :mod:`tdxcore.kvm.exits`.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING, Any, Callable, Generator, Optional, Tuple

from tdxcore import guest as _g
from tdxcore.constants import (
    ACCEPT_EPT_VIOLATION,
    EXIT_REASON_EPT_VIOLATION,
    EXIT_REASON_EXTERNAL_INTERRUPT,
    EXIT_REASON_TDCALL,
    PAGE_SIZE,
    ExitReason,
    TdAttr,
)
from tdxcore.kvm.fault import MMIO_SPTE, tdx_handle_ept_violation
from tdxcore.kvm.ioctl import OK, Ret, fail
from tdxcore.kvm.run import GuestEvent, Interrupt, VeInfo
from tdxcore.module.guest_access import Access, guest_translate
from tdxcore.sched import PREEMPT
from tdxcore.status import (  # type: ignore[attr-defined]
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
)

if TYPE_CHECKING:
    from tdxcore.kvm.vcpu import Vcpu

__all__ = ["vcpu_run", "VP_ENTER_MAX_BUSY", "SEPT_ZAP_MAX_WAITS", "GUEST_BUSY_MAX"]

#: Bound on back-to-back VP.ENTER attempts that return OPERAND_BUSY within one ``run()`` (upstream
#: re-enters from the fastpath without a bound; the model bounds it so a livelock becomes a
#: KVM_BUG and EIO instead of a hang). Each retry yields PREEMPT so the holder can finish.
VP_ENTER_MAX_BUSY = 1000
#: Bound on PREEMPT yields while ``vm.wait_for_sept_zap`` refuses entry within one ``run()``.
SEPT_ZAP_MAX_WAITS = 64
#: The guest retries an ACCEPT that answers BUSY at most this many times, then logs the status.
GUEST_BUSY_MAX = 1000

_BUSY_BASES = (TDX_OPERAND_BUSY, TDX_OPERAND_BUSY_HOST_PRIORITY)
_SEPT_VE_DISABLE = int(TdAttr.SEPT_VE_DISABLE)      # an int: a flag enum's ``&`` runs Python code
_guest_translate: Callable[..., Any] = guest_translate   # the module's walk, without its method hop

# A TD exit, as the run loop hands it to KVM: ("hlt",), ("kick",), ("ept", gpa, pending, level),
# ("tdvmcall", op)
Exit = Tuple[Any, ...]


def vcpu_run(vcpu: "Vcpu") -> Generator[Any, Any, Ret]:
    """Run the body of ``KVM_RUN`` (caller holds the vCPU mutex; the TD is RUNNABLE)."""
    vm = vcpu.vm
    tdx = vm.kvm.host.tdx
    if vcpu.completion is not None:
        fn, vcpu.completion = vcpu.completion, None
        r = fn(vcpu)
        if r is not None:
            return r
    waits = busy = 0
    while True:
        if vcpu._signal:
            vcpu._signal = False
            vcpu._count("nr_signal_exits")
            return vcpu.set_exit(ExitReason.INTR, -_errno.EINTR)
        if vm.is_dead:
            return fail(_errno.EIO, f"VM {vm.id} is dead ({vm.bug_reason or 'killed'})")
        if vm.wait_for_sept_zap:
            # tdx_vcpu_run: no entry while a zap retries after BUSY; vcpu_run loops
            if waits >= SEPT_ZAP_MAX_WAITS:
                return vcpu.set_exit(ExitReason.INTR, -_errno.EINTR)
            waits += 1
            vcpu._count("nr_sept_zap_waits")
            yield PREEMPT
            continue
        assert vcpu.tdvpr is not None
        vcpu._kick_pending = False      # a kick taken outside guest mode needs no exit
        cpu = tdx.vcpu(vcpu.tdvpr).associated_cpu
        op = tdx.vp_enter(vcpu.tdvpr, cpu=cpu, actor=vcpu.actor)
        if not op.acquired:
            status = op.result.status
            if status.base == TDX_OPERAND_BUSY:
                busy += 1
                vcpu._count("nr_vp_enter_busy")
                if busy > VP_ENTER_MAX_BUSY:
                    vm.bug(f"TDH.VP.ENTER BUSY {busy} times in a row")
                    return fail(_errno.EIO, f"TDH.VP.ENTER stayed BUSY ({busy} tries): KVM_BUG")
                yield PREEMPT
                continue
            # tdx_handle_exit: an error status is an unexpected exit
            vcpu._count("nr_entry_failures")
            return vcpu.set_exit(ExitReason.INTERNAL_ERROR, 0)
        busy = 0
        vcpu._enter_op = op
        try:
            yield PREEMPT               # the entry phase is in flight: TD_EPOCH held shared (and,
            #                             when zero-step is suspected, the S-EPT tree exclusive)
            op.enter()
            vcpu._count("nr_entries")
            exit_ = yield from _guest(vcpu, op, _deliver_events(vcpu) if vcpu._events else False)
        finally:
            if op.in_guest:             # the actor was closed while in the guest
                op.exit(EXIT_REASON_TDCALL, rip=vcpu._next_index)
            elif op.acquired:           # ... or during the entry phase: give the locks back
                op.abort()
            vcpu._enter_op = None
            vcpu.guest_mode_seq += 1    # one guest-mode span ended (what a kick waits for)
        token = vm.srcu.read_lock()
        try:
            # _handle_exit's common cases inline (one generator frame fewer on the fault path)
            kind = exit_[0]
            if kind == "kick":
                ret = None
            elif kind == "hlt":
                ret = vcpu.set_exit(ExitReason.HLT, 0)
            elif kind == "ept":
                pf = yield from tdx_handle_ept_violation(vcpu, exit_[1], exit_[2])
                ret = _ept_ret(pf, exit_[1])
            else:
                ret = yield from _handle_exit(vcpu, exit_)
        finally:
            vm.srcu.read_unlock(token)
        if ret is not None:
            return ret


def _deliver_events(vcpu: "Vcpu") -> bool:
    """Inject queued interrupts at entry: each is logged; True when one was (guest progress)."""
    if not vcpu._events:
        return False
    host = vcpu.vm.kvm.host
    while vcpu._events:
        vector = vcpu._events.popleft()
        vcpu.guest_log.append(GuestEvent(vcpu._next_index, Interrupt(vector), None, 0, (), vector, None))
        vcpu._count("nr_interrupts_delivered")
        host.events.emit("guest_event", vcpu.actor, vector)
    return True


def _ept_ret(r: int, gpa: int) -> Optional[Ret]:
    """Return what KVM_RUN does with the EPT-violation handler's result ``r``."""
    if r == -_errno.EFAULT:
        return OK                       # KVM_EXIT_MEMORY_FAULT prepared; KVM_RUN returns -EFAULT
    if r < 0:
        return fail(-r, f"EPT violation at {gpa:#x}: {_errno.errorcode.get(-r, r)}")
    return None                         # fixed, retry or MMIO (the guest sees the #VE next)


def _handle_exit(vcpu: "Vcpu", exit_: Exit) -> Generator[Any, Any, Optional[Ret]]:
    """``tdx_handle_exit``: None re-enters the guest; a Ret makes KVM_RUN return."""
    kind = exit_[0]
    if kind == "kick":
        return None
    if kind == "hlt":
        return vcpu.set_exit(ExitReason.HLT, 0)
    if kind == "ept":
        r = yield from tdx_handle_ept_violation(vcpu, exit_[1], exit_[2])
        return _ept_ret(r, exit_[1])
    if _EXITS is None:
        _load_exits()
    assert _EXITS is not None
    return (yield from _EXITS(vcpu, exit_[1]))


#: :func:`tdxcore.kvm.exits.handle_tdvmcall`, imported on first use (exits imports this module's
#: importers); a function-level import would cost about a microsecond per TDVMCALL exit.
_EXITS: Optional[Any] = None


def _load_exits() -> None:
    global _EXITS
    from tdxcore.kvm.exits import handle_tdvmcall

    _EXITS = handle_tdvmcall


def _guest(vcpu: "Vcpu", op: Any, injected: bool) -> Generator[Any, Any, Exit]:
    """Run guest ops until one exits to the host; end VP.ENTER with that exit and describe it."""
    busy = 0
    while True:
        internal = bool(vcpu._ve_ops)
        if internal:
            gop = vcpu._ve_ops[0]
        elif vcpu._queue:
            gop = vcpu._queue[0]
        else:
            # an empty queue: the guest halts (the model's convention; no op is logged)
            op.exit(EXIT_REASON_TDCALL, rip=vcpu._next_index, injected_event=injected)
            return ("hlt",)
        yield PREEMPT                   # in the guest: other actors run, kicks wait
        if vcpu._kick_pending:
            # the kick's IPI: an external-interrupt exit; KVM handles the request and re-enters
            vcpu._kick_pending = False
            op.exit(EXIT_REASON_EXTERNAL_INTERRUPT, rip=vcpu._next_index, injected_event=injected)
            vcpu._count("nr_kick_exits")
            return ("kick",)
        if isinstance(gop, (_g.Read, _g.Write)):
            ex = _access(vcpu, op, gop, injected)
            if ex is None:
                continue
            return ex
        if isinstance(gop, _g.Accept):
            ex, done = yield from _accept(vcpu, op, gop, internal, injected)
            if ex is not None:
                return ex
            if done:
                busy = 0
                continue
            busy += 1
            if busy >= GUEST_BUSY_MAX:
                vcpu._count("nr_guest_accept_busy_giveups")
                _finish_accept(vcpu, gop, internal, vcpu._last_accept_status)
                busy = 0
            continue
        op.exit(EXIT_REASON_TDCALL, rip=vcpu._next_index, injected_event=injected)
        vcpu._count("nr_tdvmcalls")
        return ("tdvmcall", gop)


def _ept_exit(vcpu: "Vcpu", op: Any, gpa: int, pending: bool, level: int, injected: bool) -> Exit:
    op.exit(EXIT_REASON_EPT_VIOLATION, gpa=gpa, rip=vcpu._next_index, level=level, injected_event=injected)
    vcpu._count("nr_ept_violations")
    return ("ept", gpa, pending, level)


def _access(vcpu: "Vcpu", op: Any, gop: Any, injected: bool) -> Optional[Exit]:
    """One load/store: complete it (None), take a #VE (None, handler queued) or exit."""
    vm = vcpu.vm
    host = vm.kvm.host
    gpa = gop.gpa
    mask = vm.gpa_shared_mask
    write = isinstance(gop, _g.Write)
    off = gpa & (PAGE_SIZE - 1)
    if gpa & mask:
        gfn = (gpa & ~mask) >> 12
        pfn = vm.direct.get(gfn)
        if pfn is None or (pfn == MMIO_SPTE and vm.memslots.gfn_to_memslot(gfn) is not None):
            return _ept_exit(vcpu, op, gpa, False, 0, injected)
        keyid = 0
        if pfn == MMIO_SPTE:
            # #VE (EPT violation on an MMIO SPTE): the guest's handler emulates it by TDVMCALL<MMIO>
            mmio = _g.mmio(gpa, gop.size, write, gop.value if write else 0)
            vcpu._queue[0] = mmio
            vcpu._head_ve = VeInfo(EXIT_REASON_EPT_VIOLATION, gpa, "mmio")
            host.events.emit("guest_ve", vcpu.actor, gpa, "mmio")
            op.exit(EXIT_REASON_TDCALL, rip=vcpu._next_index, injected_event=injected)
            vcpu._count("nr_tdvmcalls")
            return ("tdvmcall", mmio)
    else:
        t = _guest_translate(host.tdx, vcpu.tdvpr, gpa, write)    # = host.tdx.guest_translate
        if t.access == Access.PENDING:
            if int(vm.attributes) & _SEPT_VE_DISABLE:
                return _ept_exit(vcpu, op, gpa, True, 0, injected)
            # #VE: the default handler accepts the page, then the access is retried
            vcpu._ve_ops.append(_g.accept(gpa & ~(PAGE_SIZE - 1)))
            vcpu._head_ve = VeInfo(EXIT_REASON_EPT_VIOLATION, gpa, "pending")
            vcpu._count("nr_guest_ve")
            host.events.emit("guest_ve", vcpu.actor, gpa, "pending")
            return None
        if t.access != Access.OK:
            return _ept_exit(vcpu, op, gpa, False, 0, injected)
        pfn, keyid = t.pfn, t.keyid
    if write:
        host.frame_write(pfn, off, gop.value.to_bytes(gop.size, "little"), keyid)
        vcpu.complete_op(value=None, ve=vcpu._take_head_ve())
    else:
        data = host.frame_read(pfn, off, gop.size, keyid)
        vcpu.complete_op(value=int.from_bytes(data, "little"), ve=vcpu._take_head_ve())
    return None


def _finish_accept(vcpu: "Vcpu", gop: Any, internal: bool, status: int) -> None:
    if internal:
        vcpu._ve_ops.popleft()
    else:
        vcpu.complete_op(status=status, ve=vcpu._take_head_ve())


def _accept(vcpu: "Vcpu", op: Any, gop: Any, internal: bool,
            injected: bool) -> Generator[Any, Any, Tuple[Optional[Exit], bool]]:
    """TDG.MEM.PAGE.ACCEPT from the guest: ``(exit or None, done)``; not done = BUSY, retry."""
    tdx = vcpu.vm.kvm.host.tdx
    a = tdx.begin_accept(vcpu.tdvpr, gop.gpa, gop.level, cpu=op.cpu, actor=vcpu.actor)
    if a.acquired:
        yield PREEMPT                   # the TDCALL is in flight: it holds the entry lock
        res = a.complete()
    else:
        res = a.result
    st = res.status
    vcpu._last_accept_status = int(st)
    if int(st) == ACCEPT_EPT_VIOLATION:
        # an EPT-violation TD exit at the accept level (the entry is FREE): KVM maps, re-enters
        return _ept_exit(vcpu, op, gop.gpa, False, gop.level, injected), False
    if st.base in _BUSY_BASES:
        vcpu._count("nr_guest_accept_busy")
        return None, False
    _finish_accept(vcpu, gop, internal, int(st))
    return None, True
