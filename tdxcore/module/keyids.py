"""The host's KeyID partition: MKTME KeyIDs, the global TDX KeyID and the guest HKID pool.

tdx-facts §5.1: the partition MSR gives ``nr_mktme`` and ``nr_tdx``; TDX KeyIDs start at
``nr_mktme + 1``; the first is the module's **global KeyID**, the rest are guest HKIDs allocated
lowest-first (the kernel's IDA). KeyID 0 is the TME/host key.
"""

from __future__ import annotations

import errno as _errno
import struct
from typing import Any, Dict, Tuple

from tdxcore.errors import HostError, TdxValueError, check_int

__all__ = ["KeyIdPartition"]


class KeyIdPartition:
    """KeyID partition and the guest-HKID allocator (``host.keyids``).

    Parameters
    ----------
    mktme_keyids, tdx_keyids : int
        Partition sizes (``IA32_MKTME_KEYID_PARTITIONING`` bits 31:0 and 63:32).

    Notes
    -----
    Mirrors ``tdx_guest_keyid_alloc()``/``tdx_guest_keyid_free()`` (``ida_alloc_range`` over
    ``[global + 1, global + nr_tdx - 1]``; exhausted → ``-ENOSPC``) and 6.16's
    ``nr_configured_hkid`` (``note_configured``/``note_unconfigured``, which the TD code calls
    after TDH.MNG.KEY.CONFIG succeeds and when the HKID is released; CPU offline reads it).
    ``tdx_keyids`` < 2 is accepted here so that bring-up's detect can refuse it (tdx-facts §6.2).
    """

    def __init__(self, mktme_keyids: int, tdx_keyids: int) -> None:
        self.mktme_keyids = check_int("mktme_keyids", mktme_keyids, 0, 1 << 15)
        self.tdx_keyids = check_int("tdx_keyids", tdx_keyids, 0, 1 << 15)
        self._allocated: Dict[int, None] = {}
        self._configured: Dict[int, None] = {}

    # The partition ----------------------------------------------------------------------
    @property
    def nr_keyids(self) -> int:
        """All KeyIDs including KeyID 0: ``1 + mktme_keyids + tdx_keyids``."""
        return 1 + self.mktme_keyids + self.tdx_keyids

    @property
    def global_keyid(self) -> int:
        """The first TDX KeyID (``mktme_keyids + 1``): the module's global private KeyID."""
        return self.mktme_keyids + 1

    @property
    def guest_range(self) -> Tuple[int, int]:
        """Half-open range ``[start, end)`` of guest HKIDs (empty when ``tdx_keyids`` < 2)."""
        start = self.global_keyid + 1
        return (start, max(start, self.global_keyid + self.tdx_keyids))

    @property
    def nr_guest_keyids(self) -> int:
        """How many guest HKIDs exist (the misc-cgroup ``MISC_CG_RES_TDX`` capacity)."""
        lo, hi = self.guest_range
        return hi - lo

    def is_private(self, keyid: int) -> bool:
        """Return whether ``keyid`` is a TDX private KeyID (global or guest)."""
        return self.global_keyid <= keyid < self.global_keyid + self.tdx_keyids

    def check_keyid(self, name: str, keyid: Any) -> int:
        """Validate ``keyid`` as any KeyID of this host (0 .. nr_keyids-1) and return it."""
        return check_int(name, keyid, 0, self.nr_keyids)

    # Guest HKIDs ------------------------------------------------------------------------
    def alloc(self) -> int:
        """Allocate the lowest free guest HKID.

        Raises
        ------
        HostError
            ``ENOSPC`` when every guest HKID is in use (as ``ida_alloc_range``).
        """
        lo, hi = self.guest_range
        for k in range(lo, hi):
            if k not in self._allocated:
                self._allocated[k] = None
                return k
        msg = f"no guest HKID left: all {hi - lo} TDX guest KeyIDs are in use"
        raise HostError(_errno.ENOSPC, msg)

    def free(self, hkid: int) -> None:
        """Return ``hkid`` to the pool; ``TdxValueError`` if it is not allocated or still configured."""
        k = check_int("hkid", hkid, 0, self.nr_keyids)
        if k not in self._allocated:
            msg = f"hkid={k} is not an allocated guest HKID"
            raise TdxValueError(msg, name="hkid", value=k)
        if k in self._configured:
            msg = f"hkid={k} is still configured (note_unconfigured it first)"
            raise TdxValueError(msg, name="hkid", value=k)
        del self._allocated[k]

    @property
    def allocated(self) -> Tuple[int, ...]:
        """Allocated guest HKIDs, ascending."""
        return tuple(sorted(self._allocated))

    @property
    def nr_free(self) -> int:
        """Guest HKIDs still free."""
        return self.nr_guest_keyids - len(self._allocated)

    # Configured HKIDs (CPU-hotplug rule) -----------------------------------------------
    def note_configured(self, hkid: int) -> None:
        """Record that ``hkid`` is programmed on the packages (``nr_configured_hkid++``)."""
        k = check_int("hkid", hkid, 0, self.nr_keyids)
        if k not in self._allocated:
            msg = f"hkid={k} is not an allocated guest HKID"
            raise TdxValueError(msg, name="hkid", value=k)
        if k in self._configured:
            msg = f"hkid={k} is already configured"
            raise TdxValueError(msg, name="hkid", value=k)
        self._configured[k] = None

    def note_unconfigured(self, hkid: int) -> None:
        """Record that ``hkid`` was released (``nr_configured_hkid--``)."""
        k = check_int("hkid", hkid, 0, self.nr_keyids)
        if k not in self._configured:
            msg = f"hkid={k} is not configured"
            raise TdxValueError(msg, name="hkid", value=k)
        del self._configured[k]

    @property
    def nr_configured(self) -> int:
        """How many HKIDs are configured now (6.16 ``nr_configured_hkid``)."""
        return len(self._configured)

    def state_bytes(self) -> bytes:
        """Canonical serialization: ``<HHH`` sizes, then allocated and configured HKIDs ascending."""
        a, c = sorted(self._allocated), sorted(self._configured)
        return struct.pack(f"<HHHH{len(a)}HH{len(c)}H", self.mktme_keyids, self.tdx_keyids,
                           0, len(a), *a, len(c), *c)

    def __repr__(self) -> str:
        return (f"KeyIdPartition(mktme={self.mktme_keyids}, tdx={self.tdx_keyids}, "
                f"global={self.global_keyid}, allocated={self.allocated}, "
                f"nr_configured={self.nr_configured})")
