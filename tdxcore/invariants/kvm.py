"""KVM-layer invariants over the live TDs of a host (SPEC §6; issue 5): I16, I21, I20kvm.

Registered with ``layer="kvm"`` when this module is imported (``tdxcore.invariants`` should
import it next to ``module`` and ``temporal``). It reads KVM objects duck-typed, by their
``td_state`` attribute, and imports nothing from the KVM layer:

* **I16** — no TD page is reclaimed while its HKID is assigned: every control page a live KVM TD
  holds (TDR, TDCS, each vCPU's TDVPR and TDCX) is still assigned in the PAMT (TDR: PT_TDR;
  the others owned by that TDR) while ``vm.hkid`` is set.
* **I21** — KVM TD state is monotonic (UNINITIALIZED → INITIALIZED → RUNNABLE while the VM
  lives) and matches the module's op state; vCPUs exist only once the TD is INITIALIZED, and an
  INITIALIZED vCPU has an initialized module vCPU.
* **I20kvm** (the KVM part of I20) — a TD that reached INITIALIZED had its HKID programmed on
  every package (so every package had an online CPU when it was created).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator, List, Tuple

from tdxcore.constants import PageType
from tdxcore.invariants.module import _fail
from tdxcore.invariants.registry import register_invariant
from tdxcore.status import OpState  # type: ignore[attr-defined]

__all__ = ["check_i16", "check_i21", "check_i20kvm"]

#: Highest KVM TD state seen per live VM (monotonicity across checks).
_SEEN: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()

#: KVM TdState value → module op state it implies (INITIALIZED=1, RUNNABLE=2).
_OP_STATE = {1: OpState.INITIALIZED, 2: OpState.RUNNABLE}


def _tds(host: Any) -> Iterator[Any]:
    for vm in host.vms:
        if hasattr(vm, "td_state") and not vm.is_destroyed:
            yield vm


def _held(vm: Any) -> List[Tuple[int, str]]:
    pages = [(p, "tdcs") for p in vm.tdcs]
    for v in vm.vcpus:
        pages += [(p, "tdcx") for p in v.tdcx]
        if v.tdvpr is not None:
            pages.append((v.tdvpr, "tdvpr"))
    return pages


def check_i16(host: Any) -> None:
    """I16: pages of a KVM TD whose HKID is assigned are still the TD's in the PAMT."""
    pamt = host.pamt
    for vm in _tds(host):
        if vm.hkid is None or vm.tdr is None:
            continue
        if pamt.page_type(vm.tdr) != PageType.PT_TDR:
            raise _fail(host, "I16", f"VM {vm.id}: TDR reclaimed while HKID {vm.hkid} is assigned",
                        pfn=vm.tdr)
        for pfn, what in _held(vm):
            if pamt.page_type(pfn) == PageType.PT_NDA or pamt.owner(pfn) != vm.tdr:
                raise _fail(host, "I16",
                            f"VM {vm.id}: {what} page reclaimed while HKID {vm.hkid} is assigned", pfn=pfn)


def check_i21(host: Any) -> None:
    """I21: KVM TD state monotonic and consistent with the module; vCPUs only once INITIALIZED."""
    for vm in _tds(host):
        s = int(vm.td_state)
        if s < _SEEN.get(vm, 0):
            raise _fail(host, "I21", f"VM {vm.id}: TD state went back to {vm.td_state.name}")
        _SEEN[vm] = s
        if s == 0:
            if vm.created_vcpus:
                raise _fail(host, "I21", f"VM {vm.id}: {vm.created_vcpus} vCPUs on an UNINITIALIZED TD")
            continue
        td = host.tdx.tds.get(vm.tdr) if vm.tdr is not None else None
        if vm.hkid is None or td is None or td.op_state != _OP_STATE[s]:
            state = None if td is None else OpState(td.op_state).name
            raise _fail(host, "I21", f"VM {vm.id}: KVM state {vm.td_state.name} but module op state {state}",
                        pfn=vm.tdr)
        for v in vm.vcpus:
            if int(v.state) and (v.tdvpr is None or v.tdvpr not in td.vcpus
                                 or not td.vcpus[v.tdvpr].initialized):
                raise _fail(host, "I21", f"VM {vm.id}: vCPU {v.vcpu_id} INITIALIZED without a module vCPU",
                            pfn=v.tdvpr)


def check_i20kvm(host: Any) -> None:
    """I20 (KVM part): an INITIALIZED/RUNNABLE TD has its HKID configured on every package."""
    for vm in _tds(host):
        if int(vm.td_state) == 0 or vm.tdr is None or vm.tdr not in host.tdx.tds:
            continue
        td = host.tdx.tds[vm.tdr]
        missing = sorted(set(range(host.nr_packages)) - set(td.pkg_configured))
        if missing:
            raise _fail(host, "I20kvm", f"VM {vm.id}: HKID {vm.hkid} not configured on package(s) {missing}",
                        pfn=vm.tdr)


for _id, _fn in (("I16", check_i16), ("I21", check_i21), ("I20kvm", check_i20kvm)):
    register_invariant(_id, _fn, "kvm")
