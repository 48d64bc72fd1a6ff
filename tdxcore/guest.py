"""Guest programs (SPEC §3.3): immutable guest ops that ``vcpu.run()`` executes.

A guest program is a list or iterator of these ops. Memory ops (:data:`MEMORY_OPS`: :func:`read`,
:func:`write`, :func:`accept`) are executed by the vCPU run loop; every other op is a TDVMCALL
(``TDG.VP.VMCALL``) that KVM dispatches in :mod:`tdxcore.kvm.exits` by the GHCI register
convention: R10 = 0 for the standard leaves (R11 = leaf, R12.. = arguments), R10 != 0 for a KVM
hypercall (R10 = nr). :func:`hlt` is the Instruction.HLT leaf.

The constructors check Python types and bound each value to the width of the register it
travels in (u64; u32 where the instruction defines a 32-bit operand: MSR index, CPUID leaf and
subleaf). They deliberately accept values KVM rejects (an IO size of 5, a vector below 32, an
unaligned MapGPA, a private GetQuote buffer): a guest can issue those, and KVM answers with a
TDVMCALL status (SPEC §3.3; tdx-facts §9.3-§9.5). :func:`tdvmcall` builds any raw TDVMCALL.

This is a base module (STYLE §2.1): it imports only the standard library and
:mod:`tdxcore.errors` (itself stdlib-only, base layer) for the STYLE §2.3 exception types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

from tdxcore.errors import TdxTypeError, TdxValueError

__all__ = ["Read", "Write", "Hlt", "Accept", "MapGpa", "GetQuote", "ReportFatalError", "GetTdvmcallInfo",
           "SetupEventNotify", "Io", "Mmio", "MsrRead", "MsrWrite", "Cpuid", "Tdvmcall", "GuestOp", "OPS",
           "MEMORY_OPS", "TDVMCALL_REGS", "read", "write", "hlt", "accept", "map_gpa", "get_quote",
           "report_fatal_error", "get_tdvmcall_info", "setup_event_notify", "io", "mmio", "msr_read",
           "msr_write", "cpuid", "tdvmcall", "SIZES"]

#: Access sizes a guest load/store may have (bytes).
SIZES = (1, 2, 4, 8)
_U64 = 1 << 64
_U32 = 1 << 32
#: Module S-EPT levels an ACCEPT may name (``TdxLevel``: 0 = 4K ... 4 = 256T; SPEC §3.1, §7).
_MAX_LEVEL = 4
#: Registers a raw :func:`tdvmcall` may set besides R11 (the leaf). RCX is not among them: it is
#: the TDCALL's GPR-exposure mask, which the model's guest always sets as Linux's
#: ``TDVMCALL_EXPOSE_REGS_MASK`` (RDX, RBX, RSI, RDI, R8-R15).
TDVMCALL_REGS = ("r8", "r9", "r10", "r12", "r13", "r14", "r15", "rbx", "rdi", "rdx", "rsi")


def _int(name: str, value: object, lo: int, hi: int) -> int:
    # ints only (bool refused), lo <= value < hi, as errors.check_int
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{name}={value!r} must be an int, not {type(value).__name__}"
        raise TdxTypeError(msg, name=name, value=value)
    if not lo <= value < hi:
        msg = f"{name}={value:#x} is out of range [{lo:#x}, {hi:#x})"
        raise TdxValueError(msg, name=name, value=value)
    return int(value)       # an IntEnum member is stored as its plain value


def _size(size: object, gpa: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        msg = f"size={size!r} must be an int, not {type(size).__name__}"
        raise TdxTypeError(msg, name="size", value=size)
    if size not in SIZES:
        msg = f"size={size} must be one of {SIZES}"
        raise TdxValueError(msg, name="size", value=size)
    if (gpa & 0xFFF) + size > 0x1000:
        msg = f"gpa={gpa:#x} size={size} crosses a 4 KiB page"
        raise TdxValueError(msg, name="gpa", value=gpa)
    return size


@dataclass(frozen=True)
class Read:
    """A guest load of ``size`` bytes (little-endian) at ``gpa``; the value lands in ``guest_log``."""

    gpa: int
    size: int = 8


@dataclass(frozen=True)
class Write:
    """A guest store of ``value`` (``size`` bytes, little-endian) at ``gpa``."""

    gpa: int
    value: int
    size: int = 8


@dataclass(frozen=True)
class Hlt:
    """``hlt``: the TD asks to halt (a TDVMCALL HLT exit; KVM_RUN returns with ExitReason.HLT)."""


@dataclass(frozen=True)
class Accept:
    """``TDG.MEM.PAGE.ACCEPT`` of the page at ``gpa`` at module level ``level`` (0 = 4K)."""

    gpa: int
    level: int = 0


@dataclass(frozen=True)
class MapGpa:
    """TDVMCALL<MapGPA> (0x10001): convert ``[gpa, gpa + size)`` to shared or private.

    The guest passes R12 = ``gpa`` with the VM's shared bit set iff ``shared`` (the bit is the
    target state), R13 = ``size``.
    """

    gpa: int
    size: int
    shared: bool


@dataclass(frozen=True)
class GetQuote:
    """TDVMCALL<GetQuote> (0x10002): R12 = buffer GPA (as given: the shared alias), R13 = size."""

    gpa: int
    size: int


@dataclass(frozen=True)
class ReportFatalError:
    """TDVMCALL<ReportFatalError> (0x10003): R12 = error code, R13 = 0 (no message GPA)."""

    code: int


@dataclass(frozen=True)
class GetTdvmcallInfo:
    """TDVMCALL<GetTdVmCallInfo> (0x10000): R12 = the info leaf."""

    leaf: int


@dataclass(frozen=True)
class SetupEventNotify:
    """TDVMCALL<SetupEventNotifyInterrupt> (0x10004): R12 = vector."""

    vector: int


@dataclass(frozen=True)
class Io:
    """TDVMCALL<Instruction.IO> (30): R12 = size, R13 = direction (1 = OUT), R14 = port, R15 = value."""

    port: int
    size: int
    write: int
    value: int = 0


@dataclass(frozen=True)
class Mmio:
    """TDVMCALL<#VE.RequestMMIO> (48): R12 = size, R13 = direction (1 = write), R14 = gpa, R15 = value.

    Also what the guest's default #VE handler issues for a load/store to a shared GPA that no
    memslot backs (the access is replaced by this op at the same RIP).
    """

    gpa: int
    size: int
    write: int
    value: int = 0


@dataclass(frozen=True)
class MsrRead:
    """TDVMCALL<Instruction.RDMSR> (31): R12 = MSR index; the value comes back in R11."""

    index: int


@dataclass(frozen=True)
class MsrWrite:
    """TDVMCALL<Instruction.WRMSR> (32): R12 = MSR index, R13 = value."""

    index: int
    value: int


@dataclass(frozen=True)
class Cpuid:
    """TDVMCALL<Instruction.CPUID> (10): R12 = leaf (EAX), R13 = subleaf (ECX); R12-R15 come back."""

    leaf: int
    subleaf: int = 0


@dataclass(frozen=True)
class Tdvmcall:
    """A raw TDVMCALL: R11 = ``leaf``, the other registers from ``regs`` (unnamed ones are 0).

    ``regs`` is a tuple of ``(name, value)`` pairs sorted by name (hashable, order-free). With
    ``r10`` non-zero it is a KVM hypercall (nr = R10, arguments R11-R14).
    """

    leaf: int
    regs: Tuple[Tuple[str, int], ...] = ()


GuestOp = Union[Read, Write, Hlt, Accept, MapGpa, GetQuote, ReportFatalError, GetTdvmcallInfo,
                SetupEventNotify, Io, Mmio, MsrRead, MsrWrite, Cpuid, Tdvmcall]
#: Every guest op class.
OPS = (Read, Write, Hlt, Accept, MapGpa, GetQuote, ReportFatalError, GetTdvmcallInfo, SetupEventNotify,
       Io, Mmio, MsrRead, MsrWrite, Cpuid, Tdvmcall)
#: The ops the vCPU run loop executes itself (loads, stores, TDCALL ACCEPT); the others are TDVMCALLs.
MEMORY_OPS = (Read, Write, Accept)


def read(gpa: int, size: int = 8) -> Read:
    """Return a :class:`Read` op.

    Parameters
    ----------
    gpa : int
        u64 guest physical address; the access may not cross a 4 KiB page.
    size : int
        1, 2, 4 or 8.

    Raises
    ------
    TdxTypeError, TdxValueError
        A non-int argument, an out-of-range value, a bad size, a page-crossing access.
    """
    g = _int("gpa", gpa, 0, _U64)
    return Read(g, _size(size, g))


def write(gpa: int, value: int, size: int = 8) -> Write:
    """Return a :class:`Write` op storing ``value`` (must fit ``size`` bytes); see :func:`read`."""
    g = _int("gpa", gpa, 0, _U64)
    s = _size(size, g)
    return Write(g, _int("value", value, 0, 1 << (8 * s)), s)


def hlt() -> Hlt:
    """Return the :class:`Hlt` op."""
    return Hlt()


def _u64(name: str, value: object) -> int:
    return _int(name, value, 0, _U64)


def _flag(name: str, value: object) -> int:
    # a direction: a bool, or any u64 (KVM itself answers INVALID_OPERAND for values above 1)
    if isinstance(value, bool):
        return int(value)
    return _u64(name, value)


def accept(gpa: int, level: int = 0) -> Accept:
    """Return an :class:`Accept` op (``TDG.MEM.PAGE.ACCEPT``).

    Parameters
    ----------
    gpa : int
        u64 guest physical address of the page.
    level : int
        Module level (``TdxLevel``: 0 = 4K, 1 = 2M, ... 4); an ``IntEnum`` member is stored as int.

    Raises
    ------
    TdxTypeError, TdxValueError
        A non-int argument, ``gpa`` outside u64, ``level`` outside 0..4.
    """
    return Accept(_u64("gpa", gpa), int(_int("level", level, 0, _MAX_LEVEL + 1)))


def map_gpa(gpa: int, size: int, shared: bool) -> MapGpa:
    """Return a :class:`MapGpa` op; ``gpa`` and ``size`` are u64 (alignment is KVM's to check).

    Raises
    ------
    TdxTypeError, TdxValueError
        Non-int ``gpa``/``size`` or out of u64; ``shared`` not a bool.
    """
    if not isinstance(shared, bool):
        msg = f"shared={shared!r} must be a bool"
        raise TdxTypeError(msg, name="shared", value=shared)
    return MapGpa(_u64("gpa", gpa), _u64("size", size), shared)


def get_quote(gpa: int, size: int) -> GetQuote:
    """Return a :class:`GetQuote` op (u64 each; a private ``gpa`` is KVM's to refuse)."""
    return GetQuote(_u64("gpa", gpa), _u64("size", size))


def report_fatal_error(code: int) -> ReportFatalError:
    """Return a :class:`ReportFatalError` op; ``code`` is u64 (GHCI: bit 63 = message in shared memory)."""
    return ReportFatalError(_u64("code", code))


def get_tdvmcall_info(leaf: int) -> GetTdvmcallInfo:
    """Return a :class:`GetTdvmcallInfo` op; ``leaf`` is u64 (KVM answers 0 and 1 only)."""
    return GetTdvmcallInfo(_u64("leaf", leaf))


def setup_event_notify(vector: int) -> SetupEventNotify:
    """Return a :class:`SetupEventNotify` op; ``vector`` is u64 (KVM accepts 32..255 only)."""
    return SetupEventNotify(_u64("vector", vector))


def io(port: int, size: int, write: Union[bool, int], value: int = 0) -> Io:
    """Return an :class:`Io` op (port I/O through TDVMCALL).

    Parameters
    ----------
    port, size, value : int
        u64 each (R14, R12, R15): KVM uses the low 16 bits of ``port`` and refuses sizes other
        than 1, 2, 4; an OUT sends the low ``size`` bytes of ``value``.
    write : bool or int
        Direction (R13): True/1 = OUT, False/0 = IN; any other u64 is passed on (KVM refuses it).

    Raises
    ------
    TdxTypeError, TdxValueError
        A non-int argument or a value outside u64.
    """
    return Io(_u64("port", port), _u64("size", size), _flag("write", write), _u64("value", value))


def mmio(gpa: int, size: int, write: Union[bool, int], value: int = 0) -> Mmio:
    """Return an :class:`Mmio` op (``#VE.RequestMMIO``); u64 each, as :func:`io` (KVM: sizes 1-8, shared)."""
    return Mmio(_u64("gpa", gpa), _u64("size", size), _flag("write", write), _u64("value", value))


def msr_read(index: int) -> MsrRead:
    """Return an :class:`MsrRead` op; ``index`` is u32 (RDMSR's ECX)."""
    return MsrRead(_int("index", index, 0, _U32))


def msr_write(index: int, value: int) -> MsrWrite:
    """Return an :class:`MsrWrite` op; ``index`` u32 (ECX), ``value`` u64 (EDX:EAX)."""
    return MsrWrite(_int("index", index, 0, _U32), _u64("value", value))


def cpuid(leaf: int, subleaf: int = 0) -> Cpuid:
    """Return a :class:`Cpuid` op; ``leaf`` (EAX) and ``subleaf`` (ECX) are u32."""
    return Cpuid(_int("leaf", leaf, 0, _U32), _int("subleaf", subleaf, 0, _U32))


def tdvmcall(leaf: int, **regs: int) -> Tdvmcall:
    """Return a raw :class:`Tdvmcall`: R11 = ``leaf``, any of :data:`TDVMCALL_REGS` as keywords.

    Parameters
    ----------
    leaf : int
        u64 R11 (the GHCI sub-function when R10 = 0; the first argument of a KVM hypercall).
    **regs : int
        u64 register values by lower-case name, e.g. ``r10=0, r12=0x1000``; unnamed ones are 0.

    Raises
    ------
    TdxTypeError, TdxValueError
        A non-int value, a value outside u64, or an unknown register name (``r11`` is ``leaf``,
        ``rcx`` is the exposure mask, ``rax``/``rsp``/``rbp`` never reach the VMM).

    Examples
    --------
    >>> tdvmcall(0x10010, r12=1)
    Tdvmcall(leaf=65552, regs=(('r12', 1),))
    """
    lf = _u64("leaf", leaf)
    for name in regs:
        if name not in TDVMCALL_REGS:
            msg = f"{name}= is not a TDVMCALL register (one of {', '.join(TDVMCALL_REGS)}; r11 is leaf)"
            raise TdxValueError(msg, name=name, value=regs[name])
    return Tdvmcall(lf, tuple(sorted((k, _u64(k, v)) for k, v in regs.items())))
