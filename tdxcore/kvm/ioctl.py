"""The one boundary where a kernel ``-errno`` becomes :class:`~tdxcore.errors.KvmError` (STYLE §2.3).

Functions in ``kvm/`` that mirror a kernel helper return a :data:`Ret`: ``(0, "")`` on success, or
``(-errno, check)`` where ``check`` names the rule that failed, in words (``"guest_phys_addr
0xc0000001 is not page aligned"``). Only :func:`ioctl` and :func:`fd_call` look at it: they drive
the operation's generator to completion (SPEC §5: the synchronous API runs the same generators
as the storm), log an ``ioctl`` event, and raise ``KvmError(errno, "<IOCTL>: <check>")`` for a
negative return. A non-negative return (a new fd, a capability value) is passed through.
"""

from __future__ import annotations

import errno as _errno
from typing import Any, Generator, List, Optional, Tuple

from tdxcore.errors import KvmError
from tdxcore.sched import run_to_completion

__all__ = ["Ret", "OK", "fail", "ebadf", "ioctl", "fd_call", "IOCTL_EVENT"]

#: ``(ret, check)``: ``ret`` >= 0 is the ioctl's return value, < 0 a kernel ``-errno``.
Ret = Tuple[int, str]
#: The plain success.
OK: Ret = (0, "")
#: Event kind logged for every ioctl: the ioctl's name, the VM's id (None for a system ioctl) and
#: the positive errno (0 on success).
IOCTL_EVENT = ("ioctl", ("name", "vm", "errno"))


#: The KVM layer's other event kinds: name → fields (after kind, actor).
KVM_EVENT_KINDS = (
    ("vm_bug", ("reason",)),                                   # KVM_BUG_ON: bugged and dead
    ("vm_dead", ("reason",)),                                  # kvm_vm_dead
    ("set_memory_attributes", ("start", "end", "attributes")),  # the store of a real change
    ("fault", ("gpa", "private", "seq", "result")),            # one kvm_mmu_page_fault attempt
    ("memory_fault_exit", ("gpa", "flags", "size")),           # KVM_EXIT_MEMORY_FAULT
    ("guest_ve", ("gpa", "kind")),                             # a #VE delivered to the guest
    ("guest_event", ("vector",)),                              # a queued interrupt delivered
    ("invalidate_begin", ("start", "end", "in_progress")),      # mmu_invalidate begin + range_add
    ("invalidate_end", ("start", "end", "seq")),               # mmu_invalidate end (after it)
    ("kick", ("vcpus_in_guest",)),                             # KVM_REQ_OUTSIDE_GUEST_MODE to all
)


def register_kvm_events(host: Any) -> None:
    """Declare the KVM layer's event kinds in ``host.events`` (idempotent)."""
    ev = host.events
    if IOCTL_EVENT[0] not in ev.kinds:
        ev.register_kind(*IOCTL_EVENT)
    for kind, fields in KVM_EVENT_KINDS:
        if kind not in ev.kinds:
            ev.register_kind(kind, fields)


def fail(err: int, check: str) -> Ret:
    """Return ``(-err, check)``: the failing rule in upstream's words, as data."""
    return -err, check


def _log(host: Any, name: str, vm_id: Any, err: int) -> None:
    ev = host.events
    if IOCTL_EVENT[0] not in ev.kinds:
        ev.register_kind(*IOCTL_EVENT)
    ev.emit(IOCTL_EVENT[0], "host", name, vm_id, err)


def ioctl(host: Any, name: str, vm_id: Any, op: Generator[Any, Any, Ret],
          hw_error: Optional[List[int]] = None) -> int:
    """Run ``op`` to completion; return its value, or raise :class:`KvmError` for ``-errno``.

    Parameters
    ----------
    host : Host
        Whose event log records the call.
    name : str
        The ioctl's upstream name (``"KVM_SET_USER_MEMORY_REGION2"``), the message prefix.
    vm_id : int or None
        The VM the ioctl is issued on.
    op : generator
        The operation; it returns a :data:`Ret`.
    hw_error : list of one int, optional
        ``cmd.hw_error`` of a TDX sub-ioctl: the op stores the module status in ``hw_error[0]``;
        it is copied into the raised :class:`KvmError` (``.hw_error``).

    Raises
    ------
    KvmError
        ``errno`` is the kernel's, the message ``"<name>: <check>"``.
    """
    ret, check = run_to_completion(op, name=name)
    if ret < 0:
        _log(host, name, vm_id, -ret)
        msg = f"{name}: {check}"
        raise KvmError(-ret, msg, hw_error=hw_error[0] if hw_error else 0)
    _log(host, name, vm_id, 0)
    return ret


def fd_call(host: Any, name: str, vm_id: Any, ret: Ret) -> int:
    """Like :func:`ioctl` for a call that is already done (``close``) or not an ioctl (``fallocate``)."""
    r, check = ret
    _log(host, name, vm_id, -r if r < 0 else 0)
    if r < 0:
        msg = f"{name}: {check}"
        raise KvmError(-r, msg)
    return r


def ebadf(what: str) -> Ret:
    """``-EBADF`` for a handle whose fd is closed."""
    return fail(_errno.EBADF, f"{what} is closed")
