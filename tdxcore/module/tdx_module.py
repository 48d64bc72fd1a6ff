"""``host.tdx``: the TDX module's global state, the SEAMCALL dispatcher and ``enable()``.

What exists so far (issue 4 items 1-2): the SYS leaves bring-up uses (TDH.SYS.INIT, LP.INIT,
CONFIG, KEY.CONFIG, TDMR.INIT; handlers in :mod:`tdxcore.module.leaves.sys`), the dispatcher's
"system not ready" gate, per-step bring-up failure injection, and the kernel's ``tdx_enable()``
(:mod:`tdxcore.module.bringup`). TD-scope leaves, ``begin``/``complete``, ``inject`` and the
scheduler come later: a leaf without a handler gets ``TDX_SYS_NOT_READY`` before the module is
ready (as the module's dispatcher does) and raises ``TdxValueError("... is not modelled yet")``
after — an honest absence, never made-up data.

Seams for the later items:

* a leaf family registers ``{Leaf: handler}`` in :data:`tdxcore.module.leaves.HANDLERS`; a
  handler is ``handler(tdx, cpu, rcx, rdx, r8, r9, r10, r11) -> SeamcallResult`` and is called
  with ``tdx.lock`` held, after the begin event, the ready gate and injection;
* :meth:`TdxModule._injected` is the one place an injected status replaces a leaf's effect;
  the general ``inject()`` should feed it (per-step ``fail_bringup`` is a thin layer on top);
* ``begin``/``complete`` should reuse :meth:`TdxModule._emit_begin` / :meth:`_emit_end`.
"""

from __future__ import annotations

import enum
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from tdxcore.errors import HostError, TdxTypeError, TdxValueError, check_int
from tdxcore.sched import KLock, run_to_completion
from tdxcore.status import TDX_SUCCESS, TDX_SYS_NOT_READY, Leaf, TdxStatus  # type: ignore[attr-defined]

if TYPE_CHECKING:
    from tdxcore.module.host import Host

__all__ = ["SeamcallResult", "TdxModule", "SysState", "ModuleStatus", "BRINGUP_STEPS",
           "SYS_READY_EXEMPT", "Tdmr", "Handler"]

_U64 = 1 << 64


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
    """Build a :class:`SeamcallResult` from a plain status value."""
    return SeamcallResult(TdxStatus(status), rcx, rdx, r8, r9, r10, r11)


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


Handler = Callable[["TdxModule", int, int, int, int, int, int, int], SeamcallResult]


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

    def _injected(self, leaf: Leaf) -> Optional[TdxStatus]:
        arm = self._fail.get(leaf)
        if arm is None:
            return None
        arm[1] -= 1
        if arm[1] <= 0:
            del self._fail[leaf]
        self.host.count("nr_injected")
        return arm[0]

    # ------------------------------------------------------------------ SEAMCALL
    def _check_cpu(self, cpu: Any) -> int:
        if cpu is None:
            return self.host.first_online_cpu()
        c = check_int("cpu", cpu, 0, self.host.nr_cpus)
        if not self.host.is_cpu_online(c):
            msg = f"cpu={c} is offline: a SEAMCALL runs on an online CPU"
            raise TdxValueError(msg, name="cpu", value=c)
        return c

    def seamcall(self, leaf: Leaf, rcx: int = 0, rdx: int = 0, r8: int = 0, r9: int = 0, r10: int = 0,
                 r11: int = 0, *, cpu: Optional[int] = None, actor: str = "host") -> SeamcallResult:
        """Issue SEAMCALL ``leaf`` with the given registers on ``cpu`` and return its result.

        Parameters
        ----------
        leaf : Leaf
            The leaf; a bare int (or a ``TdcallLeaf``) is refused: 6 is both PAGE.AUG and ACCEPT.
        rcx, rdx, r8, r9, r10, r11 : int
            Input registers, each in ``[0, 2**64)``.
        cpu : int, optional
            The logical processor it runs on (default: the lowest online CPU); must be online.
        actor : str
            Who issues it, for the event log.

        Returns
        -------
        SeamcallResult
            Status and output registers; any status the module can return is data.

        Raises
        ------
        TdxTypeError, TdxValueError
            Bad argument types/ranges, an offline CPU, or a leaf that is not modelled yet
            (only once the module is SYS_READY; before that the module answers
            ``TDX_SYS_NOT_READY``, as its dispatcher does).

        Notes
        -----
        Logs ``seamcall_begin`` and ``seamcall_end``. SPEC §3.1; module ``tdx_vmm_dispatcher``.
        """
        if not isinstance(leaf, Leaf):
            msg = f"leaf={leaf!r} must be a tdx.Leaf, not {type(leaf).__name__} (a bare int is ambiguous)"
            raise TdxTypeError(msg, name="leaf", value=leaf)
        regs = tuple(check_int(n, v, 0, _U64) for n, v in
                     (("rcx", rcx), ("rdx", rdx), ("r8", r8), ("r9", r9), ("r10", r10), ("r11", r11)))
        if not isinstance(actor, str):
            msg = f"actor={actor!r} must be a str"
            raise TdxTypeError(msg, name="actor", value=actor)
        from tdxcore.module.leaves import HANDLERS

        with self.lock:
            c = self._check_cpu(cpu)
            handler = HANDLERS.get(leaf)
            gated = self.sys_state != SysState.SYS_READY and leaf not in SYS_READY_EXEMPT
            if handler is None and not gated:
                msg = f"leaf {leaf} is not modelled yet (SEAMCALL {int(leaf)})"
                raise TdxValueError(msg, name="leaf", value=leaf)
            self._emit_begin(actor, leaf, c, regs)
            self.host.count("nr_seamcalls")
            inj = self._injected(leaf)
            if inj is not None:
                res = SeamcallResult(inj)
            elif gated:
                res = result(TDX_SYS_NOT_READY)
            else:
                assert handler is not None  # gated is False and handler None raised above
                res = handler(self, c, *regs)
            self._emit_end(actor, leaf, c, res)
            return res

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
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"TdxModule(status={self.status.name}, sys_state={self.sys_state.name})"
