"""Guest programs (SPEC §3.3): immutable guest ops that ``vcpu.run()`` executes.

A guest program is a list or iterator of these ops. Only the ops the model executes today are
defined: :func:`read` and :func:`write` of a private page that is already mapped (an initial page
added by KVM_TDX_INIT_MEM_REGION), and :func:`hlt`. Faults, #VE, shared pages and TDVMCALLs (the
other ops SPEC §3.3 lists) arrive with later issues, together with their constructors.

This is a base module (STYLE §2.1): it imports only the standard library and
:mod:`tdxcore.errors` (itself stdlib-only, base layer) for the STYLE §2.3 exception types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from tdxcore.errors import TdxTypeError, TdxValueError

__all__ = ["Read", "Write", "Hlt", "GuestOp", "read", "write", "hlt", "SIZES"]

#: Access sizes a guest load/store may have (bytes).
SIZES = (1, 2, 4, 8)
_U64 = 1 << 64


def _int(name: str, value: object, lo: int, hi: int) -> int:
    # ints only (bool refused), lo <= value < hi, as errors.check_int
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{name}={value!r} must be an int, not {type(value).__name__}"
        raise TdxTypeError(msg, name=name, value=value)
    if not lo <= value < hi:
        msg = f"{name}={value:#x} is out of range [{lo:#x}, {hi:#x})"
        raise TdxValueError(msg, name=name, value=value)
    return value


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


GuestOp = Union[Read, Write, Hlt]


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
