"""TDVMCALL dispatch: one dedicated, validated exit per leaf (SPEC §3.3, §4.8; issue 7).

The vCPU run loop (:mod:`tdxcore.kvm.vcpu`) executes memory ops itself; for any other guest op at
the head of its queue it makes the TD exit (``EXIT_REASON_TDCALL``) and calls
``yield from handle_tdvmcall(vcpu, op)``. The op is first turned into the guest's register image
(:func:`tdvmcall_regs`) and then dispatched exactly as ``tdx_handle_exit`` / ``handle_tdvmcall``
do in ``arch/x86/kvm/vmx/tdx.c`` (6.18; tdx-facts §9.1, §9.3-§9.6):

* **R10 != 0** - a KVM hypercall (``tdx_emulate_vmcall`` → ``__kvm_emulate_hypercall``): nr = R10,
  a0..a2 = R11..R13. The model answers ``KVM_HC_VAPIC_POLL_IRQ`` (0) and ``KVM_HC_MAP_GPA_RANGE``
  (a ``KVM_EXIT_HYPERCALL`` when userspace enabled it, else ``-KVM_ENOSYS``; ``-KVM_EINVAL`` for
  an unaligned gpa or a bad page count); every other nr gets ``-KVM_ENOSYS`` (the model's guest
  advertises no PV feature, so KICK_CPU, SEND_IPI and SCHED_YIELD are refused as upstream does
  without the feature; CLOCK_PAIRING is not modelled). The result goes to R10, and - as
  upstream's common exit path does - into ``kvm_run.hypercall.ret``.
* **R10 = 0** - a GHCI leaf in R11: CPUID, HLT, IO, RDMSR, WRMSR, #VE.RequestMMIO, GetTdVmCallInfo,
  MapGPA, GetQuote, ReportFatalError, SetupEventNotifyInterrupt; **any other leaf gets
  SUBFUNC_UNSUPPORTED in R10 and never reaches userspace** (invariant I23). There is no generic
  register-dump exit (the design NAKed in review, tdx-facts §9.7).

A handler either completes the op in the kernel (``vcpu.complete_op``; ``handle_tdvmcall``
returns None and the guest is re-entered) or fills its one ``kvm_run`` payload, arms
``vcpu.completion`` (upstream's ``complete_userspace_io``) and returns the Ret that makes KVM_RUN
return. The next ``run()`` clears ``vcpu.completion`` and calls it before entering; it reads
userspace's answer (``ret`` fields, ``io.data``, ``mmio.data``), completes the op or exits again
(the next MapGPA chunk). A completion whose userspace field is not a u64 (or a data buffer that
is too short) fails KVM_RUN with EINVAL and stays armed. ``GuestEvent.r11`` is the R11 the guest
sees after the call: the handler's output, else its own input (the module hands back the VMM's
R11, which KVM leaves untouched); ``outputs`` holds R12.. for the leaves that write them (CPUID:
EAX, EBX, ECX, EDX; GetTdVmCallInfo: R12-R14).

Every dispatched TDVMCALL logs one ``tdvmcall`` event ``(r10, r11, exit, status)``: ``exit`` is
the ``kvm_run`` exit reason it caused (0 if none), ``status`` the R10 the guest got when it was
completed in the kernel (None when userspace answers).
"""

from __future__ import annotations

import errno as _errno
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Generator, Optional, Tuple

from tdxcore import guest as _g
from tdxcore.constants import (
    APIC_DEFAULT_PHYS_BASE,
    EXIT_REASON_TDCALL,
    FEAT_CTL_LOCKED,
    HC,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_EXIT_HYPERCALL_LONG_MODE,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_HC_ENOSYS,
    KVM_HC_VAPIC_POLL_IRQ,
    LAPIC_MODE_X2APIC,
    MAP_GPA_MAX_LEN,
    MAP_GPA_RANGE_DECRYPTED,
    MAP_GPA_RANGE_ENCRYPTED,
    MSR_EFER,
    MSR_IA32_APICBASE,
    MSR_IA32_APICBASE_BSP,
    MSR_IA32_CR_PAT,
    MSR_IA32_CR_PAT_DEFAULT,
    MSR_IA32_FEAT_CTL,
    MSR_IA32_MCG_EXT_CTL,
    PAGE_SHIFT,
    PAGE_SIZE,
    SYSTEM_EVENT_TDX_FATAL,
    TDVMCALL_EXPOSE_REGS_MASK,
    TDX_EFER,
    TDX_EMULATED_MSR_RANGES,
    TDX_EMULATED_MSRS,
    TDX_X2APIC_NOT_EMULATED,
    U64_MAX,
    X2APIC_MSR_BASE,
    X2APIC_MSR_LAST,
    ExitReason,
    TdvmcallLeaf,
    TdvmcallStatus,
)
from tdxcore.errors import TdxTypeError
from tdxcore.kvm.ioctl import Ret, fail
from tdxcore.kvm.tdx_vm import CPUID_LEAF_ADDR_SIZES

if TYPE_CHECKING:
    from tdxcore.kvm.vcpu import Vcpu

__all__ = ["handle_tdvmcall", "tdvmcall_regs", "MsrFilter", "set_msr_filter", "KNOWN_LEAVES",
           "TDVMCALL_EVENT", "LEGAL_STATUSES"]

_U64 = 1 << 64
_U32_MASK = (1 << 32) - 1
_SUCCESS = int(TdvmcallStatus.SUCCESS)
_RETRY = int(TdvmcallStatus.RETRY)
_INVALID = int(TdvmcallStatus.INVALID_OPERAND)
_ALIGN = int(TdvmcallStatus.ALIGN_ERROR)
_UNSUPPORTED = int(TdvmcallStatus.SUBFUNC_UNSUPPORTED)
L = TdvmcallLeaf

#: The GHCI leaves (R10 = 0) 6.18 dispatches; every other R11 is SUBFUNC_UNSUPPORTED with no exit.
KNOWN_LEAVES: FrozenSet[int] = frozenset(int(x) for x in TdvmcallLeaf)
#: The TDVMCALL statuses a guest can get from KVM itself (userspace may write others into a
#: ``ret`` field; KVM passes them on, as upstream does).
LEGAL_STATUSES: FrozenSet[int] = frozenset(int(x) for x in TdvmcallStatus)
#: Event kind of one dispatched TDVMCALL: R10 and R11 in, the exit it caused (0 = none), the R10
#: the guest got when completed in the kernel (None when userspace answers).
TDVMCALL_EVENT = ("tdvmcall", ("r10", "r11", "exit", "status"))

Regs = Dict[str, int]
Handler = Callable[["Vcpu", Regs], Optional[Ret]]


# ------------------------------------------------------------------ the guest's registers
def tdvmcall_regs(gop: Any, shared_bit: int) -> Regs:
    """Return the register image a guest op presents to the VMM (GHCI register convention).

    Parameters
    ----------
    gop : guest op
        Any non-memory op of :mod:`tdxcore.guest` (:data:`tdxcore.guest.OPS` minus
        :data:`~tdxcore.guest.MEMORY_OPS`).
    shared_bit : int
        The VM's shared-GPA bit (``1 << (gpaw - 1)``); MapGpa sets or clears it in R12.

    Returns
    -------
    dict
        ``rcx`` (the exposure mask), ``r8``-``r15``, ``rbx``, ``rdx``, ``rsi``, ``rdi``; unset = 0.

    Raises
    ------
    TdxTypeError
        ``gop`` is not a TDVMCALL op.
    """
    r: Regs = dict.fromkeys(_g.TDVMCALL_REGS, 0)
    r["rcx"] = TDVMCALL_EXPOSE_REGS_MASK
    t = type(gop)
    if t is _g.Tdvmcall:
        r["r11"] = gop.leaf
        r.update(gop.regs)
        return r
    spec = _OP_REGS.get(t)
    if spec is None:
        msg = f"op={gop!r} is not a TDVMCALL op (memory ops are executed by the run loop)"
        raise TdxTypeError(msg, name="op", value=type(gop).__name__)
    leaf, fields = spec
    r["r11"] = int(leaf)
    for reg, field in fields:
        r[reg] = int(getattr(gop, field))
    if t is _g.MapGpa:
        r["r12"] = (gop.gpa | shared_bit) if gop.shared else (gop.gpa & ~shared_bit)
    return r


#: op class -> (leaf, ((register, field), ...)).
_OP_REGS: Dict[type, Tuple[int, Tuple[Tuple[str, str], ...]]] = {
    _g.Hlt: (L.HLT, ()),
    _g.MapGpa: (L.MAP_GPA, (("r13", "size"),)),
    _g.GetQuote: (L.GET_QUOTE, (("r12", "gpa"), ("r13", "size"))),
    _g.ReportFatalError: (L.REPORT_FATAL_ERROR, (("r12", "code"),)),
    _g.GetTdvmcallInfo: (L.GET_TD_VM_CALL_INFO, (("r12", "leaf"),)),
    _g.SetupEventNotify: (L.SETUP_EVENT_NOTIFY_INTERRUPT, (("r12", "vector"),)),
    _g.Io: (L.IO, (("r12", "size"), ("r13", "write"), ("r14", "port"), ("r15", "value"))),
    _g.Mmio: (L.MMIO, (("r12", "size"), ("r13", "write"), ("r14", "gpa"), ("r15", "value"))),
    _g.MsrRead: (L.MSR_READ, (("r12", "index"),)),
    _g.MsrWrite: (L.MSR_WRITE, (("r12", "index"), ("r13", "value"))),
    _g.Cpuid: (L.CPUID, (("r12", "leaf"), ("r13", "subleaf"))),
}


# ------------------------------------------------------------------ entry point
def handle_tdvmcall(vcpu: "Vcpu", gop: Any) -> Generator[Any, Any, Optional[Ret]]:
    """Handle the TDVMCALL ``gop`` at the head of ``vcpu``'s queue (the TD has exited).

    Parameters
    ----------
    vcpu : Vcpu
        The vCPU, out of the guest, with ``gop`` at the head of its queue.
    gop : guest op
        A TDVMCALL op (anything but Read/Write/Accept).

    Returns
    -------
    Ret or None
        None: completed in the kernel (the op was popped and logged), re-enter the guest. A Ret:
        KVM_RUN returns to userspace with ``vcpu.kvm_run`` filled (``vcpu.completion`` armed,
        except for HLT, which completes first).

    Notes
    -----
    Mirrors ``tdx_handle_exit`` → ``handle_tdvmcall`` / ``tdx_emulate_vmcall`` and the per-leaf
    handlers of ``arch/x86/kvm/vmx/tdx.c`` (6.18); tdx-facts §9.1, §9.3-§9.6; SPEC §3.3, §4.8.
    Nothing here blocks, so it yields nothing.
    """
    yield from ()
    regs = tdvmcall_regs(gop, 1 << (vcpu.vm.gpaw - 1))
    done = len(vcpu.guest_log)
    if regs["r10"]:
        ret = _emulate_vmcall(vcpu, regs)
    else:
        ret = _LEAVES.get(regs["r11"], _unsupported)(vcpu, regs)
    exit_reason = int(vcpu.kvm_run.exit_reason) if ret is not None else 0
    status = vcpu.guest_log[-1].status if len(vcpu.guest_log) > done else None
    _emit(vcpu, regs["r10"], regs["r11"], exit_reason, status)
    return ret


def _emit(vcpu: "Vcpu", r10: int, r11: int, exit_reason: int, status: Optional[int]) -> None:
    ev = vcpu.vm.kvm.host.events
    if TDVMCALL_EVENT[0] not in ev.kinds:
        ev.register_kind(*TDVMCALL_EVENT)
    ev.emit(TDVMCALL_EVENT[0], f"vm{vcpu.vm.id}.vcpu{vcpu.vcpu_id}", r10, r11, exit_reason, status)


def _complete(vcpu: "Vcpu", regs: Regs, status: int = _SUCCESS, r11: Optional[int] = None,
              outputs: Tuple[int, ...] = (), value: Optional[int] = None) -> Optional[Ret]:
    """Complete the op in the kernel: R10 = ``status``, R11 = ``r11`` (else unchanged).

    The #VE the op came from (an MMIO access the guest's handler turned into TDVMCALL<MMIO>) is
    logged with it. Returns None, the handlers' "re-enter the guest".
    """
    take = getattr(vcpu, "_take_head_ve", None)
    vcpu.complete_op(status, regs["r11"] if r11 is None else r11, outputs, value,
                     take() if take is not None else None)
    return None


def _exit(vcpu: "Vcpu", reason: ExitReason, completion: Callable[["Vcpu"], Optional[Ret]],
          counter: str) -> Ret:
    vcpu.completion = completion
    vcpu._count(counter)
    return vcpu.set_exit(reason, 0)


def _user_u64(value: Any) -> Optional[int]:
    # a kvm_run field userspace wrote: a C u64 (a negative errno is stored two's complement)
    if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value < _U64:
        return None
    return value & U64_MAX


def _bad(vcpu: "Vcpu", completion: Callable[["Vcpu"], Optional[Ret]], what: str, value: Any) -> Ret:
    vcpu.completion = completion            # stays armed: userspace may fix the field and re-run
    return fail(_errno.EINVAL, f"bad completion: kvm_run.{what}={value!r} is not a u64")


def _is_private(gpa: int, shared_bit: int) -> bool:
    # vt_is_tdx_private_gpa: the shared bit clear
    return not gpa & shared_bit


def _unsupported(vcpu: "Vcpu", regs: Regs) -> Optional[Ret]:
    # handle_tdvmcall's default case (6.16+): no exit, whatever the registers hold (I23)
    vcpu._count("nr_tdvmcall_unsupported")
    return _complete(vcpu, regs, _UNSUPPORTED)


# ------------------------------------------------------------------ KVM hypercalls (R10 != 0)
def _emulate_vmcall(vcpu: "Vcpu", regs: Regs) -> Optional[Ret]:
    """``tdx_emulate_vmcall`` → ``__kvm_emulate_hypercall`` (64-bit, CPL 0): nr = R10, a0.. = R11.."""
    vm = vcpu.vm
    nr, a0, a1, a2 = regs["r10"], regs["r11"], regs["r12"], regs["r13"]
    vcpu._count("nr_hypercalls")
    hc = vcpu.kvm_run.hypercall
    if nr == KVM_HC_VAPIC_POLL_IRQ:
        ret = 0
    elif nr == HC.MAP_GPA_RANGE and vm.hypercall_exit_enabled & (1 << HC.MAP_GPA_RANGE):
        gfn = a0 >> PAGE_SHIFT
        if a0 & (PAGE_SIZE - 1) or not a1 or (gfn + a1) & U64_MAX <= gfn:
            ret = -_errno.EINVAL                   # -KVM_EINVAL
        else:
            hc.nr, hc.ret, hc.flags = int(HC.MAP_GPA_RANGE), 0, KVM_EXIT_HYPERCALL_LONG_MODE
            hc.args = (a0, a1, a2) + tuple(hc.args[3:])     # args[3..5] are not written upstream

            def complete(v: "Vcpu") -> Optional[Ret]:
                r = _user_u64(hc.ret)
                if r is None:
                    return _bad(v, complete, "hypercall.ret", hc.ret)
                return _complete(v, regs, r)       # complete_hypercall_exit: R10 = ret

            return _exit(vcpu, ExitReason.HYPERCALL, complete, "nr_hypercall_exits")
    else:
        ret = -KVM_HC_ENOSYS
    hc.ret = ret & U64_MAX
    return _complete(vcpu, regs, ret & U64_MAX)


# ------------------------------------------------------------------ MapGPA
def _map_gpa(vcpu: "Vcpu", regs: Regs) -> Optional[Ret]:
    """``tdx_map_gpa`` (6.18): checks in upstream order, then 2 MiB ``KVM_EXIT_HYPERCALL`` chunks."""
    vm = vcpu.vm
    gpa, size = regs["r12"], regs["r13"]
    sb = 1 << (vm.gpaw - 1)
    if not vm.hypercall_exit_enabled & (1 << HC.MAP_GPA_RANGE):
        return _complete(vcpu, regs, _UNSUPPORTED, r11=gpa)
    end = (gpa + size) & U64_MAX
    last = (end - 1) & U64_MAX
    limit = 1 << vm.gpaw                          # kvm_vcpu_is_legal_gpa: below the guest MAXPHYADDR
    if end <= gpa or gpa >= limit or last >= limit or _is_private(gpa, sb) != _is_private(last, sb):
        return _complete(vcpu, regs, _INVALID, r11=gpa)
    if gpa & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1):
        return _complete(vcpu, regs, _ALIGN, r11=gpa)
    return _map_gpa_chunk(vcpu, regs, [gpa, end])


def _map_gpa_chunk(vcpu: "Vcpu", regs: Regs, state: list) -> Ret:
    """``__tdx_map_gpa``: exit for ``[next, min(next + 2 MiB, end))``; ``state`` is ``[next, end]``."""
    sb = 1 << (vcpu.vm.gpaw - 1)
    nxt, end = state
    size = min(end - nxt, MAP_GPA_MAX_LEN)
    hc = vcpu.kvm_run.hypercall
    # ret preset 0, not -KVM_ENOSYS: QEMU <= 9.2 assumed KVM never writes it
    hc.nr, hc.ret, hc.flags = int(HC.MAP_GPA_RANGE), 0, KVM_EXIT_HYPERCALL_LONG_MODE
    attrs = MAP_GPA_RANGE_ENCRYPTED if _is_private(nxt, sb) else MAP_GPA_RANGE_DECRYPTED
    hc.args = (nxt & ~sb, size // PAGE_SIZE, attrs) + tuple(hc.args[3:])

    def complete(v: "Vcpu") -> Optional[Ret]:
        # tdx_complete_vmcall_map_gpa, 6.18: any non-zero ret is INVALID_OPERAND (no RETRY mapping)
        r = _user_u64(hc.ret)
        if r is None:
            return _bad(v, complete, "hypercall.ret", hc.ret)
        if r:
            return _complete(v, regs, _INVALID, r11=state[0])
        state[0] += MAP_GPA_MAX_LEN
        if state[0] >= state[1]:
            return _complete(v, regs, _SUCCESS)
        if v.has_pending_event:
            # stop for timely interrupt delivery; the guest re-issues from R11
            return _complete(v, regs, _RETRY, r11=state[0])
        return _map_gpa_chunk(v, regs, state)

    return _exit(vcpu, ExitReason.HYPERCALL, complete, "nr_hypercall_exits")


# ------------------------------------------------------------------ KVM_EXIT_TDX leaves
def _simple_tdx_exit(vcpu: "Vcpu", regs: Regs, payload: Any, what: str) -> Ret:
    def complete(v: "Vcpu") -> Optional[Ret]:
        r = _user_u64(payload.ret)                # tdx_complete_simple: R10 = ret
        if r is None:
            return _bad(v, complete, f"tdx.{what}.ret", payload.ret)
        return _complete(v, regs, r)

    return _exit(vcpu, ExitReason.TDX, complete, "nr_tdx_exits")


def _get_quote(vcpu: "Vcpu", regs: Regs) -> Optional[Ret]:
    """``tdx_get_quote``: the buffer must be shared; KVM strips the shared bit for userspace."""
    gpa, size = regs["r12"], regs["r13"]
    sb = 1 << (vcpu.vm.gpaw - 1)
    if _is_private(gpa, sb):
        return _complete(vcpu, regs, _INVALID)
    t = vcpu.kvm_run.tdx
    t.flags, t.nr = 0, int(L.GET_QUOTE)
    q = t.get_quote
    q.ret, q.gpa, q.size = _UNSUPPORTED, gpa & ~sb, size
    return _simple_tdx_exit(vcpu, regs, q, "get_quote")


def _setup_event_notify(vcpu: "Vcpu", regs: Regs) -> Optional[Ret]:
    """``tdx_setup_event_notify_interrupt``: vector 32..255, else INVALID_OPERAND."""
    vector = regs["r12"]
    if not 32 <= vector <= 255:
        return _complete(vcpu, regs, _INVALID)
    t = vcpu.kvm_run.tdx
    t.flags, t.nr = 0, int(L.SETUP_EVENT_NOTIFY_INTERRUPT)
    s = t.setup_event_notify
    s.ret, s.vector = _UNSUPPORTED, vector
    return _simple_tdx_exit(vcpu, regs, s, "setup_event_notify")


def _get_td_vm_call_info(vcpu: "Vcpu", regs: Regs) -> Optional[Ret]:
    """``tdx_get_td_vm_call_info``: leaf 0 in the kernel, leaf 1 to userspace, others INVALID_OPERAND."""
    leaf = regs["r12"]
    if leaf == 0:
        return _complete(vcpu, regs, _SUCCESS, r11=0, outputs=(0, 0, 0))
    if leaf != 1:
        return _complete(vcpu, regs, _INVALID)
    t = vcpu.kvm_run.tdx
    t.flags, t.nr = 0, int(L.GET_TD_VM_CALL_INFO)
    info = t.get_tdvmcall_info
    info.ret, info.leaf = _SUCCESS, leaf
    info.r11 = info.r12 = info.r13 = info.r14 = 0

    def complete(v: "Vcpu") -> Optional[Ret]:
        vals = []
        for f in ("ret", "r11", "r12", "r13", "r14"):
            x = _user_u64(getattr(info, f))
            if x is None:
                return _bad(v, complete, f"tdx.get_tdvmcall_info.{f}", getattr(info, f))
            vals.append(x)
        # tdx_complete_get_td_vm_call_info: R10 = ret, R11..R14 = userspace's values
        return _complete(v, regs, vals[0], r11=vals[1], outputs=(vals[2], vals[3], vals[4]))

    return _exit(vcpu, ExitReason.TDX, complete, "nr_tdx_exits")


def _report_fatal_error(vcpu: "Vcpu", regs: Regs) -> Ret:
    """``tdx_report_fatal_error``: ``KVM_EXIT_SYSTEM_EVENT`` (TDX_FATAL), the 16 GPRs in x86 order."""
    se = vcpu.kvm_run.system_event
    se.type, se.ndata = SYSTEM_EVENT_TDX_FATAL, 16
    # RAX slot = VP.ENTER's status word (TDX_SUCCESS | exit reason TDCALL); RSP and RBP are never exposed
    se.data = (EXIT_REASON_TDCALL, regs["rcx"], regs["rdx"], regs["rbx"], 0, 0, regs["rsi"], regs["rdi"],
               regs["r8"], regs["r9"], regs["r10"], regs["r11"], regs["r12"], regs["r13"], regs["r14"],
               regs["r15"])

    def complete(v: "Vcpu") -> Optional[Ret]:
        # no complete_userspace_io upstream: re-entering resumes the guest with R10 unchanged (0)
        return _complete(v, regs, _SUCCESS)

    return _exit(vcpu, ExitReason.SYSTEM_EVENT, complete, "nr_system_event_exits")


# ------------------------------------------------------------------ instruction leaves
def _hlt(vcpu: "Vcpu", regs: Regs) -> Ret:
    # model convention (SPEC §10): HLT completes and KVM_RUN returns KVM_EXIT_HLT
    _complete(vcpu, regs, _SUCCESS)
    vcpu._count("nr_halt_exits")
    return vcpu.set_exit(ExitReason.HLT, 0)


def _io(vcpu: "Vcpu", regs: Regs) -> Optional[Ret]:
    """``tdx_emulate_io``: size 1/2/4, direction 0/1; no in-kernel port device, so always ``KVM_EXIT_IO``."""
    size, write = regs["r12"], regs["r13"]
    if write not in (0, 1) or size not in (1, 2, 4):
        return _complete(vcpu, regs, _INVALID)
    io = vcpu.kvm_run.io
    io.direction = KVM_EXIT_IO_OUT if write else KVM_EXIT_IO_IN
    io.size, io.port, io.count = size, regs["r14"] & 0xFFFF, 1     # port: unsigned short
    if write:
        io.data = (regs["r15"] & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

        def complete(v: "Vcpu") -> Optional[Ret]:
            return _complete(v, regs, _SUCCESS)     # tdx_complete_pio_out
    else:
        io.data = bytes(size)                         # the buffer userspace fills

        def complete(v: "Vcpu") -> Optional[Ret]:
            data = io.data
            if not isinstance(data, (bytes, bytearray)) or len(data) < size:
                v.completion = complete
                return fail(_errno.EINVAL, f"bad completion: kvm_run.io.data={data!r} is not {size} bytes")
            val = int.from_bytes(bytes(data[:size]), "little")
            return _complete(v, regs, _SUCCESS, r11=val, value=val)     # tdx_complete_pio_in

    return _exit(vcpu, ExitReason.IO, complete, "nr_io_exits")


def _mmio(vcpu: "Vcpu", regs: Regs) -> Optional[Ret]:
    """``tdx_emulate_mmio``: size 1/2/4/8, direction 0/1, first and last byte shared; ``KVM_EXIT_MMIO``."""
    size, write, gpa = regs["r12"], regs["r13"], regs["r14"]
    sb = 1 << (vcpu.vm.gpaw - 1)
    if size not in (1, 2, 4, 8) or write not in (0, 1):
        return _complete(vcpu, regs, _INVALID)
    if _is_private(gpa, sb) or _is_private((gpa + size - 1) & U64_MAX, sb):
        return _complete(vcpu, regs, _INVALID)
    m = vcpu.kvm_run.mmio
    # no in-kernel MMIO device is modelled: every access goes to userspace, shared bit stripped
    m.phys_addr, m.len, m.is_write = gpa & ~sb, size, bool(write)
    if write:
        m.data = (regs["r15"] & ((1 << (8 * size)) - 1)).to_bytes(size, "little") + bytes(m.data)[size:8]

        def complete(v: "Vcpu") -> Optional[Ret]:
            return _complete(v, regs, _SUCCESS)
    else:
        def complete(v: "Vcpu") -> Optional[Ret]:
            data = m.data
            if not isinstance(data, (bytes, bytearray)) or len(data) < size:
                v.completion = complete
                return fail(_errno.EINVAL, f"bad completion: kvm_run.mmio.data={data!r} is not {size} bytes")
            val = int.from_bytes(bytes(data[:size]), "little")
            return _complete(v, regs, _SUCCESS, r11=val, value=val)     # tdx_complete_mmio_read

    return _exit(vcpu, ExitReason.MMIO, complete, "nr_mmio_exits")


def _cpuid(vcpu: "Vcpu", regs: Regs) -> Optional[Ret]:
    """``tdx_emulate_cpuid``: EAX = R12, ECX = R13 → R12..R15 = EAX, EBX, ECX, EDX.

    Simplified ``kvm_cpuid``: the vCPU's CPUID is what KVM_TDX_GET_CPUID reports (the entries
    given to KVM_TDX_INIT_VM with the address-size leaf carrying the GPAW), as the selftests set
    it; an entry matches on function and, with ``KVM_CPUID_FLAG_SIGNIFCANT_INDEX``, on index; no
    match reads zeros.
    """
    leaf, sub = regs["r12"] & _U32_MASK, regs["r13"] & _U32_MASK
    vm = vcpu.vm
    if leaf == CPUID_LEAF_ADDR_SIZES:
        return _complete(vcpu, regs, _SUCCESS, outputs=(vm.gpaw | (vm.gpaw << 16), 0, 0, 0))
    out = (0, 0, 0, 0)
    for e in vm.cpuid:
        if e.function == leaf and (e.index == sub or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
            out = (e.eax, e.ebx, e.ecx, e.edx)
            break
    return _complete(vcpu, regs, _SUCCESS, outputs=out)


# ------------------------------------------------------------------ MSRs
@dataclass(frozen=True)
class MsrFilter:
    """A ``KVM_X86_SET_MSR_FILTER`` reduced to what the model needs: MSRs whose read/write is denied.

    KVM never filters the x2APIC range (0x800-0x8ff). A denied access fails the TDVMCALL with
    INVALID_OPERAND (no ``KVM_CAP_X86_USER_SPACE_MSR`` exit is modelled).
    """

    deny_read: FrozenSet[int] = frozenset()
    deny_write: FrozenSet[int] = frozenset()


_FILTERS: "weakref.WeakKeyDictionary[Any, MsrFilter]" = weakref.WeakKeyDictionary()
_MSRS: "weakref.WeakKeyDictionary[Any, Dict[int, int]]" = weakref.WeakKeyDictionary()


def set_msr_filter(vm: Any, msr_filter: Optional[MsrFilter]) -> None:
    """Install (or with None, remove) ``vm``'s MSR filter (the model's ``KVM_X86_SET_MSR_FILTER``).

    Raises
    ------
    TdxTypeError
        ``msr_filter`` is neither an :class:`MsrFilter` nor None.
    """
    if msr_filter is None:
        _FILTERS.pop(vm, None)
        return
    if not isinstance(msr_filter, MsrFilter):
        msg = f"msr_filter={msr_filter!r} must be an MsrFilter or None"
        raise TdxTypeError(msg, name="msr_filter", value=type(msr_filter).__name__)
    _FILTERS[vm] = msr_filter


def _msr_allowed(vm: Any, index: int, write: bool) -> bool:
    # kvm_msr_allowed: x2APIC MSRs are never filtered
    f = _FILTERS.get(vm)
    if f is None or X2APIC_MSR_BASE <= index <= X2APIC_MSR_LAST:
        return True
    return index not in (f.deny_write if write else f.deny_read)


def _has_emulated_msr(index: int) -> bool:
    """``tdx_has_emulated_msr`` (6.18)."""
    if index in TDX_EMULATED_MSRS or any(lo <= index <= hi for lo, hi in TDX_EMULATED_MSR_RANGES):
        return True
    return X2APIC_MSR_BASE <= index <= X2APIC_MSR_LAST and index not in TDX_X2APIC_NOT_EMULATED


def _msr_store(vcpu: "Vcpu") -> Dict[int, int]:
    s = _MSRS.get(vcpu)
    if s is None:
        # tdx_vcpu_create's reset values (x2APIC on; BSP = vCPU 0)
        bsp = MSR_IA32_APICBASE_BSP if vcpu.vcpu_id == 0 else 0
        s = _MSRS[vcpu] = {MSR_IA32_APICBASE: APIC_DEFAULT_PHYS_BASE | LAPIC_MODE_X2APIC | bsp,
                           MSR_EFER: TDX_EFER, MSR_IA32_CR_PAT: MSR_IA32_CR_PAT_DEFAULT}
    return s


def _rdmsr(vcpu: "Vcpu", regs: Regs) -> Optional[Ret]:
    """``kvm_emulate_rdmsr`` → ``tdx_get_msr`` → ``tdx_complete_emulated_msr`` (value → R11)."""
    index = regs["r12"] & _U32_MASK
    if not _msr_allowed(vcpu.vm, index, False):
        return _complete(vcpu, regs, _INVALID)
    if index == MSR_IA32_FEAT_CTL:
        val = FEAT_CTL_LOCKED                       # no LMCE advertised
    elif index == MSR_IA32_MCG_EXT_CTL or not _has_emulated_msr(index):
        return _complete(vcpu, regs, _INVALID)      # MCG_EXT_CTL needs MCG_LMCE_P
    else:
        val = _msr_store(vcpu).get(index, 0)
    return _complete(vcpu, regs, _SUCCESS, r11=val, value=val)


def _wrmsr(vcpu: "Vcpu", regs: Regs) -> Optional[Ret]:
    """``kvm_emulate_wrmsr`` → ``tdx_set_msr`` (simplified: an emulated, writable MSR stores the value)."""
    index, value = regs["r12"] & _U32_MASK, regs["r13"]
    if not _msr_allowed(vcpu.vm, index, True):
        return _complete(vcpu, regs, _INVALID)
    if index in (MSR_IA32_MCG_EXT_CTL, MSR_IA32_APICBASE, MSR_EFER, MSR_IA32_FEAT_CTL) \
            or not _has_emulated_msr(index):
        return _complete(vcpu, regs, _INVALID)      # read-only for a TD, or not emulated
    _msr_store(vcpu)[index] = value
    return _complete(vcpu, regs, _SUCCESS)


#: R10 = 0 dispatch (``tdx_handle_exit`` remaps the instruction leaves first; same table).
_LEAVES: Dict[int, Handler] = {
    int(L.CPUID): _cpuid,
    int(L.HLT): _hlt,
    int(L.IO): _io,
    int(L.MSR_READ): _rdmsr,
    int(L.MSR_WRITE): _wrmsr,
    int(L.MMIO): _mmio,
    int(L.GET_TD_VM_CALL_INFO): _get_td_vm_call_info,
    int(L.MAP_GPA): _map_gpa,
    int(L.GET_QUOTE): _get_quote,
    int(L.REPORT_FATAL_ERROR): _report_fatal_error,
    int(L.SETUP_EVENT_NOTIFY_INTERRUPT): _setup_event_notify,
}
