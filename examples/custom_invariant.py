"""``register_invariant``: add a check of your own to every ``check_invariants`` (SPEC §3.5).

An invariant is ``fn(host)`` that raises ``InvariantViolation(id, message, ...)`` when broken.
Registered, it runs in every later ``check_invariants(host)`` (and so at every storm step);
``check_invariants(host, ids=[...])`` runs only those; ``unregister_invariant`` removes it.

The one here, "X01", says "no page has leaked". A TDH.PHYMEM.PAGE.WBINVD failure injected into a
zap makes KVM bug the VM and keep the page pinned (a leak), which X01 then reports.
Run: ``python3 examples/custom_invariant.py``.
"""

from __future__ import annotations

from typing import Any

from tdxcore import Host, InvariantViolation, Kvm, check_invariants, helpers, register_invariant
from tdxcore.constants import PAGE_SIZE
from tdxcore.invariants import invariant_ids, unregister_invariant
from tdxcore.status import OPERAND_ID_RCX, TDX_OPERAND_INVALID, Leaf  # type: ignore[attr-defined]

GPA = 4 << 30
X01 = "X01"                                         # a unique, stable id


def no_leaks(host: Any) -> None:
    """X01: the host has recorded no leaked page (a KVM_BUG that pinned memory)."""
    if host.leaks:
        lk = host.leaks[0]
        msg = f"{len(host.leaks)} leaked page(s), first {lk.what}: {lk.reason}"
        raise InvariantViolation(X01, msg, pfn=lk.pfn, event_index=lk.event_index)


def main() -> str:
    """Register X01, pass it, break it, remove it; return the violation's message."""
    register_invariant(X01, no_leaks, layer="kvm")   # "kvm": it reads KVM-level state
    try:
        host = Host(packages=1, cpus_per_package=2, memory=64 << 20, tdx_keyids=4, seed=2)
        td = helpers.td_create(Kvm(host), vcpus=1, memory=8 * PAGE_SIZE, gpa=GPA, initial_pages=4)
        check_invariants(host)                          # all built-ins and X01: clean
        print("registered:", "X01" in invariant_ids("kvm"), "- clean TD passes")
        host.tdx.inject(Leaf.TDH_PHYMEM_PAGE_WBINVD, TDX_OPERAND_INVALID | OPERAND_ID_RCX, count=1)
        td.vm.set_memory_attributes(GPA, PAGE_SIZE, 0)  # zap one page: its WBINVD fails -> leak
        try:
            check_invariants(host, ids=[X01])         # only ours
        except InvariantViolation as e:
            print(f"violation {e.invariant}: {e}".splitlines()[0])
            message = str(e)
        else:
            msg = "X01 should have fired"
            raise AssertionError(msg)
    finally:
        unregister_invariant(X01)                     # registrations are process-wide
    assert "X01" not in invariant_ids()
    print("unregistered")
    return message


if __name__ == "__main__":
    main()
