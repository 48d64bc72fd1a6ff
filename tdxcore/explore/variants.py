"""Policies the explorer runs: the built-in ones and **deliberately broken** variants (issue 11 item 3).

A variant is a :class:`~tdxcore.kvm.policy.Policy` (what ``Kvm(host, policy=...)`` gets) plus
named *hooks* a scenario applies to the world it builds. Each broken variant removes exactly one
protection upstream has, so the explorer must find a schedule that breaks the scenario it guards:

``NO_KICK_ZAP_RETRY``
    A zap SEAMCALL that answers BUSY is retried at once — no ``wait_for_sept_zap``, no kick of the
    vCPUs out of the guest (what 6.16 added; linux-6.18.md §1). The retry meets the same guest
    (an in-flight ACCEPT, an entry holding the TD epoch) and fails again: KVM_BUG.
``NO_SEPT_ZAP_FLAG``
    The kick is sent but ``wait_for_sept_zap`` is never set, so a kicked vCPU may enter again
    before the retry.
``NO_MEMSLOT_CHECK``
    The EPT-violation handler's local retry does not stop on an invalid memslot (the 6.18 fix):
    a memslot deletion waiting in ``synchronize_srcu`` for the faulting vCPU never finishes
    (:attr:`Policy.local_retry_memslot_check` False).
``NO_INVALIDATE_RETRY``
    The fault path ignores ``mmu_invalidate`` (``retry_gfn`` always false): a fault racing a
    conversion installs a private mapping for a gfn that is now shared (hook
    ``no_invalidate_retry``: the VM's tracker is wrapped by :class:`BlindInvalidate`).
``NO_MIRROR_CLEAR``
    The zap removes the S-EPT entry but leaves the mirror SPTE present, so the next zap of the
    same gfn blocks a removed entry: KVM_BUG (the double zap).
``EAGER_RECLAIM``
    TD teardown reclaims the vCPU pages without waiting for the HKID release to finish (hook
    ``eager_reclaim``): a reclaim that runs first finds the HKID still assigned and leaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, Generator, List, Sequence

from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.kvm.policy import POLICIES, Linux618Policy, Policy, kick_all_vcpus
from tdxcore.sched import PREEMPT

if TYPE_CHECKING:
    from tdxcore.kvm.tdx_vm import TdxVm

__all__ = ["Variant", "VARIANTS", "get_variant", "BlindInvalidate", "NoKickZapRetryPolicy",
           "NoSeptZapFlagPolicy", "NoMemslotCheckPolicy", "NoMirrorClearPolicy"]


def _is_busy(res: Any) -> bool:
    from tdxcore.status import TDX_OPERAND_BUSY  # type: ignore[attr-defined]

    return bool(res.status.base == TDX_OPERAND_BUSY)


class NoKickZapRetryPolicy(Linux618Policy):
    """6.18 with the zap retry issued at once: no ``wait_for_sept_zap``, no kick (broken on purpose)."""

    name = "NO_KICK_ZAP_RETRY"
    upstream = False

    def zap_seamcall(self, vm: "TdxVm", call: Any) -> Generator[Any, Any, Any]:
        """Try once; on BUSY yield once and retry (the guest that caused the BUSY may still be there)."""
        res = yield from call()
        if _is_busy(res):
            vm.count("nr_zap_busy_retries")
            yield PREEMPT
            res = yield from call()
        return res


class NoSeptZapFlagPolicy(Linux618Policy):
    """6.18 with the kick but without ``wait_for_sept_zap``: kicked vCPUs may re-enter (broken)."""

    name = "NO_SEPT_ZAP_FLAG"
    upstream = False

    def zap_seamcall(self, vm: "TdxVm", call: Any) -> Generator[Any, Any, Any]:
        """Try once; on BUSY kick every vCPU out and retry once, never blocking their entry."""
        res = yield from call()
        if _is_busy(res):
            vm.count("nr_zap_busy_retries")
            yield from kick_all_vcpus(vm)
            res = yield from call()
        return res


class NoMemslotCheckPolicy(Linux618Policy):
    """6.18 whose local retry ignores an invalid memslot (before the 6.18 fix; broken)."""

    name = "NO_MEMSLOT_CHECK"
    upstream = False
    local_retry_memslot_check = False


class NoMirrorClearPolicy(Linux618Policy):
    """6.18's per-page zap that leaves the mirror SPTE present after REMOVE (broken: double zap)."""

    name = "NO_MIRROR_CLEAR"
    upstream = False

    def zap_range(self, vm: "TdxVm", gfns: Sequence[int]) -> Generator[Any, Any, List[int]]:
        """BLOCK → TRACK → REMOVE each page through the 6.18 hook, without clearing its mirror SPTE."""
        from tdxcore.constants import PG_LEVEL_4K
        from tdxcore.kvm.mmu import SpteState
        from tdxcore.kvm.tdx_mmu import tdx_sept_remove_private_spte

        failed: List[int] = []
        for gfn in gfns:
            leaf = vm.mmu.leaf(gfn)
            if leaf is None or leaf[1] != SpteState.PRESENT:
                continue
            if (yield from tdx_sept_remove_private_spte(vm, gfn, PG_LEVEL_4K, int(leaf[0]))):
                failed.append(gfn)
        return failed


class BlindInvalidate:
    """Wrap a VM's ``mmu_invalidate`` so every retry check answers "no retry" (broken on purpose).

    Everything else (``begin``, ``end``, ``seq``, ``state_hash`` ...) goes to the real tracker.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def retry(self, seq: int) -> bool:
        """Never retry."""
        return False

    def retry_gfn(self, seq: int, gfn: int) -> bool:
        """Never retry."""
        return False

    def retry_gfn_unsafe(self, seq: int, gfn: int) -> bool:
        """Never retry."""
        return False


@dataclass(frozen=True)
class Variant:
    """A policy plus the scenario hooks it turns on; ``broken`` variants must be caught.

    Attributes
    ----------
    name : str
        ``--policy`` name.
    policy : Policy
        Given to ``Kvm``.
    hooks : frozenset of str
        Scenario-level breakages (``no_invalidate_retry``, ``eager_reclaim``).
    broken : bool
        Not a real kernel's behaviour: the explorer is expected to find a counterexample.
    doc : str
        One line: what protection is missing.
    """

    name: str
    policy: Policy
    hooks: FrozenSet[str] = field(default_factory=frozenset)
    broken: bool = False
    doc: str = ""


VARIANTS: Dict[str, Variant] = {}
for _p in POLICIES.values():
    VARIANTS[_p.name] = Variant(_p.name, _p, doc=f"built-in policy {_p.name}")
for _v in (
    Variant("NO_KICK_ZAP_RETRY", NoKickZapRetryPolicy(), broken=True,
            doc="zap BUSY retried at once: no wait_for_sept_zap, no kick"),
    Variant("NO_SEPT_ZAP_FLAG", NoSeptZapFlagPolicy(), broken=True,
            doc="zap BUSY: kick but no wait_for_sept_zap, kicked vCPUs re-enter"),
    Variant("NO_MEMSLOT_CHECK", NoMemslotCheckPolicy(), broken=True,
            doc="local fault retry does not stop on an invalid memslot"),
    Variant("NO_INVALIDATE_RETRY", Policy.LINUX_6_18, frozenset({"no_invalidate_retry"}), broken=True,
            doc="fault path ignores mmu_invalidate (no retry_gfn)"),
    Variant("NO_MIRROR_CLEAR", NoMirrorClearPolicy(), broken=True,
            doc="zap leaves the mirror SPTE present after REMOVE"),
    Variant("EAGER_RECLAIM", Policy.LINUX_6_18, frozenset({"eager_reclaim"}), broken=True,
            doc="teardown reclaims vCPU pages without waiting for the HKID release"),
):
    VARIANTS[_v.name] = _v


def get_variant(name: object) -> Variant:
    """Return the variant called ``name`` (``TdxTypeError``/``TdxValueError`` otherwise)."""
    if not isinstance(name, str):
        msg = f"policy={name!r} must be a str naming a policy or broken variant"
        raise TdxTypeError(msg, name="policy", value=name)
    if name not in VARIANTS:
        msg = f"policy={name!r} is not one of {sorted(VARIANTS)}"
        raise TdxValueError(msg, name="policy", value=name)
    return VARIANTS[name]
