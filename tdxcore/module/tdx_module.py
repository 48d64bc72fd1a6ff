"""``host.tdx``: the TDX module's global state, the SEAMCALL dispatcher and ``enable()``.

Contents: the SYS leaves bring-up uses (:mod:`tdxcore.module.leaves.sys`), the TD-scope leaves
(:mod:`~tdxcore.module.leaves.mng`, ``mem``, ``vp``, ``phymem``) and the guest's
TDG.MEM.PAGE.ACCEPT (:mod:`tdxcore.module.tdcall`), the dispatcher's "system not ready" gate,
per-step bring-up failure injection, the kernel's ``tdx_enable()`` (:mod:`tdxcore.module.bringup`),
and in-flight leaves (:meth:`TdxModule.begin` -> :class:`~tdxcore.module.inflight.Op`). A leaf
without a handler gets ``TDX_SYS_NOT_READY`` before the module is ready and raises
``TdxValueError("... is not modelled yet")`` after — an honest absence, never made-up data.

Handlers: :data:`tdxcore.module.leaves.HANDLERS` maps a leaf to a *begin handler*
``handler(tdx, op) -> SeamcallResult | effect`` called with ``tdx.lock`` held after the begin
event, the ready gate and injection (:meth:`TdxModule._injected`, the one place an injected
status replaces a leaf). It checks and try-locks through ``op``; returning a result (or raising
``LeafFail``) finishes the op at once with every lock released; returning the effect closure
leaves the op acquired until ``op.complete()``/``op.abort()``. ``seamcall()`` and the typed
methods are begin + complete.
"""

from __future__ import annotations

import enum
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Generator, List, Optional, Tuple

from tdxcore.errors import HostError, TdxTypeError, TdxValueError, check_int
from tdxcore.module.inject import InjectCall, Injection, Injector
from tdxcore.sched import PREEMPT, KLock, run_to_completion
from tdxcore.status import (  # type: ignore[attr-defined]
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
    TDX_SUCCESS,
    TDX_SYS_NOT_READY,
    Leaf,
    TdcallLeaf,
    TdxStatus,
)

if TYPE_CHECKING:
    from tdxcore.module.host import Host

__all__ = ["SeamcallResult", "TdxModule", "SysState", "ModuleStatus", "BRINGUP_STEPS",
           "SYS_READY_EXEMPT", "Tdmr", "Handler", "BeginHandler", "MODULE_EVENT_KINDS"]

_U64 = 1 << 64
_STATUS_MASK = 0xFFFFFFFF00000000      # TdxStatus.base's mask
_INT6 = (int,) * 6


@dataclass(frozen=True)
class SeamcallResult:
    """What a SEAMCALL returns: RAX as a :class:`TdxStatus` and the output registers.

    The status is data, never an exception (STYLE §2.3).
    """

    status: TdxStatus
    rcx: int = 0
    rdx: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0

    @property
    def out(self) -> Tuple[int, int, int, int, int, int]:
        """The output registers ``(rcx, rdx, r8, r9, r10, r11)``."""
        return (self.rcx, self.rdx, self.r8, self.r9, self.r10, self.r11)


def result(status: int, rcx: int = 0, rdx: int = 0, r8: int = 0, r9: int = 0, r10: int = 0,
           r11: int = 0) -> SeamcallResult:
    """Build a :class:`SeamcallResult` from a plain status value.

    Results with all-zero outputs are shared per status (they are immutable): the hot leaves
    then allocate nothing for their result.
    """
    if not (rcx or rdx or r8 or r9 or r10 or r11):
        r = _PLAIN.get(status)
        if r is None:
            r = _PLAIN[status] = SeamcallResult(TdxStatus(status))
        return r
    st = _STATUS.get(status) if type(status) is not bool else None
    if st is None:
        st = TdxStatus(status)              # validates; then shared (a TdxStatus is immutable)
        if len(_STATUS) < 4096:
            _STATUS[status] = st
    if type(rcx) is int and type(rdx) is int and type(r8) is int and type(r9) is int \
            and type(r10) is int and type(r11) is int:
        # SeamcallResult(st, rcx, ...) without the frozen dataclass __init__'s seven
        # object.__setattr__ calls: the same instance dict, filled at once
        r = _new(SeamcallResult)
        r.__dict__.update(status=st, rcx=rcx, rdx=rdx, r8=r8, r9=r9, r10=r10, r11=r11)
        return r
    return SeamcallResult(st, rcx, rdx, r8, r9, r10, r11)


_PLAIN: Dict[int, SeamcallResult] = {}
_STATUS: Dict[int, TdxStatus] = {}
_new = object.__new__


#: (LeafFail, Op, HANDLERS), imported on first use: those modules import this one.
_LAZY: Optional[Tuple[Any, Any, Any]] = None


def _load_lazy() -> None:
    global _LAZY
    from tdxcore.module.inflight import LeafFail, Op
    from tdxcore.module.leaves import HANDLERS

    _LAZY = (LeafFail, Op, HANDLERS)


#: (td.Vcpu, tdcall.begin_accept, guest_access.guest_translate), imported on first use.
_LAZY_TDCALL: Optional[Tuple[Any, Any, Any]] = None


def _load_lazy_tdcall() -> None:
    global _LAZY_TDCALL
    from tdxcore.module.guest_access import guest_translate
    from tdxcore.module.td import Vcpu
    from tdxcore.module.tdcall import begin_accept

    _LAZY_TDCALL = (Vcpu, begin_accept, guest_translate)


class SysState(enum.IntEnum):
    """The module's global system state (module ``sys_state``; tdx-facts §6.1)."""

    SYSINIT_PENDING = 0
    SYSINIT_DONE = 1
    SYSCONFIG_DONE = 2
    SYS_READY = 3


class ModuleStatus(enum.IntEnum):
    """The kernel's view (``tdx_module_status``): UNINITIALIZED, INITIALIZED, or sticky ERROR."""

    UNINITIALIZED = 0
    INITIALIZED = 1
    ERROR = 2


#: Leaves the module's dispatcher runs before SYS_READY (module 1.5 ``tdx_vmm_dispatcher``);
#: every other leaf gets ``TDX_SYS_NOT_READY`` until the last package ran TDH.SYS.KEY.CONFIG.
SYS_READY_EXEMPT = frozenset({
    Leaf.TDH_SYS_INFO, Leaf.TDH_SYS_RD, Leaf.TDH_SYS_RDALL, Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_LP_INIT,
    Leaf.TDH_SYS_CONFIG, Leaf.TDH_SYS_KEY_CONFIG, Leaf.TDH_SYS_LP_SHUTDOWN, Leaf.TDH_SYS_UPDATE,
})

#: Bring-up steps that issue a SEAMCALL, in order, with their leaf: the names ``fail_bringup``
#: takes. (The kernel-only step "construct_tdmrs" fails for real, e.g. ENOMEM for the PAMTs.)
BRINGUP_STEPS: Tuple[str, ...] = ("sys_init", "lp_init", "config", "key_config", "tdmr_init")
_STEP_LEAF: Dict[str, Leaf] = {
    "sys_init": Leaf.TDH_SYS_INIT,
    "lp_init": Leaf.TDH_SYS_LP_INIT,
    "config": Leaf.TDH_SYS_CONFIG,
    "key_config": Leaf.TDH_SYS_KEY_CONFIG,
    "tdmr_init": Leaf.TDH_SYS_TDMR_INIT,
}


@dataclass
class Tdmr:
    """The module's copy of one configured TDMR (module ``tdmr_table`` entry)."""

    base: int
    size: int
    last_initialized: int
    pamt: Tuple[Tuple[int, int], ...]        # (base, size) bytes of the 4K, 2M, 1G PAMT areas
    rsvd: Tuple[Tuple[int, int], ...]        # (offset, size) bytes, ascending

    @property
    def end(self) -> int:
        """One past the TDMR's last byte."""
        return self.base + self.size


#: Legacy SYS handler shape (wrapped into a begin handler by :mod:`tdxcore.module.leaves`).
Handler = Callable[["TdxModule", int, int, int, int, int, int, int], SeamcallResult]
#: Begin handler: ``handler(tdx, op) -> SeamcallResult | effect closure``.
BeginHandler = Callable[["TdxModule", Any], Any]

#: Event kinds the TD-scope module adds (fields after kind, actor).
MODULE_EVENT_KINDS: Tuple[Tuple[str, Tuple[str, ...], Optional[str]], ...] = (
    ("seamcall_abort", ("leaf", "cpu", "op"), "seamcall"),
    ("tdcall_abort", ("leaf", "cpu", "op"), "tdcall"),
    ("td_enter", ("leaf", "cpu", "tdvpr", "epoch", "zero_step"), "seamcall"),
    ("td_exit", ("leaf", "cpu", "tdvpr", "epoch", "reason", "gfn"), "seamcall"),
    ("tdcall_begin", ("leaf", "cpu", "args", "gfn", "pfn"), "tdcall"),
    ("tdcall_end", ("leaf", "cpu", "status", "out", "gfn", "pfn"), "tdcall"),
    ("inject", ("leaf", "status"), None),     # an armed injection fired (leaf of either space)
)


class TdxModule:
    """The TDX module of one host (``host.tdx``) plus the kernel's ``tdx_enable()`` state.

    Parameters
    ----------
    host : Host
        The owner; the module reaches frames, PAMT, KeyIDs, CPUs and the event log through it.

    Notes
    -----
    Locks: ``lock`` (a real ``threading.RLock``) makes every SEAMCALL atomic against OS threads;
    ``module_lock`` (a :class:`~tdxcore.sched.KLock`, the kernel's ``tdx_module_lock``) serializes
    ``enable_op`` generators under a scheduler; ``enable()`` additionally holds a real lock
    while it drives the generator, so racing threads see exactly one initialization. Do not mix
    a scheduler actor inside ``enable_op`` with a thread calling ``enable()``: the thread would
    find the KLock held and raise ``SchedDeadlock`` (documented limit of the threaded mode).

    ``lock`` is held for the whole of ``begin`` (checks + try-locks) and of ``complete``/``abort``
    /``enter``/``exit`` (effect + release), never across them: between begin and complete other
    ops run and meet the held try-locks (SPEC §5). The module's locks are the PAMT entry locks
    (TDR, pages), the S-EPT entry locks (in the tree core) and BusyLocks (TDCS op state, S-EPT
    tree, TD epoch; KOT; per-package WBCACHE).

    TD-scope state: ``tds`` (TDR pfn → :class:`~tdxcore.module.td.Td`), ``vcpu_tdr`` (TDVPR pfn
    → TDR pfn), ``kot`` (:class:`~tdxcore.module.kot.Kot`), ``td_params`` (PA → TdParams written
    by :meth:`write_td_params`), ``wbcache_resume`` (package → KeyIDs of an interrupted
    CACHE.WB), ``holders`` (resource key → ops holding it), ``inflight`` (op id → acquired op).
    """

    def __init__(self, host: "Host") -> None:
        self.host = host
        self.lock = threading.RLock()
        self.module_lock = KLock("tdx_module_lock")
        self._enable_lock = threading.Lock()
        # module state
        self.sys_state = SysState.SYSINIT_PENDING
        self.lp_initialized: Dict[int, None] = {}
        self.global_keyid: Optional[int] = None
        self.pkg_configured: Dict[int, None] = {}
        self.tdmrs: List[Tdmr] = []
        # kernel (tdx_enable) state
        self.status = ModuleStatus.UNINITIALIZED
        self.error: Optional[HostError] = None
        self.kernel_sysinit_done = False
        self.kernel_lp_done: Dict[int, None] = {}
        self.pamt_frames: List[Tuple[int, int]] = []     # (first pfn, nr) per TDMR
        self.tdmr_info_frames: List[int] = []
        self._fail: Dict[Leaf, List[Any]] = {}           # leaf -> [status, remaining]
        self.injector = Injector(host.rng("inject"),
                                 on_inject=lambda call, inj: host.count("nr_injected"))
        # TD-scope module state (issue 4 items 3-4)
        from tdxcore.module.kot import Kot

        self.tds: Dict[int, Any] = {}                    # TDR pfn -> Td
        self.vcpu_tdr: Dict[int, int] = {}               # TDVPR pfn -> TDR pfn
        self.kot = Kot(host.keyids.nr_keyids, host.keyids.guest_range)
        self.td_params: Dict[int, Any] = {}              # PA -> TdParams written there
        self.wbcache_locks: Dict[int, Any] = {}          # package -> BusyLock(WBCACHE)
        self.wbcache_resume: Dict[int, Tuple[int, ...]] = {}   # package -> HKIDs FLUSHED at start
        self._pending_interrupts: Dict[int, int] = {}    # package -> CACHE.WB calls to interrupt
        self.holders: Dict[Tuple[Any, ...], List[Any]] = {}    # resource key -> ops holding it
        self.priority_requester: Dict[Tuple[Any, ...], str] = {}
        self.inflight: Dict[int, Any] = {}               # op id -> acquired Op
        self._op_seq = 0
        self._tdmr_src: Optional[List[Tdmr]] = None      # in_tdmr's cache of TDMR pfn bounds
        self._tdmr_len = 0
        self._tdmr_pfns: Tuple[Tuple[int, int], ...] = ()
        for kind, fields, space in MODULE_EVENT_KINDS:
            host.events.register_kind(kind, fields, space)

    # ------------------------------------------------------------------ bring-up
    def enable_op(self) -> Any:
        """Return the ``tdx_enable()`` generator (see :func:`tdxcore.module.bringup.enable_op`)."""
        from tdxcore.module.bringup import enable_op

        return enable_op(self)

    def enable(self) -> int:
        """Detect and initialize the module once; idempotent; a failure is a sticky ERROR.

        Returns
        -------
        int
            0 once the module is INITIALIZED (also on every later call).

        Raises
        ------
        HostError
            With the kernel's errno and the reason: ``ENODEV`` (SEAMRR off, fewer than 2 TDX
            KeyIDs), ``EINVAL`` (a present CPU never booted; or any call after a failed init,
            as ``tdx_enable()`` returns for TDX_MODULE_ERROR), ``EIO`` (a SEAMCALL failed),
            ``ENOMEM``/``ENOSPC`` (PAMT/TDMR construction).

        Notes
        -----
        Mirrors ``tdx_enable()`` in ``arch/x86/virt/vmx/tdx/tdx.c`` (6.18) with the seed's
        detection; SPEC §4.10; tdx-facts §6. Threads racing here serialize on a real lock and
        drive the one generator implementation (SPEC §5).
        """
        with self._enable_lock:
            return int(run_to_completion(self.enable_op(), name="tdx_enable"))

    def fail_bringup(self, step: str, status: Optional[int], count: int = 1) -> None:
        """Make the next ``count`` SEAMCALLs of bring-up ``step`` return ``status`` with no effect.

        Parameters
        ----------
        step : str
            One of :data:`BRINGUP_STEPS`.
        status : int or None
            A non-success 64-bit module status (e.g. ``TDX_SYS_BUSY``); None disarms the step.
        count : int
            How many calls fail (>= 1).

        Notes
        -----
        The simple, explicit test mechanism of issue 4 item 2; the general ``inject()`` comes
        later and should replace the table consulted by :meth:`_injected`. It applies to every
        SEAMCALL of that leaf, whoever issues it.
        """
        if not isinstance(step, str) or step not in _STEP_LEAF:
            msg = f"step={step!r} must be one of {BRINGUP_STEPS}"
            raise TdxValueError(msg, name="step", value=step)
        leaf = _STEP_LEAF[step]
        if status is None:
            self._fail.pop(leaf, None)
            return
        s = check_int("status", status, 0, _U64)
        if s == TDX_SUCCESS:
            msg = "status=0x0 (TDX_SUCCESS) is not a failure"
            raise TdxValueError(msg, name="status", value=s)
        n = check_int("count", count, 1, 1 << 31)
        self._fail[leaf] = [TdxStatus(s), n]

    def inject(self, leaf: "Leaf | TdcallLeaf", status: int, count: Optional[int] = 1,
               probability: Optional[float] = None,
               match: Optional[Callable[[InjectCall], bool]] = None) -> Injection:
        """Make ``leaf`` return ``status`` instead of running, at most ``count`` times.

        Parameters
        ----------
        leaf : Leaf or TdcallLeaf
            The leaf (a bare int is refused: 6 is both PAGE.AUG and the guest's ACCEPT).
        status : int
            A status this leaf can return (``inject.LEAF_STATUSES``), operand included.
        count : int or None
            At most this many times (None = unlimited).
        probability : float or None
            Each matching call fires with this probability, drawn from the host's ``"inject"``
            stream (None = always), so a run is deterministic under the host seed.
        match : callable or None
            Called with the call's :class:`~tdxcore.module.inject.InjectCall`; fires only if true.

        Returns
        -------
        Injection
            A handle for ``host.tdx.injector.remove()``.

        Raises
        ------
        TdxTypeError, TdxValueError
            A bad leaf, a status the leaf cannot return, or a bad count/probability/match.

        Notes
        -----
        SPEC §3.1 (Injection). An injected status replaces the leaf's effect: no lock is taken
        and nothing changes, as for a real failure found before any side effect.
        """
        return self.injector.add(leaf, status, count, probability, match)

    def _injected(self, leaf: "Leaf | TdcallLeaf", regs: Tuple[int, ...] = (0, 0, 0, 0),
                  cpu: Optional[int] = None, actor: str = "host") -> Optional[TdxStatus]:
        """Return the status to inject for this call, if any (bring-up step failures first)."""
        if self._fail and isinstance(leaf, Leaf) and leaf in self._fail:
            arm = self._fail[leaf]
            arm[1] -= 1
            if arm[1] <= 0:
                del self._fail[leaf]
            self.host.count("nr_injected")
            return arm[0]
        inj = self.injector
        if not inj._armed:                  # is_armed, without the property call
            return None
        st = inj.consult(InjectCall(leaf, regs[0], regs[1], regs[2], regs[3], cpu, actor))
        if st is not None:
            # tools tell an injected status from a conflict-born one by this edge
            self.host.events.emit("inject", actor, int(leaf), int(st))
        return st

    # ------------------------------------------------------------------ SEAMCALL
    def _check_cpu(self, cpu: Any) -> int:
        if cpu is None:
            return self.host.first_online_cpu()
        c = check_int("cpu", cpu, 0, self.host.nr_cpus)
        if not self.host.is_cpu_online(c):
            msg = f"cpu={c} is offline: a SEAMCALL runs on an online CPU"
            raise TdxValueError(msg, name="cpu", value=c)
        return c

    def _next_op_id(self) -> int:
        self._op_seq += 1
        return self._op_seq

    def _check_regs(self, leaf: Any, regs: Tuple[int, ...], actor: Any) -> Tuple[int, ...]:
        if type(leaf) is not Leaf and not isinstance(leaf, Leaf):
            msg = f"leaf={leaf!r} must be a tdx.Leaf, not {type(leaf).__name__} (a bare int is ambiguous)"
            raise TdxTypeError(msg, name="leaf", value=leaf)
        # Fast path: plain ints in range (the common case), tested in C (no generator frame);
        # anything else goes through check_int for its type/range message (bool is refused there).
        if tuple(map(type, regs)) == _INT6 and min(regs) >= 0 and max(regs) < _U64:
            out = regs
        else:
            names = ("rcx", "rdx", "r8", "r9", "r10", "r11")
            out = tuple(check_int(n, v, 0, _U64) for n, v in zip(names, regs, strict=True))
        if not isinstance(actor, str):
            msg = f"actor={actor!r} must be a str"
            raise TdxTypeError(msg, name="actor", value=actor)
        return out

    def begin(self, leaf: Leaf, rcx: int = 0, rdx: int = 0, r8: int = 0, r9: int = 0, r10: int = 0,
              r11: int = 0, *, cpu: Optional[int] = None, actor: str = "host") -> Any:
        """Start SEAMCALL ``leaf``: run its checks and take its try-locks; return the :class:`Op`.

        Parameters
        ----------
        leaf : Leaf
            The leaf; a bare int (or a ``TdcallLeaf``) is refused: 6 is both PAGE.AUG and ACCEPT.
        rcx, rdx, r8, r9, r10, r11 : int
            Input registers, each in ``[0, 2**64)``.
        cpu : int, optional
            The logical processor it runs on (default: the lowest online CPU); must be online.
        actor : str
            Who issues it (event log; lock_conflict holder/contender names).

        Returns
        -------
        Op
            ``op.acquired`` True: the locks are held until ``op.complete()`` / ``op.abort()``;
            False: already finished (BUSY, a failed check, injection), ``op.result`` set.

        Raises
        ------
        TdxTypeError, TdxValueError
            Bad argument types/ranges, an offline CPU, or a leaf that is not modelled yet
            (only once the module is SYS_READY; before that the module answers
            ``TDX_SYS_NOT_READY``, as its dispatcher does).

        Notes
        -----
        Logs ``seamcall_begin`` now and ``seamcall_end`` when the op finishes (``seamcall_abort``
        on abort). SPEC §3.1, §5; module ``tdx_vmm_dispatcher``.
        """
        regs = self._check_regs(leaf, (rcx, rdx, r8, r9, r10, r11), actor)
        if _LAZY is None:
            _load_lazy()
        assert _LAZY is not None
        LeafFail, Op, HANDLERS = _LAZY

        with self.lock:
            c = self._check_cpu(cpu)
            handler = HANDLERS.get(leaf)
            gated = self.sys_state != SysState.SYS_READY and leaf not in SYS_READY_EXEMPT
            if handler is None and not gated:
                msg = f"leaf {leaf} is not modelled yet (SEAMCALL {int(leaf)})"
                raise TdxValueError(msg, name="leaf", value=leaf)
            op = Op(self, leaf, regs, c, actor)
            self._emit_begin(actor, leaf, c, regs)
            self.host.count_seamcall(leaf)
            inj = self._injected(leaf, regs, c, actor)
            if inj is not None:
                op._finish(SeamcallResult(inj))
                return op
            if gated:
                op._finish(result(TDX_SYS_NOT_READY))
                return op
            assert handler is not None  # gated is False and handler None raised above
            try:
                r = handler(self, op)
            except LeafFail as f:
                op._release_all()
                op._finish(f.res)
                return op
            except BaseException:
                op._release_all()
                raise
            if isinstance(r, SeamcallResult):
                op._release_all()
                op._finish(r)
                return op
            if op._exit is None:
                op._effect = r
            op.acquired = True
            self.inflight[op.id] = op
            return op

    def seamcall(self, leaf: Leaf, rcx: int = 0, rdx: int = 0, r8: int = 0, r9: int = 0, r10: int = 0,
                 r11: int = 0, *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """Issue SEAMCALL ``leaf`` with the given registers on ``cpu`` and return its result.

        ``begin(...)`` + ``complete()`` (see :meth:`begin` for parameters and errors). The
        result's status is data: any status the module can return, BUSY included.
        """
        return self.begin(leaf, rcx, rdx, r8, r9, r10, r11, cpu=cpu, actor=actor).complete()

    def seamcall_op(self, leaf: Leaf, rcx: int = 0, rdx: int = 0, r8: int = 0, r9: int = 0,
                    r10: int = 0, r11: int = 0, *, cpu: Optional[int] = None,
                    actor: str = "host") -> Generator[Any, Any, SeamcallResult]:
        """Run one SEAMCALL as a generator (SPEC §5): ``begin``, a preemption point, ``complete``.

        An op that took its try-locks yields ``PREEMPT`` once while it holds them, so under a
        :class:`~tdxcore.storm.scheduler.Scheduler` other actors run while it is in flight and
        really contend with it; an op that finished at ``begin`` (BUSY, a failed check, an
        injected status) does not yield. Use it as ``res = yield from host.tdx.seamcall_op(...)``.

        Returns
        -------
        SeamcallResult
            As :meth:`seamcall` (which is the same ``begin`` + ``complete`` with no yield between).

        Notes
        -----
        One implementation: both forms are ``begin`` → ``complete``; this one only adds the
        preemption point SPEC §5 puts between the two edges of an in-flight SEAMCALL.
        """
        op = self.begin(leaf, rcx, rdx, r8, r9, r10, r11, cpu=cpu, actor=actor)
        if op.acquired:
            yield PREEMPT
        return op.complete()

    def _emit_end_op(self, op: Any, res: SeamcallResult) -> int:
        st = res.status
        base = st & _STATUS_MASK        # st.base / st.operand / st.is_error, as int operations
        if base == TDX_OPERAND_BUSY or base == TDX_OPERAND_BUSY_HOST_PRIORITY:
            self.host.count_busy(op.leaf, st & 0xFFFFFFFF)
        host = self.host
        if st >> 63:
            host.count("nr_tdcall_errors" if op.leaf_space == "tdcall" else "nr_seamcall_errors")
        return host.events.emit("tdcall_end" if op.leaf_space == "tdcall" else "seamcall_end", op.actor,
                                int(op.leaf), op.cpu, int(st),
                                (res.rcx, res.rdx, res.r8, res.r9, res.r10, res.r11), op.gfn, op.pfn)

    def in_tdmr(self, pfn: int) -> bool:
        """Whether frame ``pfn`` lies in a configured TDMR (TDX-convertible memory)."""
        if self._tdmr_src is not self.tdmrs or self._tdmr_len != len(self.tdmrs):
            self._tdmr_src, self._tdmr_len = self.tdmrs, len(self.tdmrs)
            self._tdmr_pfns = tuple((t.base >> 12, t.end >> 12) for t in self.tdmrs)
        for lo, hi in self._tdmr_pfns:
            if lo <= pfn < hi:
                return True
        return False

    def write_td_params(self, pa: int, params: Any) -> None:
        """Store a :class:`~tdxcore.module.td.TdParams` at host PA ``pa`` for TDH.MNG.INIT (RDX).

        Models the host writing the 1024-byte TD_PARAMS structure; ``pa`` must be
        ``TD_PARAMS_ALIGN``-aligned host memory (else MNG.INIT answers ``OPERAND_INVALID|RDX``).
        """
        from tdxcore.module.td import TdParams

        p = check_int("pa", pa, 0, self.host.nr_frames << 12)
        if not isinstance(params, TdParams):
            msg = f"params={params!r} must be a TdParams"
            raise TdxTypeError(msg, name="params", value=params)
        self.td_params[p] = params

    def pending_interrupt(self, package: int, count: int = 1) -> None:
        """Make the next ``count`` TDH.PHYMEM.CACHE.WB calls on ``package`` see a host interrupt.

        Each saves its resume point and returns ``TDX_INTERRUPTED_RESUMABLE`` (a test knob for
        the module's pending-interrupt check between sub-blocks).
        """
        pk = check_int("package", package, 0, self.host.nr_packages)
        self._pending_interrupts[pk] = check_int("count", count, 0, 1 << 31)

    def td(self, tdr: int) -> Any:
        """Return the module's :class:`~tdxcore.module.td.Td` of TDR frame ``tdr`` (KeyError if none)."""
        return self.tds[tdr]

    def vcpu(self, tdvpr: int) -> Any:
        """Return the :class:`~tdxcore.module.td.Vcpu` of TDVPR frame ``tdvpr`` (KeyError if none)."""
        return self.tds[self.vcpu_tdr[tdvpr]].vcpus[tdvpr]

    def _emit_begin(self, actor: str, leaf: Leaf, cpu: int, regs: Tuple[int, ...],
                    gfn: Optional[int] = None, pfn: Optional[int] = None) -> int:
        return self.host.events.emit("seamcall_begin", actor, int(leaf), cpu, regs, gfn, pfn)

    def _emit_end(self, actor: str, leaf: Leaf, cpu: int, res: SeamcallResult,
                  gfn: Optional[int] = None, pfn: Optional[int] = None) -> int:
        if res.status.is_error:
            self.host.count("nr_seamcall_errors")
        return self.host.events.emit("seamcall_end", actor, int(leaf), cpu, int(res.status), res.out,
                                     gfn, pfn)

    # typed SYS leaves ---------------------------------------------------------------
    def tdh_sys_init(self, *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """TDH.SYS.INIT (33): global module initialization, once (RCX = 0)."""
        return self.seamcall(Leaf.TDH_SYS_INIT, cpu=cpu, actor=actor)

    def tdh_sys_lp_init(self, cpu: int, *, actor: str = "host") -> SeamcallResult:
        """TDH.SYS.LP.INIT (35) on logical processor ``cpu``, once per LP."""
        c = check_int("cpu", cpu, 0, self.host.nr_cpus)
        return self.seamcall(Leaf.TDH_SYS_LP_INIT, cpu=c, actor=actor)

    def tdh_sys_config(self, tdmr_info_pa: int, nr_tdmrs: int, global_keyid: int, *,
                       cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """TDH.SYS.CONFIG (45): RCX = PA of the TDMR_INFO PA array, RDX = #TDMRs, R8 = global KeyID."""
        return self.seamcall(Leaf.TDH_SYS_CONFIG, tdmr_info_pa, nr_tdmrs, global_keyid, cpu=cpu, actor=actor)

    def tdh_sys_key_config(self, cpu: int, *, actor: str = "host") -> SeamcallResult:
        """TDH.SYS.KEY.CONFIG (31) on ``cpu``: program the global KeyID on that CPU's package."""
        c = check_int("cpu", cpu, 0, self.host.nr_cpus)
        return self.seamcall(Leaf.TDH_SYS_KEY_CONFIG, cpu=c, actor=actor)

    def tdh_sys_tdmr_init(self, tdmr_base: int, *, cpu: Optional[int] = None,
                          actor: str = "host") -> SeamcallResult:
        """TDH.SYS.TDMR.INIT (36): initialize the next chunk of the TDMR at ``tdmr_base``.

        RDX returns the next-to-initialize address rounded down to 1 GiB.
        """
        return self.seamcall(Leaf.TDH_SYS_TDMR_INIT, tdmr_base, cpu=cpu, actor=actor)

    # typed TD-scope leaves -----------------------------------------------------------
    # Frames are pfns (the method builds PA = pfn << 12); GPAs are 4 KiB-aligned guest physical
    # addresses (combined with the level into the GPA|level operand). Statuses are data.
    def _pa(self, name: str, pfn: Any) -> int:
        return check_int(name, pfn, 0, 1 << 40) << 12

    def _gpa_level(self, gpa: Any, level: Any) -> int:
        g = check_int("gpa", gpa, 0, 1 << 52)
        if g & 0xFFF:
            msg = f"gpa={g:#x} is not 4 KiB aligned"
            raise TdxValueError(msg, name="gpa", value=gpa)
        return g | check_int("level", level, 0, 5)

    def tdh_mng_create(self, tdr: int, hkid: int, *, cpu: Optional[int] = None,
                       actor: str = "host") -> SeamcallResult:
        """TDH.MNG.CREATE (9): RCX = TDR frame, RDX = HKID."""
        return self.seamcall(Leaf.TDH_MNG_CREATE, self._pa("tdr", tdr), hkid, cpu=cpu, actor=actor)

    def tdh_mng_key_config(self, tdr: int,
                           *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """TDH.MNG.KEY.CONFIG (8) on ``cpu``: program the TD's HKID on that CPU's package."""
        return self.seamcall(Leaf.TDH_MNG_KEY_CONFIG, self._pa("tdr", tdr), cpu=cpu, actor=actor)

    def tdh_mng_addcx(self, tdr: int, page: int, *, cpu: Optional[int] = None,
                      actor: str = "host") -> SeamcallResult:
        """TDH.MNG.ADDCX (1): add TDCS page ``page`` to TD ``tdr``."""
        return self.seamcall(Leaf.TDH_MNG_ADDCX, self._pa("page", page), self._pa("tdr", tdr), cpu=cpu,
                             actor=actor)

    def tdh_mng_init(self, tdr: int, td_params_pa: int, *, cpu: Optional[int] = None,
                     actor: str = "host") -> SeamcallResult:
        """TDH.MNG.INIT (21): RDX = PA where :meth:`write_td_params` stored the TD_PARAMS."""
        return self.seamcall(Leaf.TDH_MNG_INIT, self._pa("tdr", tdr), td_params_pa, cpu=cpu, actor=actor)

    def tdh_mng_rd(self, tdr: int, field: int,
                   *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """TDH.MNG.RD (11): R8 = value of ``field`` (``constants.MNG_RD_FIELD_*``)."""
        return self.seamcall(Leaf.TDH_MNG_RD, self._pa("tdr", tdr), field, cpu=cpu, actor=actor)

    def tdh_mng_vpflushdone(self, tdr: int,
                            *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """TDH.MNG.VPFLUSHDONE (19): KOT entry -> FLUSHED, TD lifecycle -> BLOCKED."""
        return self.seamcall(Leaf.TDH_MNG_VPFLUSHDONE, self._pa("tdr", tdr), cpu=cpu, actor=actor)

    def tdh_mng_key_freeid(self, tdr: int,
                           *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """TDH.MNG.KEY.FREEID (20): KOT entry -> FREE, TD lifecycle -> TEARDOWN."""
        return self.seamcall(Leaf.TDH_MNG_KEY_FREEID, self._pa("tdr", tdr), cpu=cpu, actor=actor)

    def tdh_vp_create(self, tdr: int, tdvpr: int, *, cpu: Optional[int] = None,
                      actor: str = "host") -> SeamcallResult:
        """TDH.VP.CREATE (10): RCX = TDVPR frame, RDX = TDR."""
        return self.seamcall(Leaf.TDH_VP_CREATE, self._pa("tdvpr", tdvpr), self._pa("tdr", tdr), cpu=cpu,
                             actor=actor)

    def tdh_vp_addcx(self, tdvpr: int, page: int, *, cpu: Optional[int] = None,
                     actor: str = "host") -> SeamcallResult:
        """TDH.VP.ADDCX (4): RCX = TDCX frame, RDX = TDVPR."""
        return self.seamcall(Leaf.TDH_VP_ADDCX, self._pa("page", page), self._pa("tdvpr", tdvpr), cpu=cpu,
                             actor=actor)

    def tdh_vp_init(self, tdvpr: int, rcx: int, x2apic_id: int, *, cpu: Optional[int] = None,
                    actor: str = "host") -> SeamcallResult:
        """TDH.VP.INIT v1 (22): initial guest RCX and the vCPU's x2APIC id."""
        return self.seamcall(Leaf.TDH_VP_INIT, self._pa("tdvpr", tdvpr), rcx, x2apic_id, cpu=cpu, actor=actor)

    def vp_enter(self, tdvpr: int, *, cpu: Optional[int] = None, actor: str = "host") -> Any:
        """Begin TDH.VP.ENTER (0) on ``tdvpr``.

        The :class:`~tdxcore.module.inflight.Op` to ``enter()`` and later ``exit(reason,
        ...)`` (see :mod:`tdxcore.module.leaves.vp`).
        """
        return self.begin(Leaf.TDH_VP_ENTER, self._pa("tdvpr", tdvpr), cpu=cpu, actor=actor)

    def tdh_vp_enter(self, tdvpr: int, *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """TDH.VP.ENTER (0) run to a TDCALL exit (begin + enter + exit), or its BUSY/failure."""
        return self.vp_enter(tdvpr, cpu=cpu, actor=actor).complete()

    def tdh_vp_flush(self, tdvpr: int, *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """TDH.VP.FLUSH (18) on the LP the vCPU is associated with."""
        return self.seamcall(Leaf.TDH_VP_FLUSH, self._pa("tdvpr", tdvpr), cpu=cpu, actor=actor)

    def tdh_mem_sept_add(self, tdr: int, gpa: int, level: int, page: int, *, cpu: Optional[int] = None,
                         actor: str = "host") -> SeamcallResult:
        """TDH.MEM.SEPT.ADD (3): link S-EPT page ``page`` for the level-``level`` entry of ``gpa``."""
        return self.seamcall(Leaf.TDH_MEM_SEPT_ADD, self._gpa_level(gpa, level), self._pa("tdr", tdr),
                             self._pa("page", page), cpu=cpu, actor=actor)

    def tdh_mem_page_add(self, tdr: int, gpa: int, page: int, source: int, *, cpu: Optional[int] = None,
                         actor: str = "host") -> SeamcallResult:
        """TDH.MEM.PAGE.ADD (2): copy frame ``source`` into ``page`` mapped at ``gpa`` (4K)."""
        return self.seamcall(Leaf.TDH_MEM_PAGE_ADD, self._gpa_level(gpa, 0), self._pa("tdr", tdr),
                             self._pa("page", page), self._pa("source", source), cpu=cpu, actor=actor)

    def tdh_mr_extend(self, tdr: int, gpa: int,
                      *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """TDH.MR.EXTEND (16): measure the 256-byte chunk at ``gpa``."""
        return self.seamcall(Leaf.TDH_MR_EXTEND, check_int("gpa", gpa, 0, 1 << 52), self._pa("tdr", tdr),
                             cpu=cpu, actor=actor)

    def tdh_mr_finalize(self, tdr: int, *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """TDH.MR.FINALIZE (17): op state -> RUNNABLE."""
        return self.seamcall(Leaf.TDH_MR_FINALIZE, self._pa("tdr", tdr), cpu=cpu, actor=actor)

    def tdh_mem_page_aug(self, tdr: int, gpa: int, level: int, page: int, *, cpu: Optional[int] = None,
                         actor: str = "host") -> SeamcallResult:
        """TDH.MEM.PAGE.AUG (6): map frame ``page`` PENDING at ``gpa``/``level``."""
        return self.seamcall(Leaf.TDH_MEM_PAGE_AUG, self._gpa_level(gpa, level), self._pa("tdr", tdr),
                             self._pa("page", page), cpu=cpu, actor=actor)

    def tdh_mem_range_block(self, tdr: int, gpa: int, level: int, *, cpu: Optional[int] = None,
                            actor: str = "host") -> SeamcallResult:
        """TDH.MEM.RANGE.BLOCK (7)."""
        return self.seamcall(Leaf.TDH_MEM_RANGE_BLOCK, self._gpa_level(gpa, level), self._pa("tdr", tdr),
                             cpu=cpu, actor=actor)

    def tdh_mem_range_unblock(self, tdr: int, gpa: int, level: int, *, cpu: Optional[int] = None,
                              actor: str = "host") -> SeamcallResult:
        """TDH.MEM.RANGE.UNBLOCK (39)."""
        return self.seamcall(Leaf.TDH_MEM_RANGE_UNBLOCK, self._gpa_level(gpa, level), self._pa("tdr", tdr),
                             cpu=cpu, actor=actor)

    def tdh_mem_track(self, tdr: int, *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """TDH.MEM.TRACK (38): advance the TD epoch."""
        return self.seamcall(Leaf.TDH_MEM_TRACK, self._pa("tdr", tdr), cpu=cpu, actor=actor)

    def tdh_mem_page_remove(self, tdr: int, gpa: int, level: int, *, cpu: Optional[int] = None,
                            actor: str = "host") -> SeamcallResult:
        """TDH.MEM.PAGE.REMOVE (29)."""
        return self.seamcall(Leaf.TDH_MEM_PAGE_REMOVE, self._gpa_level(gpa, level), self._pa("tdr", tdr),
                             cpu=cpu, actor=actor)

    # in-flight forms (SPEC §5): begin, a preemption point while the try-locks are held, complete
    def tdh_mem_sept_add_op(self, tdr: int, gpa: int, level: int, page: int, *, cpu: Optional[int] = None,
                            actor: str = "host") -> Generator[Any, Any, SeamcallResult]:
        """:meth:`tdh_mem_sept_add` as a generator (:meth:`seamcall_op`)."""
        return self.seamcall_op(Leaf.TDH_MEM_SEPT_ADD, self._gpa_level(gpa, level), self._pa("tdr", tdr),
                                self._pa("page", page), cpu=cpu, actor=actor)

    def tdh_mem_page_aug_op(self, tdr: int, gpa: int, level: int, page: int, *, cpu: Optional[int] = None,
                            actor: str = "host") -> Generator[Any, Any, SeamcallResult]:
        """:meth:`tdh_mem_page_aug` as a generator (:meth:`seamcall_op`)."""
        return self.seamcall_op(Leaf.TDH_MEM_PAGE_AUG, self._gpa_level(gpa, level), self._pa("tdr", tdr),
                                self._pa("page", page), cpu=cpu, actor=actor)

    def tdh_mem_range_block_op(self, tdr: int, gpa: int, level: int, *, cpu: Optional[int] = None,
                               actor: str = "host") -> Generator[Any, Any, SeamcallResult]:
        """:meth:`tdh_mem_range_block` as a generator (:meth:`seamcall_op`)."""
        return self.seamcall_op(Leaf.TDH_MEM_RANGE_BLOCK, self._gpa_level(gpa, level), self._pa("tdr", tdr),
                                cpu=cpu, actor=actor)

    def tdh_mem_track_op(self, tdr: int, *, cpu: Optional[int] = None,
                         actor: str = "host") -> Generator[Any, Any, SeamcallResult]:
        """:meth:`tdh_mem_track` as a generator (:meth:`seamcall_op`)."""
        return self.seamcall_op(Leaf.TDH_MEM_TRACK, self._pa("tdr", tdr), cpu=cpu, actor=actor)

    def tdh_mem_page_remove_op(self, tdr: int, gpa: int, level: int, *, cpu: Optional[int] = None,
                               actor: str = "host") -> Generator[Any, Any, SeamcallResult]:
        """:meth:`tdh_mem_page_remove` as a generator (:meth:`seamcall_op`)."""
        return self.seamcall_op(Leaf.TDH_MEM_PAGE_REMOVE, self._gpa_level(gpa, level), self._pa("tdr", tdr),
                                cpu=cpu, actor=actor)

    def tdh_mem_sept_remove(self, tdr: int, gpa: int, level: int, *, cpu: Optional[int] = None,
                            actor: str = "host") -> SeamcallResult:
        """TDH.MEM.SEPT.REMOVE (30)."""
        return self.seamcall(Leaf.TDH_MEM_SEPT_REMOVE, self._gpa_level(gpa, level), self._pa("tdr", tdr),
                             cpu=cpu, actor=actor)

    def tdh_phymem_cache_wb(self, resume: bool = False, *, cpu: Optional[int] = None,
                            actor: str = "host") -> SeamcallResult:
        """TDH.PHYMEM.CACHE.WB (40) on ``cpu``'s package; ``resume`` sets RCX = 1."""
        if not isinstance(resume, bool):
            msg = f"resume={resume!r} must be a bool"
            raise TdxTypeError(msg, name="resume", value=resume)
        return self.seamcall(Leaf.TDH_PHYMEM_CACHE_WB, int(resume), cpu=cpu, actor=actor)

    def tdh_phymem_page_reclaim(self, page: int, *, cpu: Optional[int] = None,
                                actor: str = "host") -> SeamcallResult:
        """TDH.PHYMEM.PAGE.RECLAIM (28): RCX = type, RDX = owner, R8 = size on success."""
        return self.seamcall(Leaf.TDH_PHYMEM_PAGE_RECLAIM, self._pa("page", page), cpu=cpu, actor=actor)

    def tdh_phymem_page_wbinvd(self, page: int, keyid: int, *, cpu: Optional[int] = None,
                               actor: str = "host") -> SeamcallResult:
        """TDH.PHYMEM.PAGE.WBINVD (41): RCX = PA | keyid << MODEL_MAXPHYADDR."""
        from tdxcore.constants import MODEL_MAXPHYADDR

        k = check_int("keyid", keyid, 0, 1 << 16)
        return self.seamcall(Leaf.TDH_PHYMEM_PAGE_WBINVD, self._pa("page", page) | (k << MODEL_MAXPHYADDR),
                             cpu=cpu, actor=actor)

    # guest TDCALL ----------------------------------------------------------------------
    def begin_accept(self, tdvpr: int, gpa: int, level: int = 0, *, cpu: Optional[int] = None,
                     actor: str = "guest") -> Any:
        """Begin the guest's TDG.MEM.PAGE.ACCEPT on vCPU ``tdvpr`` (see :mod:`tdxcore.module.tdcall`).

        ``tdvpr`` is the vCPU's TDVPR frame or its :class:`~tdxcore.module.td.Vcpu` handle.
        """
        if _LAZY_TDCALL is None:
            _load_lazy_tdcall()
        assert _LAZY_TDCALL is not None
        vcpu_cls, begin_accept, _ = _LAZY_TDCALL
        if isinstance(tdvpr, vcpu_cls):
            tdvpr = tdvpr.tdvpr
        return begin_accept(self, tdvpr, self._gpa_level(gpa, level), cpu, actor)

    def tdg_mem_page_accept(self, tdvpr: int, gpa: int, level: int = 0, *, cpu: Optional[int] = None,
                            actor: str = "guest") -> SeamcallResult:
        """TDG.MEM.PAGE.ACCEPT (TDCALL 6).

        SUCCESS, PAGE_ALREADY_ACCEPTED|level, PAGE_SIZE_MISMATCH|level, ``TDX_SUCCESS |
        ACCEPT_EPT_VIOLATION`` (the EPT-violation TD exit), OPERAND_BUSY|RCX or
        OPERAND_BUSY_HOST_PRIORITY|RCX.
        """
        return self.begin_accept(tdvpr, gpa, level, cpu=cpu, actor=actor).complete()

    def guest_translate(self, tdvpr: int, gpa: int, write: bool = False) -> Any:
        """Walk the S-EPT as the guest CPU does for an access at private ``gpa`` (not a SEAMCALL).

        See :func:`tdxcore.module.guest_access.guest_translate`.
        """
        if _LAZY_TDCALL is None:
            _load_lazy_tdcall()
        assert _LAZY_TDCALL is not None
        return _LAZY_TDCALL[2](self, tdvpr, gpa, write)

    # ------------------------------------------------------------------ host hooks
    @property
    def is_ready(self) -> bool:
        """Whether the module is SYS_READY (TD-scope leaves get past the dispatcher)."""
        return self.sys_state == SysState.SYS_READY

    def state_bytes(self) -> bytes:
        """Canonical serialization of module + kernel bring-up state (for ``host.state_hash``)."""
        lp, pk = sorted(self.lp_initialized), sorted(self.pkg_configured)
        parts = [struct.pack("<BBqB", int(self.sys_state), int(self.status),
                             -1 if self.global_keyid is None else self.global_keyid,
                             int(self.kernel_sysinit_done)),
                 struct.pack(f"<H{len(lp)}H", len(lp), *lp), struct.pack(f"<H{len(pk)}H", len(pk), *pk)]
        for t in self.tdmrs:
            parts.append(struct.pack("<QQQ", t.base, t.size, t.last_initialized))
        kl = sorted(self.kernel_lp_done)
        parts.append(struct.pack(f"<H{len(kl)}H", len(kl), *kl))
        for p, n in self.pamt_frames:
            parts.append(struct.pack("<QQ", p, n))
        parts.append(struct.pack(f"<H{len(self.tdmr_info_frames)}Q", len(self.tdmr_info_frames),
                                 *self.tdmr_info_frames))
        parts.append(b"" if self.error is None else str(self.error).encode())
        parts.append(self.kot.state_bytes())
        for tdr in sorted(self.tds):
            parts.append(self.tds[tdr].state_bytes())
        for pkg in sorted(self.wbcache_resume):
            hk = self.wbcache_resume[pkg]
            parts.append(struct.pack(f"<HH{len(hk)}H", pkg, len(hk), *hk))
        parts.append(self.injector.state_bytes())
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"TdxModule(status={self.status.name}, sys_state={self.sys_state.name})"
