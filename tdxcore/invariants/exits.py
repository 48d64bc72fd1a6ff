"""I23 — unknown TDVMCALLs never reach userspace; the guest gets SUBFUNC_UNSUPPORTED (SPEC §6).

tdx-facts "Invariants" 23, §9.4, §9.7. Registered with ``layer="kvm"`` when imported (from
``tdxcore.invariants``). Like :mod:`.kvm` it reads KVM objects duck-typed and takes "known" from
:class:`~tdxcore.constants.TdvmcallLeaf` (the GHCI leaves 6.18 dispatches), never from the
dispatcher's own table, so a dispatcher that forwards a leaf it should refuse is caught. Three
views, each O(new data) on repeated checks:

* **events** — every ``tdvmcall`` event (``kvm/exits.py``: R10, R11 in; the exit it caused; the
  status when completed in the kernel) since the last check: R10 = 0 with an unknown R11 must
  cause no exit and get SUBFUNC_UNSUPPORTED; a KVM hypercall (R10 != 0) may leave only as
  ``KVM_EXIT_HYPERCALL`` for ``KVM_HC_MAP_GPA_RANGE``;
* **guest_log** — every completed raw TDVMCALL op with R10 = 0 and an unknown leaf got
  SUBFUNC_UNSUPPORTED;
* **pending exits** — no vCPU waits for userspace (``vcpu.completion`` armed) on an unknown leaf,
  and ``kvm_run`` offers no generic register-dump payload (``tdx.unknown``, ``tdx.vmcall``).

The first violation found is kept and re-reported by later checks (a broken model stays broken).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator, Optional

from tdxcore import guest as _g
from tdxcore.constants import HC, ExitReason, TdvmcallLeaf, TdvmcallStatus
from tdxcore.errors import InvariantViolation
from tdxcore.invariants.module import _fail
from tdxcore.invariants.registry import register_invariant

__all__ = ["check_i23", "is_unknown_tdvmcall"]

_KNOWN = frozenset(int(x) for x in TdvmcallLeaf)
_UNSUPPORTED = int(TdvmcallStatus.SUBFUNC_UNSUPPORTED)
_KIND = "tdvmcall"
#: Attribute names of the NAKed generic exit (``struct kvm_tdx_exit`` with a ``vmcall`` register dump).
_DUMP_ATTRS = ("unknown", "vmcall")

_CURSOR: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()          # host -> event index
_LOGGED: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()          # vcpu -> guest_log len
_FOUND: "weakref.WeakKeyDictionary[Any, InvariantViolation]" = weakref.WeakKeyDictionary()


def is_unknown_tdvmcall(op: Any) -> bool:
    """Whether guest op ``op`` is a standard TDVMCALL (R10 = 0) whose leaf 6.18 does not know."""
    if type(op) is not _g.Tdvmcall:
        return False                # every typed op is a known leaf
    return not dict(op.regs).get("r10", 0) and op.leaf not in _KNOWN


def _vcpus(host: Any) -> Iterator[Any]:
    for vm in host.vms:
        if hasattr(vm, "td_state") and not vm.is_destroyed:
            yield from vm.vcpus


def _scan_events(host: Any) -> Optional[InvariantViolation]:
    ev = host.events
    start = _CURSOR.get(host, 0)
    end = len(ev)
    _CURSOR[host] = end
    if _KIND not in ev.kinds:
        return None
    for i in range(start, end):
        e = ev[i]
        if e[0] != _KIND:
            continue
        _, actor, r10, r11, exit_reason, status = e
        if r10 == 0 and r11 not in _KNOWN and (exit_reason or status != _UNSUPPORTED):
            what = f"exit {ExitReason(exit_reason).name}" if exit_reason else f"status {status!r}"
            return _fail(host, "I23", f"{actor}: unknown TDVMCALL leaf {r11:#x} got {what}, "
                         "not SUBFUNC_UNSUPPORTED without an exit", index=i)
        if r10 and exit_reason and (exit_reason != ExitReason.HYPERCALL or r10 != HC.MAP_GPA_RANGE):
            return _fail(host, "I23", f"{actor}: KVM hypercall nr {r10:#x} reached userspace "
                         f"({ExitReason(exit_reason).name})", index=i)
    return None


def _scan_vcpu(host: Any, vcpu: Any) -> Optional[InvariantViolation]:
    log = vcpu.guest_log
    start = _LOGGED.get(vcpu, 0)
    _LOGGED[vcpu] = len(log)
    name = f"VM {vcpu.vm.id} vCPU {vcpu.vcpu_id}"
    for e in log[start:]:
        if is_unknown_tdvmcall(e.op) and e.status != _UNSUPPORTED:
            return _fail(host, "I23", f"{name}: guest op {e.index} (unknown TDVMCALL {e.op.leaf:#x}) "
                         f"completed with status {e.status!r}, not SUBFUNC_UNSUPPORTED")
    queue = vcpu.queue
    if getattr(vcpu, "completion", None) is not None and queue and is_unknown_tdvmcall(queue[0]):
        return _fail(host, "I23", f"{name}: waits for userspace on unknown TDVMCALL {queue[0].leaf:#x}")
    tdx_exit = vcpu.kvm_run.tdx
    for a in _DUMP_ATTRS:
        if hasattr(tdx_exit, a):
            return _fail(host, "I23", f"{name}: kvm_run.tdx offers a generic register-dump payload ({a})")
    return None


def check_i23(host: Any) -> None:
    """I23: unknown TDVMCALL leaves never reach userspace; the guest gets SUBFUNC_UNSUPPORTED."""
    found = _FOUND.get(host)
    if found is None:
        found = _scan_events(host)
        for v in _vcpus(host):
            if found is not None:
                break
            found = _scan_vcpu(host, v)
        if found is not None:
            _FOUND[host] = found
    if found is not None:
        raise found


register_invariant("I23", check_i23, "kvm")
