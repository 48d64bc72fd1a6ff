"""The tdxcore exception tree (STYLE §2.3) and the argument checks every layer uses.

``TdxError`` is the root. Python misuse raises :class:`TdxTypeError` / :class:`TdxValueError`
(also ``TypeError`` / ``ValueError``) naming the argument, the rule and the value, before any
state changes. Failed ioctls raise :class:`KvmError` (also ``OSError``, with the kernel's errno).
A broken model invariant raises :class:`InvariantViolation` (also ``AssertionError``).
SEAMCALL statuses are data and never raise.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "TdxError",
    "TdxTypeError",
    "TdxValueError",
    "KvmError",
    "HostError",
    "InvariantViolation",
    "check_int",
]


class TdxError(Exception):
    """Root of every exception tdxcore raises on purpose."""


class TdxTypeError(TdxError, TypeError):
    """An argument has the wrong Python type; ``.name`` and ``.value`` say which."""

    def __init__(self, msg: str, *, name: Optional[str] = None, value: Any = None) -> None:
        super().__init__(msg)
        self.name = name
        self.value = value


class TdxValueError(TdxError, ValueError):
    """An argument is out of range or breaks a rule; ``.name`` and ``.value`` say which."""

    def __init__(self, msg: str, *, name: Optional[str] = None, value: Any = None) -> None:
        super().__init__(msg)
        self.name = name
        self.value = value


class KvmError(TdxError, OSError):
    """A KVM ioctl failed: ``.errno`` is the kernel's errno, ``.hw_error`` the module status."""

    def __init__(self, errno: int, msg: str, *, hw_error: int = 0) -> None:
        OSError.__init__(self, errno, msg)
        self.hw_error = hw_error


class InvariantViolation(TdxError, AssertionError):
    """A model invariant broke: names the invariant id, the frame/gfn, the event and a replay."""

    def __init__(
        self,
        invariant: str,
        msg: str,
        *,
        gfn: Optional[int] = None,
        pfn: Optional[int] = None,
        event_index: Optional[int] = None,
        replay: Optional[str] = None,
    ) -> None:
        parts = [f"{invariant}: {msg}"]
        if gfn is not None:
            parts.append(f"gfn={gfn:#x}")
        if pfn is not None:
            parts.append(f"pfn={pfn:#x}")
        if event_index is not None:
            parts.append(f"event={event_index}")
        if replay:
            parts.append(f"replay: {replay}")
        super().__init__("; ".join(parts))
        self.invariant = invariant
        self.gfn = gfn
        self.pfn = pfn
        self.event_index = event_index
        self.replay = replay


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """Return ``value`` if it is an int in ``[lo, hi)``, else raise naming ``name``.

    Parameters
    ----------
    name : str
        The argument's name, used in the message.
    value : Any
        What the caller passed. ``bool`` is rejected (it is an ``int`` only by accident).
    lo, hi : int
        The half-open accepted range.

    Raises
    ------
    TdxTypeError
        ``value`` is not an ``int`` (numpy integers are accepted through ``__index__``).
    TdxValueError
        ``value`` is outside ``[lo, hi)``.
    """
    if type(value) is int and lo <= value < hi:     # the hot case: a plain int in range
        return value
    if isinstance(value, bool):
        msg = f"{name}={value!r} must be an int, not bool"
        raise TdxTypeError(msg, name=name, value=value)
    try:
        v = value.__index__()
    except (AttributeError, TypeError):
        msg = f"{name}={value!r} must be an int (type={type(value).__name__})"
        raise TdxTypeError(msg, name=name, value=value) from None
    if not lo <= v < hi:
        msg = f"{name}={v:#x} is out of range [{lo:#x}, {hi:#x})"
        raise TdxValueError(msg, name=name, value=v)
    return v


class HostError(TdxError, OSError):
    """A host-level (kernel) operation of the model failed: ``.errno`` is the kernel's errno.

    Raised by ``tdx.Host`` (out of memory → ``ENOMEM``, a bad user address → ``EFAULT``, refusing
    to offline a CPU → ``EBUSY``, no KeyID left → ``ENOSPC``) and by ``host.tdx.enable()``
    (``ENODEV``, ``EINVAL``, ``EIO`` ... as ``tdx_enable()`` returns them).
    """

    def __init__(self, errno: int, msg: str) -> None:
        OSError.__init__(self, errno, msg)


def check_u64_array(name: str, value: Any, hi: int = 1 << 64) -> Any:
    """Return ``value`` as a contiguous 1-D ``numpy.uint64`` array with every element in ``[0, hi)``.

    The one check every batch entry point (cores and twins) applies to its array arguments.

    Parameters
    ----------
    name : str
        The argument's name, used in the message.
    value : array_like
        A 1-D array-like of integers (any integer dtype).
    hi : int
        Exclusive upper bound of the elements (``MAX_GFN`` for gfns).

    Raises
    ------
    TdxTypeError
        The array is not of an integer dtype (float, bool, object, ...).
    TdxValueError
        It is not 1-D, or an element is negative or ``>= hi`` (the first such index is named).
    """
    import numpy as np

    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        msg = f"{name} must be an integer array (dtype={arr.dtype})"
        raise TdxTypeError(msg, name=name, value=arr.dtype)
    if arr.ndim != 1:
        msg = f"{name} must be 1-D (ndim={arr.ndim})"
        raise TdxValueError(msg, name=name, value=arr.ndim)
    if arr.size:
        bad = arr < 0 if arr.dtype.kind == "i" else None
        if hi < (1 << 64):
            over = arr.astype(np.uint64, copy=False) >= np.uint64(hi) if arr.dtype.kind == "u" else arr >= hi
            bad = over if bad is None else (bad | over)
        if bad is not None and bad.any():
            i = int(np.argmax(bad))
            v = int(arr[i])
            msg = f"{name}[{i}]={v:#x} is out of range [0x0, {hi:#x})"
            raise TdxValueError(msg, name=name, value=v)
    return np.ascontiguousarray(arr, dtype=np.uint64)
