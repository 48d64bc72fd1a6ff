"""``KvmRun``: the model's ``struct kvm_run`` (SPEC §3.3).

One per vCPU, reused across ``run()`` calls. Every payload of the kernel's union always exists as
an attribute; a new exit overwrites only ``exit_reason``, ``ret`` and its own payload, so the
other payloads keep stale values, as the real shared page does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

from tdxcore.constants import ExitReason

__all__ = ["KvmRun", "GuestEvent", "VeInfo", "Interrupt", "MemoryFault", "Hypercall", "TdxExit", "GetQuote",
           "GetTdvmcallInfo", "SetupEventNotify", "SystemEvent", "Io", "Mmio"]


@dataclass(frozen=True)
class GuestEvent:
    """One completed guest op as the guest saw it (``vcpu.guest_log``).

    A frozen dataclass rather than a NamedTuple: SPEC §3.3 names a field ``index``, which would
    shadow ``tuple.index``.
    """

    index: int
    op: object
    status: Optional[int]
    r11: int
    outputs: Tuple[int, ...]
    value: Optional[int]
    ve: Optional[object]


class VeInfo(NamedTuple):
    """A #VE the guest took during an op (``GuestEvent.ve``): exit reason, GPA, and why.

    ``kind`` is ``"pending"`` (an unaccepted private page; the default handler accepted it) or
    ``"mmio"`` (a shared GPA with no memslot; the handler asked by TDVMCALL<MMIO>).
    """

    exit_reason: int
    gpa: int
    kind: str


class Interrupt(NamedTuple):
    """``GuestEvent.op`` of a delivered ``vcpu.queue_interrupt(vector)`` (not a program op)."""

    vector: int


class _Payload:
    __slots__: Tuple[str, ...] = ()

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({body})"


class MemoryFault(_Payload):
    """``memory_fault``: flags (``KVM_MEMORY_EXIT_FLAG_PRIVATE``), gpa, size."""

    __slots__ = ("flags", "gpa", "size")

    def __init__(self) -> None:
        self.flags = 0
        self.gpa = 0
        self.size = 0


class Hypercall(_Payload):
    """``hypercall``: nr, args (6-tuple), ret, flags."""

    __slots__ = ("nr", "args", "ret", "flags")

    def __init__(self) -> None:
        self.nr = 0
        self.args: Tuple[int, ...] = (0,) * 6
        self.ret = 0
        self.flags = 0


class GetQuote(_Payload):
    """``tdx.get_quote``: ret, gpa, size."""

    __slots__ = ("ret", "gpa", "size")

    def __init__(self) -> None:
        self.ret = 0
        self.gpa = 0
        self.size = 0


class GetTdvmcallInfo(_Payload):
    """``tdx.get_tdvmcall_info``: ret, leaf, r11, r12, r13, r14."""

    __slots__ = ("ret", "leaf", "r11", "r12", "r13", "r14")

    def __init__(self) -> None:
        self.ret = 0
        self.leaf = 0
        self.r11 = 0
        self.r12 = 0
        self.r13 = 0
        self.r14 = 0


class SetupEventNotify(_Payload):
    """``tdx.setup_event_notify``: ret, vector."""

    __slots__ = ("ret", "vector")

    def __init__(self) -> None:
        self.ret = 0
        self.vector = 0


class TdxExit(_Payload):
    """``tdx``: flags, nr and the three sub-payloads (themselves a union in the kernel)."""

    __slots__ = ("flags", "nr", "get_quote", "get_tdvmcall_info", "setup_event_notify")

    def __init__(self) -> None:
        self.flags = 0
        self.nr = 0
        self.get_quote = GetQuote()
        self.get_tdvmcall_info = GetTdvmcallInfo()
        self.setup_event_notify = SetupEventNotify()


class SystemEvent(_Payload):
    """``system_event``: type, ndata, data (tuple)."""

    __slots__ = ("type", "ndata", "data")

    def __init__(self) -> None:
        self.type = 0
        self.ndata = 0
        self.data: Tuple[int, ...] = ()


class Io(_Payload):
    """``io``: direction, size, port, count, data (bytes)."""

    __slots__ = ("direction", "size", "port", "count", "data")

    def __init__(self) -> None:
        self.direction = 0
        self.size = 0
        self.port = 0
        self.count = 0
        self.data = b""


class Mmio(_Payload):
    """``mmio``: phys_addr, data (8 bytes), len, is_write."""

    __slots__ = ("phys_addr", "data", "len", "is_write")

    def __init__(self) -> None:
        self.phys_addr = 0
        self.data = bytes(8)
        self.len = 0
        self.is_write = False


class KvmRun:
    """The vCPU's ``struct kvm_run`` (SPEC §3.3).

    Attributes
    ----------
    exit_reason : ExitReason
        Why KVM_RUN returned (``UNKNOWN`` before the first run).
    ret : int
        KVM_RUN's own return value, signed: 0, ``-EFAULT`` (MEMORY_FAULT) or ``-EINTR``.
    memory_fault, hypercall, tdx, system_event, io, mmio
        The payloads; only the one matching ``exit_reason`` is current.
    """

    __slots__ = ("exit_reason", "ret", "memory_fault", "hypercall", "tdx", "system_event", "io", "mmio")

    def __init__(self) -> None:
        self.exit_reason = ExitReason.UNKNOWN
        self.ret = 0
        self.memory_fault = MemoryFault()
        self.hypercall = Hypercall()
        self.tdx = TdxExit()
        self.system_event = SystemEvent()
        self.io = Io()
        self.mmio = Mmio()

    def __repr__(self) -> str:
        return f"KvmRun(exit_reason={self.exit_reason.name}, ret={self.ret})"
