"""In-flight SEAMCALLs: the :class:`Op` handle ``host.tdx.begin`` returns, and its try-locks.

A leaf's *begin handler* (``handler(tdx, op) -> SeamcallResult | effect``) runs the module's
checks in the module's order and takes each try-lock through the op as it goes
(:meth:`Op.lock_pamt`, :meth:`Op.lock_entry`, :meth:`Op.lock_busy`). A failed try or check raises
:class:`LeafFail`; the framework then releases every lock the op took (nothing was modified:
check-before-modify) and the op is finished with that status. Otherwise the handler returns its
effect closure, the locks stay held and :meth:`Op.complete` applies it (or :meth:`Op.abort` drops
it). SPEC §3.1, §4.4, §5; tdx-facts §2.3 "Locks".

Every failed try logs ``lock_conflict`` with the resource key (``("pamt", pfn)``,
``("entry", tdr, gpa, level)``, ``("sept_tree", tdr)``, ``("td_epoch", tdr)``,
``("op_state", tdr)``, ``("kot",)``, ``("wbcache", pkg)``), the holder (actor of the first op
holding it; for a guest refused by the host-priority bit, the host actor that set it) and the
contender. The module keeps ``tdx.holders``: resource key -> ops holding it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from tdxcore.constants import EXIT_REASON_TDCALL, MODEL_MAXPHYADDR, PAGE_SHIFT, TDCS_NR_PAGES, PageType
from tdxcore.errors import TdxValueError
from tdxcore.module.td import TdLifecycle
from tdxcore.module.tdx_module import SeamcallResult, result
from tdxcore.status import (  # type: ignore[attr-defined]
    OP_STATE_LEGALITY,
    OPERAND_ID_RCX,
    OPERAND_ID_TDR,
    TDX_LIFECYCLE_STATE_INCORRECT,
    TDX_OP_STATE_INCORRECT,
    TDX_OPERAND_ADDR_RANGE_ERROR,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
    TDX_OPERAND_INVALID,
    TDX_PAGE_METADATA_INCORRECT,
    TDX_SUCCESS,
    TDX_TD_KEYS_NOT_CONFIGURED,
    TDX_TDCS_NOT_ALLOCATED,
    TdcallLeaf,
)

if TYPE_CHECKING:
    from tdxcore._busylock import BusyLock
    from tdxcore.module.td import Td
    from tdxcore.module.tdx_module import TdxModule

__all__ = ["Op", "LeafFail", "Effect", "decode_gpa_level"]

Effect = Callable[[], SeamcallResult]
#: leaf number -> its ``seamcall_state_lookup`` row of OP_STATE_LEGALITY (indexed by op state).
_LEGALITY: Dict[int, Any] = {leaf: row for (table, leaf), row in OP_STATE_LEGALITY.items()
                             if table == "seamcall_state_lookup"}
_LOW32 = 0xFFFFFFFF
_STATUS_MASK = 0xFFFFFFFF00000000


def _entry_unlock(tree: Any, gpa_level: Tuple[int, int]) -> None:
    """Release an S-EPT entry lock :meth:`Op.lock_entry` took."""
    try:
        tree.entry_unlock(gpa_level[0], gpa_level[1])
    except TdxValueError:
        pass        # the entry's table went away with its FREE entries (SEPT.REMOVE)


class LeafFail(Exception):
    """Raised inside a begin handler: the leaf ends now with ``res`` (no effect)."""

    def __init__(self, res: SeamcallResult) -> None:
        super().__init__(str(res.status))
        self.res = res


def fail(status: int, rcx: int = 0, rdx: int = 0, r8: int = 0) -> "LeafFail":
    """Build a :class:`LeafFail` for ``status`` (raise it)."""
    return LeafFail(result(status, rcx, rdx, r8))


def decode_gpa_level(rcx: int) -> Tuple[int, int]:
    """Decode a GPA|level operand (bits 2:0 level, 11:3 and 63:52 reserved-0; tdx-facts §2.1)."""
    if rcx & 0xFF8 or rcx >> 52 or (rcx & 7) > 4:
        raise fail(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    return rcx & ~0xFFF, rcx & 7


class Op:
    """One SEAMCALL (or the guest's TDCALL) between begin and complete.

    Attributes
    ----------
    acquired : bool
        True while the op holds its locks and its effect is pending.
    result : SeamcallResult or None
        Set once finished (at begin for a failure/BUSY, at complete otherwise).
    in_guest : bool
        VP.ENTER only: the vCPU entered the guest (:meth:`enter`) and has not exited yet.
    """

    __slots__ = ("tdx", "id", "leaf", "regs", "cpu", "actor", "acquired", "result", "in_guest", "gfn", "pfn",
                 "_effect", "_held", "_enter", "_exit", "leaf_space")

    def __init__(self, tdx: "TdxModule", leaf: Any, regs: Tuple[int, ...], cpu: int, actor: str) -> None:
        self.tdx = tdx
        tdx._op_seq += 1                # tdx._next_op_id(), inline
        self.id = tdx._op_seq
        self.leaf = leaf
        #: ``"tdcall"`` for the guest's TDCALL, else ``"seamcall"`` (the leaf never changes).
        self.leaf_space = "tdcall" if isinstance(leaf, TdcallLeaf) else "seamcall"
        self.regs = regs
        self.cpu = cpu
        self.actor = actor
        self.acquired = False
        self.result: Optional[SeamcallResult] = None
        self.in_guest = False
        self.gfn: Optional[int] = None
        self.pfn: Optional[int] = None
        self._effect: Optional[Effect] = None
        # (key, release, a, b): ``release()``, or ``release(a, b)`` when ``a`` is not None
        self._held: List[Tuple[Any, Callable[..., None], Any, Any]] = []
        # VP.ENTER phases, set by the vp handler
        self._enter: Optional[Callable[[], None]] = None
        self._exit: Optional[Callable[..., SeamcallResult]] = None

    @property
    def rcx(self) -> int:
        """Input RCX."""
        return self.regs[0]

    @property
    def rdx(self) -> int:
        """Input RDX."""
        return self.regs[1]

    @property
    def r8(self) -> int:
        """Input R8."""
        return self.regs[2]

    @property
    def r9(self) -> int:
        """Input R9."""
        return self.regs[3]

    @property
    def finished(self) -> bool:
        """Whether the op has its result."""
        return self.result is not None

    # ------------------------------------------------------------------ try-locks
    def _take(self, key: Tuple[Any, ...], status: int, release: Callable[[], None]) -> None:
        tdx = self.tdx
        if status == TDX_SUCCESS:
            self._held.append((key, release, None, None))
            hs = tdx.holders.get(key)
            if hs is None:
                tdx.holders[key] = [self]
            else:
                hs.append(self)
            return
        holders = tdx.holders.get(key)
        if holders:
            holder: Optional[str] = holders[0].actor
        elif (status & _STATUS_MASK) == TDX_OPERAND_BUSY_HOST_PRIORITY:
            holder = tdx.priority_requester.get(key)
        else:
            holder = None
        if (status & _STATUS_MASK) != TDX_OPERAND_BUSY_HOST_PRIORITY and key[0] == "entry" \
                and self.leaf_space == "seamcall":
            tdx.priority_requester[key] = self.actor      # the host lost: it now has priority
        tdx.host.count("nr_lock_conflicts")
        # lock_conflict's leaf field is in the SEAMCALL space: a guest (TDCALL) contender logs None
        leaf = int(self.leaf) if self.leaf_space == "seamcall" else None
        tdx.host.events.emit("lock_conflict", self.actor, key, status & _LOW32, holder, self.actor,
                             leaf, self.gfn, self.pfn)
        raise LeafFail(result(status))

    def _hold(self, key: Tuple[Any, ...], unlock: Callable[..., Any], a: Any, b: Any) -> None:
        """Record a taken hot lock (_take's success branch) with ``unlock(a, b)`` as data, no closure."""
        self._held.append((key, unlock, a, b))
        hs = self.tdx.holders.get(key)
        if hs is None:
            self.tdx.holders[key] = [self]
        else:
            hs.append(self)

    def lock_pamt(self, pfn: int, exclusive: bool, operand: int) -> None:
        """PAMT entry try-lock of ``pfn`` (TDR locks, page locks); BUSY|operand on failure."""
        pamt = self.tdx.host.pamt
        key = ("pamt", pfn)
        st = pamt.try_lock(pfn, exclusive, operand)
        if st == TDX_SUCCESS:
            self._hold(key, pamt.unlock, pfn, exclusive)
            return
        self._take(key, st, lambda: pamt.unlock(pfn, exclusive))

    def lock_busy(self, key: Tuple[Any, ...], lock: "BusyLock", exclusive: bool, host: bool = True) -> None:
        """Try a BusyLock (op state, S-EPT tree, TD epoch, KOT, WBCACHE); BUSY|lock.operand on failure."""
        if exclusive:
            st, rel = lock.try_exclusive(host), lock.unlock_exclusive
        else:
            st, rel = lock.try_shared(host), lock.unlock_shared
        self._take(key, st, rel)

    def lock_entry(self, td: "Td", gpa: int, level: int, host: bool = True,
                   tolerate_walk: bool = False) -> bool:
        """Take the S-EPT entry lock exclusively (``host=False`` for the guest).

        A walk/operand failure of the entry fails the leaf with the core's extended info (RCX
        entry, RDX level_state), or with ``tolerate_walk`` returns False holding nothing (the
        guest's ACCEPT: a missing entry is the core's EPT-violation outcome).
        """
        tree = td.sept
        assert tree is not None
        st = tree.entry_try_lock(gpa, level, host)
        busy = (TDX_OPERAND_BUSY, TDX_OPERAND_BUSY_HOST_PRIORITY)
        if st != TDX_SUCCESS and (st & _STATUS_MASK) not in busy:
            if tolerate_walk:
                return False
            w = tree.walk(gpa, level) if (st & _STATUS_MASK) != TDX_OPERAND_INVALID else (st, 0, 0)
            raise fail(st, w[1], w[2])

        key = ("entry", td.tdr, gpa, level)
        if st == TDX_SUCCESS:
            self._hold(key, _entry_unlock, tree, (gpa, level))
        else:
            self._take(key, st, lambda: _entry_unlock(tree, (gpa, level)))
        if host:
            self.tdx.priority_requester.pop(key, None)
        return True

    def release(self, key: Tuple[Any, ...]) -> None:
        """Release one held lock by resource key (VP.ENTER drops its entry-phase locks)."""
        for i, (k, rel, a, b) in enumerate(self._held):
            if k == key:
                del self._held[i]
                if a is None:
                    rel()
                else:
                    rel(a, b)
                self._drop_holder(k)
                return

    def _drop_holder(self, key: Tuple[Any, ...]) -> None:
        holders = self.tdx.holders
        hs = holders.get(key)
        if hs is not None:
            if len(hs) == 1 and hs[0] is self:      # the common case: the only holder
                del holders[key]
                return
            if self in hs:
                hs.remove(self)
            if not hs:
                del holders[key]

    def _release_all(self) -> None:
        held = self._held
        while held:
            k, rel, a, b = held.pop()
            if a is None:
                rel()
            else:
                rel(a, b)
            self._drop_holder(k)

    # ------------------------------------------------------------------ operand helpers
    def pa(self, value: int, operand: int) -> int:
        """Decode a 4K-aligned host PA operand without KeyID bits into a pfn.

        Failures: ``OPERAND_INVALID|operand`` (alignment, KeyID bits) or
        ``OPERAND_ADDR_RANGE_ERROR|operand`` (outside host memory / the TDMRs).
        """
        if value & 0xFFF or value >> MODEL_MAXPHYADDR:
            raise fail(TDX_OPERAND_INVALID | operand)
        pfn = value >> PAGE_SHIFT
        if pfn >= self.tdx.host.nr_frames or not self.tdx.in_tdmr(pfn):
            raise fail(TDX_OPERAND_ADDR_RANGE_ERROR | operand)
        return pfn

    def explicit_tdr(self, value: int, operand: int, exclusive: bool) -> "Td":
        """Run the explicit-TDR check.

        PA -> PAMT lock of the TDR frame -> PT_TDR, else ``PAGE_METADATA_INCORRECT|operand``
        (tdx-facts §2.3 "Other rules").
        """
        pfn = self.pa(value, operand)
        self.lock_pamt(pfn, exclusive, operand)
        td = self.tdx.tds.get(pfn)
        if td is None or self.tdx.host.pamt.page_type(pfn) != PageType.PT_TDR:
            raise fail(TDX_PAGE_METADATA_INCORRECT | operand)
        return td

    def implicit_tdr(self, td: "Td", exclusive: bool = False) -> None:
        """Lock a TD's TDR found through another operand (BUSY|TDR on failure)."""
        self.lock_pamt(td.tdr, exclusive, OPERAND_ID_TDR)

    def keys_configured(self, td: "Td") -> None:
        """TD-scope lifecycle gate.

        KEYS_CONFIGURED, else TD_KEYS_NOT_CONFIGURED (HKID_ASSIGNED) or
        LIFECYCLE_STATE_INCORRECT (BLOCKED, TEARDOWN).
        """
        if td.lifecycle == TdLifecycle.HKID_ASSIGNED:
            raise fail(TDX_TD_KEYS_NOT_CONFIGURED)
        if td.lifecycle != TdLifecycle.KEYS_CONFIGURED:
            raise fail(TDX_LIFECYCLE_STATE_INCORRECT)

    def tdcs(self, td: "Td") -> None:
        """Every TDCS page added, else TDX_TDCS_NOT_ALLOCATED."""
        if len(td.tdcs) < TDCS_NR_PAGES:
            raise fail(TDX_TDCS_NOT_ALLOCATED)

    def td_scope(self, value: int, operand: int, tdr_exclusive: bool,
                 ops_exclusive: bool = False) -> "Td":
        """Prologue of the TD-scope runtime leaves.

        Explicit TDR, keys configured, TDCS, the op-state lock (shared, or exclusive for
        leaves that change the op state) and the leaf's op-state legality.
        """
        td = self.explicit_tdr(value, operand, tdr_exclusive)
        self.keys_configured(td)
        self.tdcs(td)
        self.lock_busy(("op_state", td.tdr), td.op_state_lock, ops_exclusive)
        self.op_state_check(td)
        return td

    def new_page(self, value: int, operand: int) -> int:
        """Lock a page the leaf assigns: PA -> PAMT-X lock -> PT_NDA, else PAGE_METADATA_INCORRECT."""
        pfn = self.pa(value, operand)
        self.lock_pamt(pfn, True, operand)
        if self.tdx.host.pamt.page_type(pfn) != PageType.PT_NDA:
            raise fail(TDX_PAGE_METADATA_INCORRECT | operand)
        return pfn

    def op_state_check(self, td: "Td") -> None:
        """Check the leaf's op-state legality (``seamcall_state_lookup``) -> TDX_OP_STATE_INCORRECT."""
        row = _LEGALITY.get(self.leaf)
        if row is not None and not row[td.op_state]:
            raise fail(TDX_OP_STATE_INCORRECT)

    # ------------------------------------------------------------------ completion
    def _finish(self, res: SeamcallResult) -> SeamcallResult:
        self.result = res
        self.acquired = False
        self.tdx.inflight.pop(self.id, None)
        self.tdx._emit_end_op(self, res)
        return res

    def complete(self) -> SeamcallResult:
        """Apply the effect, release every lock, log the end edge and return the result.

        A finished op just returns its result. VP.ENTER: enters the guest if needed, then exits
        with ``EXIT_REASON_TDCALL`` (see :meth:`exit`).
        """
        if self.result is not None:
            return self.result
        if self._exit is not None:
            if not self.in_guest:
                self.enter()
            return self.exit(EXIT_REASON_TDCALL)
        with self.tdx.lock:
            assert self._effect is not None
            try:
                res = self._effect()
            finally:
                self._release_all()
            return self._finish(res)

    def abort(self) -> Optional[SeamcallResult]:
        """Release every lock without the effect (logs ``seamcall_abort`` / ``tdcall_abort``).

        Returns the result (no-op) when already finished, else None.

        Raises
        ------
        TdxValueError
            A VP.ENTER op whose vCPU is in the guest (end it with :meth:`exit`).
        """
        if self.result is not None:
            return self.result
        if self.in_guest:
            msg = f"op {self.id}: the vCPU is in the guest; end the guest phase with exit()"
            raise TdxValueError(msg, name="op", value=self.id)
        with self.tdx.lock:
            self._release_all()
            self.acquired = False
            self.tdx.inflight.pop(self.id, None)
            kind = "seamcall_abort" if self.leaf_space == "seamcall" else "tdcall_abort"
            self.tdx.host.events.emit(kind, self.actor, int(self.leaf), self.cpu, self.id)
            return None

    # ------------------------------------------------------------------ VP.ENTER phases
    def enter(self) -> None:
        """Finish VP.ENTER's entry phase: the vCPU is then in the guest.

        Samples TD_EPOCH, takes the epoch reference and drops the entry-phase locks; the vCPU
        keeps holding its TDVPR until :meth:`exit`.
        """
        if self._enter is None or self.result is not None or self.in_guest:
            msg = f"op {self.id}: enter() needs an acquired VP.ENTER op not yet in the guest"
            raise TdxValueError(msg, name="op", value=self.id)
        with self.tdx.lock:
            self._enter()
            self.in_guest = True

    def exit(self, reason: int, *, gpa: int = 0, rip: Optional[int] = None, level: int = 0,
             qualification: int = 0, injected_event: bool = False) -> SeamcallResult:
        """VP.ENTER: end the guest phase with a TD exit and return VP.ENTER's result.

        Parameters
        ----------
        reason : int
            VMX basic exit reason (e.g. ``EXIT_REASON_EPT_VIOLATION`` = 48).
        gpa, level, qualification : int
            Reported for EPT violations: R8 = GPA, RCX = exit qualification, RDX = level.
        rip : int, optional
            Guest RIP of the exit (zero-step counts EPT violations at one RIP; R9 reports it).
        injected_event : bool
            An event was injected / the guest progressed: resets the zero-step count.

        Returns
        -------
        SeamcallResult
            ``TDX_SUCCESS | reason``; RCX qualification, RDX level, R8 GPA, R9 RIP.
        """
        if self._exit is None or not self.in_guest:
            msg = f"op {self.id}: exit() needs a VP.ENTER op whose vCPU is in the guest"
            raise TdxValueError(msg, name="op", value=self.id)
        with self.tdx.lock:
            res = self._exit(reason, gpa, rip, level, qualification, injected_event)
            self.in_guest = False
            self._release_all()
            return self._finish(res)

    def __repr__(self) -> str:
        st = "in_guest" if self.in_guest else ("acquired" if self.acquired else f"done {self.result}")
        return f"Op(#{self.id} {getattr(self.leaf, 'name', self.leaf)} by {self.actor!r}: {st})"


Handlers = Dict[Any, Callable[["TdxModule", Op], Any]]
