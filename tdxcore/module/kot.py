"""The module's Key Ownership Table (KOT): one entry per KeyID, one KOT try-lock.

Entry states follow the module's ``kot_entry_state`` (tdx-facts §5.2): FREE, ASSIGNED (TDH.MNG.CREATE),
FLUSHED (TDH.MNG.VPFLUSHDONE; the per-package ``wbinvd_bitmap`` is set to every package) and back to
FREE (TDH.MNG.KEY.FREEID once TDH.PHYMEM.CACHE.WB cleared every package's bit). RESERVED marks the
global KeyID and every non-TDX KeyID; the module never hands them to a TD.
"""

from __future__ import annotations

import enum
import struct
from typing import Dict, List, Tuple

from tdxcore._busylock import BusyLock
from tdxcore.status import OPERAND_ID_KOT  # type: ignore[attr-defined]

__all__ = ["KotState", "Kot"]


class KotState(enum.IntEnum):
    """KOT entry state (module ``KOT_STATE_*``)."""

    FREE = 0
    ASSIGNED = 1
    FLUSHED = 2
    RESERVED = 3


class Kot:
    """Key Ownership Table of ``nr_keyids`` entries; ``guest_range`` is ``[lo, hi)`` of TD HKIDs.

    Notes
    -----
    ``lock`` is the KOT BusyLock: exclusive for MNG.CREATE / VPFLUSHDONE / KEY.FREEID, shared for
    PHYMEM.CACHE.WB (tdx-facts §2.3). Mutated only by those leaves' effects under ``tdx.lock``.
    """

    def __init__(self, nr_keyids: int, guest_range: Tuple[int, int]) -> None:
        self.guest_range = guest_range
        self.state: List[KotState] = [KotState.RESERVED] * nr_keyids
        for k in range(*guest_range):
            self.state[k] = KotState.FREE
        self.wbinvd_bitmap: Dict[int, int] = {}      # hkid -> package bitmap (FLUSHED entries)
        self.lock = BusyLock(OPERAND_ID_KOT)

    def flushed(self) -> Tuple[int, ...]:
        """HKIDs in FLUSHED state, ascending."""
        return tuple(k for k, s in enumerate(self.state) if s == KotState.FLUSHED)

    def state_bytes(self) -> bytes:
        """Canonical serialization: state bytes, then ``<QQ hkid, bitmap`` sorted by hkid."""
        parts = [bytes(int(s) for s in self.state)]
        for k in sorted(self.wbinvd_bitmap):
            parts.append(struct.pack("<QQ", k, self.wbinvd_bitmap[k]))
        return b"".join(parts)

    def __repr__(self) -> str:
        used = {k: s.name for k, s in enumerate(self.state) if s in (KotState.ASSIGNED, KotState.FLUSHED)}
        return f"Kot(in_use={used})"
