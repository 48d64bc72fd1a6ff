"""Plain-Python twin of ``tdxcore._busylock`` (differential tests only; STYLE §2.7).

The lock is three plain fields — an exclusive flag, a shared-holder count and the host-priority
flag — and the word is derived from them. Single-threaded.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from tdxcore.constants import BUSYLOCK_EXCL_BIT, BUSYLOCK_HOST_PRIORITY_BIT, BUSYLOCK_SHARED_MASK
from tdxcore.errors import TdxTypeError, TdxValueError, check_int
from tdxcore.status import STATUS_CODES

__all__ = ["BusyLock"]

TDX_SUCCESS: int = STATUS_CODES["TDX_SUCCESS"]
TDX_OPERAND_BUSY: int = STATUS_CODES["TDX_OPERAND_BUSY"]
TDX_OPERAND_BUSY_HOST_PRIORITY: int = STATUS_CODES["TDX_OPERAND_BUSY_HOST_PRIORITY"]


def _bool(name: str, value: Any) -> bool:
    if value is not True and value is not False:
        msg = f"{name}={value!r} must be a bool (type={type(value).__name__})"
        raise TdxTypeError(msg, name=name, value=value)
    return bool(value)


class BusyLock:
    """Twin of the core class: same methods, arguments, statuses and exceptions."""

    def __init__(self, operand_id: int) -> None:
        self.operand = check_int("operand_id", operand_id, 0, 1 << 32)
        self._exclusive = False
        self._nr_shared = 0
        self._host_priority = False

    def try_shared(self, host: bool = True) -> int:
        """Shared try: refused for a guest under host priority, or while held exclusively."""
        host = _bool("host", host)
        if not host and self._host_priority:
            return TDX_OPERAND_BUSY_HOST_PRIORITY | self.operand
        if self._exclusive or self._nr_shared == BUSYLOCK_SHARED_MASK:
            return TDX_OPERAND_BUSY | self.operand
        self._nr_shared += 1
        return TDX_SUCCESS

    def try_exclusive(self, host: bool = True) -> int:
        """Exclusive try: a host loser asks for priority; a host winner clears the request."""
        host = _bool("host", host)
        if not host and self._host_priority:
            return TDX_OPERAND_BUSY_HOST_PRIORITY | self.operand
        if not self._exclusive and self._nr_shared == 0:
            self._exclusive = True
            if host:
                self._host_priority = False
            return TDX_SUCCESS
        if host:
            self._host_priority = True
        return TDX_OPERAND_BUSY | self.operand

    def unlock_shared(self) -> None:
        """Drop one shared hold; an error if there is none."""
        if self._nr_shared == 0:
            msg = (f"unlock_shared: lock (operand {self.operand:#x}) has no shared holder "
                   f"(word={self.word:#x})")
            raise TdxValueError(msg, name="lock", value=self.word)
        self._nr_shared -= 1

    def unlock_exclusive(self) -> None:
        """Drop the exclusive hold; the host-priority request stays."""
        if not self._exclusive:
            msg = (f"unlock_exclusive: lock (operand {self.operand:#x}) is not held exclusively "
                   f"(word={self.word:#x})")
            raise TdxValueError(msg, name="lock", value=self.word)
        self._exclusive = False

    def clear_host_priority(self) -> None:
        """Forget the host-priority request."""
        self._host_priority = False

    @property
    def word(self) -> int:
        """The word the three fields encode."""
        assert not (self._exclusive and self._nr_shared)
        return ((BUSYLOCK_EXCL_BIT if self._exclusive else 0)
                | (BUSYLOCK_HOST_PRIORITY_BIT if self._host_priority else 0)
                | self._nr_shared)

    @property
    def is_locked(self) -> bool:
        """Held in any mode."""
        return self._exclusive or self._nr_shared > 0

    @property
    def is_exclusive(self) -> bool:
        """Held exclusively."""
        return self._exclusive

    @property
    def nr_shared(self) -> int:
        """Shared holders."""
        return self._nr_shared

    @property
    def host_priority(self) -> bool:
        """Host-priority request pending."""
        return self._host_priority

    def state_hash(self) -> int:
        """blake2b-64 of struct '<QQ' (operand, word), read little-endian."""
        data = struct.pack("<QQ", self.operand, self.word)
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
