"""The guest CPU's private-GPA translation: what a load or store of the TD finds in its S-EPT.

When a TD vCPU touches a private GPA the CPU walks the S-EPT the module owns (SPEC §2 "one private
page fault"): a MAPPED (or write-blocked, for a load) 4K leaf gives the frame and the TD's HKID;
a PENDING leaf is the "access before accept" case — a #VE into the guest, or with
``SEPT_VE_DISABLE`` an EPT-violation TD exit the host sees as PENDING (tdx-facts §3.3); anything
else (no leaf, FREE, BLOCKED, a missing table) is an EPT-violation TD exit.

The model has no TLB: a BLOCKED leaf faults at once, even for a vCPU that entered before the
BLOCK (the real CPU could still hit a stale translation until the TD exits; the epoch protocol
exists so the host never relies on that).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple, Optional

from tdxcore.constants import LEVEL_STATE_STATE_SHIFT, PAGE_SHIFT, PAGE_SIZE, SEPT_PFN_MASK
from tdxcore.errors import TdxValueError, check_int
from tdxcore.status import SEPT_PUBLIC_STATE, TDX_SUCCESS, SeptState  # type: ignore[attr-defined]

if TYPE_CHECKING:
    from tdxcore.module.tdx_module import TdxModule

__all__ = ["Access", "Translation", "guest_translate"]


class Access(enum.IntEnum):
    """Outcome of a guest access to a private GPA."""

    OK = 0              #: mapped: ``pfn`` and ``keyid`` are valid
    EPT_VIOLATION = 1   #: no usable leaf: TD exit (EXIT_REASON_EPT_VIOLATION)
    PENDING = 2         #: an AUGed leaf the guest has not accepted: #VE, or a TD exit


class Translation(NamedTuple):
    """What the CPU found for one access."""

    access: Access
    pfn: Optional[int]
    keyid: Optional[int]


# level_state carries the public state value (SEPT_PUBLIC_STATE), not the 7-bit encoding
_MAPPED = SEPT_PUBLIC_STATE[int(SeptState["MAPPED"])]
_BLOCKEDW = SEPT_PUBLIC_STATE[int(SeptState["BLOCKEDW"])]
_PENDING = (SEPT_PUBLIC_STATE[int(SeptState["PENDING"])],)
_MISS = Translation(Access.EPT_VIOLATION, None, None)
_PENDING_T = Translation(Access.PENDING, None, None)
_ACCESS_OK = Access.OK
_new_tuple = tuple.__new__         # Translation(...) without the NamedTuple's Python __new__


def guest_translate(tdx: "TdxModule", tdvpr: int, gpa: int, write: bool) -> Translation:
    """Walk the S-EPT of the TD that ``tdvpr`` belongs to for a 4K access at private ``gpa``.

    Parameters
    ----------
    tdvpr : int
        The accessing vCPU's TDVPR frame (it must belong to a TD with an S-EPT).
    gpa : int
        Private GPA (the shared bit clear).
    write : bool
        A store (a BLOCKEDW leaf refuses it; a load goes through).
    """
    p = tdvpr if type(tdvpr) is int and 0 <= tdvpr < tdx.host.nr_frames else \
        check_int("tdvpr", tdvpr, 0, tdx.host.nr_frames)
    tdr = tdx.vcpu_tdr.get(p)
    if tdr is None:
        msg = f"tdvpr={p:#x} is not a vCPU of any TD"
        raise TdxValueError(msg, name="tdvpr", value=tdvpr)
    td = tdx.tds[tdr]
    if td.sept is None:
        return _MISS
    st, entry, ls = td.sept.walk(gpa & ~(PAGE_SIZE - 1), 0)
    if st != TDX_SUCCESS:
        return _MISS
    state = (ls >> LEVEL_STATE_STATE_SHIFT) & 0xFF
    if state == _MAPPED or (state == _BLOCKEDW and not write):
        return _new_tuple(Translation, (_ACCESS_OK, (entry & SEPT_PFN_MASK) >> PAGE_SHIFT, td.hkid))
    if state in _PENDING:
        return _PENDING_T
    return _MISS
