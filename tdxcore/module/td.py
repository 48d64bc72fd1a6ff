"""Per-TD module state: TDR/TDCS, TD_PARAMS, vCPUs (TDVPR/TDCX), the TD epoch and zero-step.

One :class:`Td` per live TDR frame (``host.tdx.tds[tdr_pfn]``), created by TDH.MNG.CREATE and
dropped when TDH.PHYMEM.PAGE.RECLAIM returns the TDR to PT_NDA. The epoch protocol (tdx-facts
§3.4) and the zero-step detector (§3.8, SPEC §4.4) are small enough to live here rather than in
separate files:

* **Epoch.** ``epoch`` starts at :data:`~tdxcore.constants.TD_EPOCH_INITIAL` (1) at MNG.INIT;
  VP.ENTER samples it and increments ``refcount[epoch & 1]`` while the vCPU is in the guest;
  TD exit decrements it. TRACK fails ``PREVIOUS_TLB_EPOCH_BUSY`` while
  ``refcount[(epoch - 1) & 1] != 0`` (:meth:`Td.track_busy`), else ``epoch += 1``.
* **Zero-step.** :meth:`Vcpu.note_exit` counts consecutive EPT-violation exits at the same guest
  RIP; at :data:`~tdxcore.constants.ZERO_STEP_THRESHOLD` (6) the vCPU is *suspected* and its
  next VP.ENTER takes the S-EPT tree lock exclusively for the entry. Any other exit (guest
  progress), a different RIP, or an injected event resets the count and the suspicion.

Locks (all try-locks): the TDR lock is the PAMT entry lock of the TDR frame; page locks are
PAMT entry locks; ``op_state_lock``, ``sept_lock`` and ``epoch_lock`` are BusyLocks in the TDCS.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set

from tdxcore._busylock import BusyLock
from tdxcore.constants import EXIT_REASON_EPT_VIOLATION, TD_EPOCH_INITIAL, ZERO_STEP_THRESHOLD, TdAttr
from tdxcore.status import (  # type: ignore[attr-defined]
    OP_STATE_TLB_TRACKING_REQUIRED,
    OPERAND_ID_OP_STATE,
    OPERAND_ID_SEPT_TREE,
    OPERAND_ID_TD_EPOCH,
    OpState,
)

if TYPE_CHECKING:
    from tdxcore._sept import SeptTree

__all__ = ["TdLifecycle", "TdParams", "Vcpu", "Td", "BuiltTd", "BuildError", "build_td", "add_sept_path"]


class TdLifecycle(enum.IntEnum):
    """TDR lifecycle (module ``td_lifecycle_state_t``; tdx-facts §5.2)."""

    HKID_ASSIGNED = 0
    KEYS_CONFIGURED = 1
    BLOCKED = 2
    TEARDOWN = 3


@dataclass(frozen=True)
class TdParams:
    """The TD_PARAMS fields TDH.MNG.INIT validates (model-level object; tdx-facts §5.3).

    The host stores it at a 1024-aligned PA with ``host.tdx.write_td_params(pa, params)``; MNG.INIT
    reads it from RDX (an unwritten PA is ``OPERAND_INVALID|RDX``). ``eptp_levels`` 4 or 5 stands for
    EPTP_CONTROLS' page-walk length (GPAW 48 / 52); ``tsc_frequency`` is in 25 MHz units.
    """

    attributes: int = int(TdAttr.SEPT_VE_DISABLE)
    xfam: int = 0x3
    max_vcpus: int = 8
    eptp_levels: int = 4
    tsc_frequency: int = 100


class Vcpu:
    """One TD vCPU: its TDVPR frame, TDCX frames, association and guest-phase state."""

    def __init__(self, tdvpr: int, tdr: int) -> None:
        self.tdvpr = tdvpr
        self.tdr = tdr
        self.tdcx: List[int] = []
        self.initialized = False
        self.x2apic_id: Optional[int] = None
        self.initial_rcx = 0
        self.associated_cpu: Optional[int] = None
        self.in_guest = False
        self.epoch: Optional[int] = None          # TD_EPOCH sampled by the current entry
        self.actor: Optional[str] = None          # who entered (for lock_conflict holders)
        self.ept_rip: Optional[int] = None
        self.ept_count = 0
        self.zero_step = False

    def note_exit(self, reason: int, rip: Optional[int], injected_event: bool = False) -> None:
        """Zero-step accounting for one TD exit (module's EPT-violation RIP tracking)."""
        if injected_event or reason != EXIT_REASON_EPT_VIOLATION or rip is None:
            self.ept_rip, self.ept_count, self.zero_step = None, 0, False
            return
        if rip == self.ept_rip:
            self.ept_count += 1
        else:
            self.ept_rip, self.ept_count, self.zero_step = rip, 1, False
        if self.ept_count >= ZERO_STEP_THRESHOLD:
            self.zero_step = True

    def state_bytes(self) -> bytes:
        """Canonical serialization of the vCPU."""
        return struct.pack(f"<QQB q q B B q q q B H{len(self.tdcx)}Q", self.tdvpr, self.tdr,
                           int(self.initialized),
                           -1 if self.x2apic_id is None else self.x2apic_id, self.initial_rcx,
                           int(self.in_guest), int(self.zero_step),
                           -1 if self.associated_cpu is None else self.associated_cpu,
                           -1 if self.epoch is None else self.epoch,
                           -1 if self.ept_rip is None else self.ept_rip & ((1 << 63) - 1), self.ept_count,
                           len(self.tdcx), *self.tdcx)


class Td:
    """Module state of one TD (TDR + TDCS)."""

    def __init__(self, tdr: int, hkid: int) -> None:
        self.tdr = tdr
        self.hkid = hkid
        self.lifecycle = TdLifecycle.HKID_ASSIGNED
        self.pkg_configured: Set[int] = set()
        self.fatal = False
        self.tdcs: List[int] = []
        self.op_state = OpState.UNINITIALIZED
        self.params: Optional[TdParams] = None
        self.sept: Optional["SeptTree"] = None
        self.vcpus: Dict[int, Vcpu] = {}
        self.num_assoc = 0
        self.epoch = 0
        self.refcount = [0, 0]
        self._mrtd = hashlib.sha384()
        self.mrtd: Optional[bytes] = None          # frozen by MR.FINALIZE
        self.op_state_lock = BusyLock(OPERAND_ID_OP_STATE)
        self.sept_lock = BusyLock(OPERAND_ID_SEPT_TREE)
        self.epoch_lock = BusyLock(OPERAND_ID_TD_EPOCH)

    # epoch protocol ----------------------------------------------------------------------
    def init_epoch(self) -> None:
        """MNG.INIT: TD_EPOCH := TD_EPOCH_INITIAL, REFCOUNT := 0, 0."""
        self.epoch = TD_EPOCH_INITIAL
        self.refcount = [0, 0]

    @property
    def refcount_prev(self) -> int:
        """REFCOUNT of the previous epoch's parity (what TRACK and the tracked predicate read)."""
        return self.refcount[(self.epoch - 1) & 1]

    def track_busy(self) -> bool:
        """TRACK's check: a vCPU that entered in epoch-1 is still in the guest."""
        return self.refcount_prev != 0

    @property
    def tracking_required(self) -> bool:
        """``opf_tlb_tracking_required`` of the current op state."""
        return OP_STATE_TLB_TRACKING_REQUIRED.get(int(self.op_state), False)

    # measurement -------------------------------------------------------------------------
    def measure(self, tag: bytes, data: bytes) -> None:
        """Extend the (open) MRTD with ``tag || data`` (model of the module's SHA-384 MRTD)."""
        self._mrtd.update(struct.pack("<H", len(tag)) + tag + data)

    def mrtd_now(self) -> bytes:
        """Return the current MRTD digest (frozen value after MR.FINALIZE)."""
        return self.mrtd if self.mrtd is not None else self._mrtd.digest()

    def state_bytes(self) -> bytes:
        """Canonical serialization of the TD (vCPUs sorted by TDVPR; S-EPT tree via state_hash)."""
        p = self.params
        pk = sorted(self.pkg_configured)
        parts = [struct.pack(f"<QQBBBH{len(pk)}H", self.tdr, self.hkid, int(self.lifecycle), int(self.fatal),
                             int(self.op_state), len(pk), *pk),
                 struct.pack(f"<H{len(self.tdcs)}Q", len(self.tdcs), *self.tdcs),
                 struct.pack("<QQQQ", self.num_assoc, self.epoch, *self.refcount),
                 self.mrtd_now(),
                 b"" if p is None else struct.pack("<QQQQQ", p.attributes, p.xfam, p.max_vcpus, p.eptp_levels,
                                                    p.tsc_frequency),
                 struct.pack("<Q", 0 if self.sept is None else self.sept.state_hash())]
        for k in sorted(self.vcpus):
            parts.append(self.vcpus[k].state_bytes())
        return b"".join(parts)

    def __repr__(self) -> str:
        return (f"Td(tdr={self.tdr:#x}, hkid={self.hkid}, {self.lifecycle.name}, {self.op_state.name}, "
                f"vcpus={len(self.vcpus)}, epoch={self.epoch}, refcount={self.refcount})")


@dataclass
class BuiltTd:
    """Frames of a TD built by :func:`build_td` (all pfns)."""

    tdr: int
    hkid: int
    tdcs: List[int]
    vcpus: List[int]                      # TDVPR frames
    tdcx: Dict[int, List[int]]            # TDVPR -> TDCX frames
    td_params_pa: int


class BuildError(Exception):
    """A SEAMCALL of :func:`build_td` did not return TDX_SUCCESS (the message names it)."""


def build_td(host: Any, *, vcpus: int = 1, params: Optional[TdParams] = None, finalize: bool = True,
             actor: str = "host") -> BuiltTd:
    """Build a TD through the module API, as KVM's INIT_VM/INIT_VCPU/FINALIZE do.

    MNG.CREATE (HKID from ``host.keyids.alloc()``) → MNG.KEY.CONFIG on the first online CPU of
    each package → MNG.ADDCX × TDCS_NR_PAGES → MNG.INIT → per vCPU VP.CREATE, VP.ADDCX ×
    (TDVPS_NR_PAGES − 1), VP.INIT (x2APIC id = index) → MR.FINALIZE if ``finalize``. Every frame
    comes from ``host.alloc_frame()``; the TD_PARAMS sit in one more frame.

    Raises
    ------
    BuildError
        A call returned a status other than TDX_SUCCESS.
    """
    from tdxcore.constants import PAGE_SHIFT, TDCS_NR_PAGES, TDVPS_NR_PAGES
    from tdxcore.status import TDX_SUCCESS  # type: ignore[attr-defined]

    t = host.tdx

    def ok(what: str, res: Any) -> None:
        if res.status != TDX_SUCCESS:
            msg = f"{what}: {res.status}"
            raise BuildError(msg)

    hkid = host.keyids.alloc()
    tdr = host.alloc_frame()
    ok("MNG.CREATE", t.tdh_mng_create(tdr, hkid, actor=actor))
    for pkg in range(host.nr_packages):
        ok("MNG.KEY.CONFIG", t.tdh_mng_key_config(tdr, cpu=host.first_online_cpu(pkg), actor=actor))
    tdcs = [host.alloc_frame() for _ in range(TDCS_NR_PAGES)]
    for p in tdcs:
        ok("MNG.ADDCX", t.tdh_mng_addcx(tdr, p, actor=actor))
    pp = host.alloc_frame()
    t.write_td_params(pp << PAGE_SHIFT, params if params is not None else TdParams(max_vcpus=max(1, vcpus)))
    ok("MNG.INIT", t.tdh_mng_init(tdr, pp << PAGE_SHIFT, actor=actor))
    built = BuiltTd(tdr, hkid, tdcs, [], {}, pp << PAGE_SHIFT)
    for i in range(vcpus):
        v = host.alloc_frame()
        ok("VP.CREATE", t.tdh_vp_create(tdr, v, actor=actor))
        cx = [host.alloc_frame() for _ in range(TDVPS_NR_PAGES - 1)]
        for p in cx:
            ok("VP.ADDCX", t.tdh_vp_addcx(v, p, actor=actor))
        ok("VP.INIT", t.tdh_vp_init(v, 0, i, actor=actor))
        built.vcpus.append(v)
        built.tdcx[v] = cx
    if finalize:
        ok("MR.FINALIZE", t.tdh_mr_finalize(tdr, actor=actor))
    return built


def add_sept_path(host: Any, tdr: int, gpa: int, level: int = 1, *, actor: str = "host") -> List[int]:
    """TDH.MEM.SEPT.ADD every missing non-leaf entry above ``gpa`` from the top down to ``level``.

    Returns the S-EPT frames added (frames for levels already present go back to the host).

    Raises
    ------
    BuildError
        SEPT.ADD failed with anything but EPT_ENTRY_STATE_INCORRECT (an entry already present).
    """
    from tdxcore.status import TDX_EPT_ENTRY_STATE_INCORRECT, TDX_SUCCESS  # type: ignore[attr-defined]

    t = host.tdx
    tree = t.td(tdr).sept
    added: List[int] = []
    for lv in range(tree.levels - 1, level - 1, -1):
        page = host.alloc_frame()
        aligned = gpa & ~((1 << (12 + 9 * lv)) - 1)
        res = t.tdh_mem_sept_add(tdr, aligned, lv, page, actor=actor)
        if res.status == TDX_SUCCESS:
            added.append(page)
            continue
        host.free_frame(page)
        if res.status.base != TDX_EPT_ENTRY_STATE_INCORRECT:
            msg = f"MEM.SEPT.ADD gpa={aligned:#x} level={lv}: {res.status}"
            raise BuildError(msg)
    return added
