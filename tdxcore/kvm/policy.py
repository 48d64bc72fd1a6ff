"""Retry policies: how KVM reacts to ``TDX_OPERAND_BUSY`` (SPEC §4.1; tdx-facts §4.1).

A policy is a strategy object; KVM's S-EPT code asks it at four places and nowhere else:

* :meth:`Policy.map_seamcall` — SEPT.ADD and PAGE.AUG on the fault path (``mmu_lock`` read);
* :meth:`Policy.zap_seamcall` — RANGE.BLOCK and PAGE.REMOVE (``mmu_lock`` write);
* :meth:`Policy.track` — TDH.MEM.TRACK (``mmu_lock`` write);
* :attr:`Policy.local_retry` — whether the EPT-violation handler retries a RET_PF_RETRY fault
  locally (6.18) or re-enters the guest (the 2023 series, which is what lets zero-step trigger).

Two are built in: :data:`Policy.LINUX_6_18` (the baseline, ``reference/linux-6.18.md`` §1, §3) and
:data:`Policy.SERIES_2023` (seed ``004_…``). Adding one (say 6.19's ``tdh_do_no_vcpus``) means a new
subclass here or in user code, passed as ``Kvm(host, policy=MyPolicy())``; no other file changes.

Every retry loop is a bounded, counted generator that yields between tries (SPEC §2): ``PREEMPT``
for a plain retry, ``WaitOutOfGuest`` for 6.18's kick. Counters (``host.stats`` and the VM's
``vm.stats``): ``nr_zap_busy_retries``, ``nr_kicks``, ``nr_sept_busy_retries`` (2023 wrapper),
``nr_track_busy_retries``. :meth:`Policy.bounds` names each bound so invariant S6d can check that
no retry count ever exceeds it.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Generator, Mapping, Tuple

from tdxcore.constants import MAX_LOCAL_RETRIES, SEAMCALL_RETRY_MAX, TRACK_RETRY_MAX
from tdxcore.sched import PREEMPT, WaitOutOfGuest
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    OPERAND_ID_SEPT_TREE,
    OPERAND_ID_TD_EPOCH,
    TDX_OPERAND_BUSY,
    Leaf,
)

if TYPE_CHECKING:
    from tdxcore.kvm.tdx_vm import TdxVm

__all__ = ["Policy", "Linux618Policy", "Series2023Policy", "MAX_LOCAL_RETRIES", "SEAMCALL_RETRY_MAX",
           "TRACK_RETRY_MAX", "POLICIES", "kick_all_vcpus"]

_BUSY_SEPT_TREE = TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE
_BUSY_RCX = TDX_OPERAND_BUSY | OPERAND_ID_RCX
_BUSY_TD_EPOCH = TDX_OPERAND_BUSY | OPERAND_ID_TD_EPOCH

#: A SEAMCALL to issue (again): returns the in-flight generator (``TdxModule.*_op``).
SeamcallFn = Callable[[], Generator[Any, Any, Any]]


def _is_busy(res: Any) -> bool:
    return bool(res.status.base == TDX_OPERAND_BUSY)


def kick_all_vcpus(vm: "TdxVm") -> Generator[Any, Any, None]:
    """``kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE)``: wait until no vCPU is in the guest.

    Only vCPUs in guest mode are waited for (SPEC §5): from VP.ENTER's start (``IN_GUEST_MODE`` is
    set before the SEAMCALL) to the TD exit the IPI forces. One blocked on ``mmu_lock`` in KVM is
    outside guest mode, so a kick can never deadlock with it.
    """
    vm.count("nr_kicks")
    acks = [_KickAck(v) for v in vm.vcpus if v.tdvpr is not None and v.in_guest]
    for a in acks:
        a.vcpu.kick()                            # the IPI: it exits at its next instruction
    vm.kvm.host.events.emit("kick", f"vm{vm.id}", len(acks))
    yield WaitOutOfGuest(acks)                   # the broadcast is a preemption point even if none


class _KickAck:
    """One kicked vCPU's acknowledgement: pending until it leaves the guest-mode span it was in.

    ``kvm_make_all_cpus_request`` waits for each vCPU in guest mode at the time of the request to
    leave it once; re-entering afterwards does not hold the requester back.
    """

    __slots__ = ("vcpu", "span")

    def __init__(self, vcpu: Any) -> None:
        self.vcpu = vcpu
        self.span = vcpu.guest_mode_seq

    @property
    def in_guest(self) -> bool:
        return bool(self.vcpu.in_guest and self.vcpu.guest_mode_seq == self.span)

    def __repr__(self) -> str:
        return f"kick ack of {self.vcpu!r}"


class Policy(abc.ABC):
    """The retry-policy protocol (SPEC §4.1). Subclass it to add a policy.

    Attributes
    ----------
    name : str
        Stable name (reports, ``--policy``).
    local_retry : bool
        True: the EPT-violation handler loops on RET_PF_RETRY (yielding each try) until an exit
        condition; False: RET_PF_RETRY re-enters the guest.
    """

    name: ClassVar[str] = "abstract"
    local_retry: ClassVar[bool] = True
    #: Whether the local retry stops on an invalid memslot (the 6.18 fix; False only in explore's
    #: deliberately broken ``NO_MEMSLOT_CHECK`` variant).
    local_retry_memslot_check: ClassVar[bool] = True

    #: The built-in policies (set below).
    LINUX_6_18: ClassVar["Policy"]
    SERIES_2023: ClassVar["Policy"]

    @abc.abstractmethod
    def map_seamcall(self, vm: "TdxVm", call: SeamcallFn) -> Generator[Any, Any, Any]:
        """Issue a map-path SEAMCALL (SEPT.ADD, PAGE.AUG) and return its last result."""

    @abc.abstractmethod
    def zap_seamcall(self, vm: "TdxVm", call: SeamcallFn) -> Generator[Any, Any, Any]:
        """Issue a zap-path SEAMCALL (RANGE.BLOCK, PAGE.REMOVE) and return its last result."""

    @abc.abstractmethod
    def track(self, vm: "TdxVm", call: SeamcallFn) -> Generator[Any, Any, Any]:
        """Issue TDH.MEM.TRACK (with the policy's retry) and return its last result."""

    @abc.abstractmethod
    def bounds(self) -> Mapping[str, int]:
        """Name → bound of every retry count this policy keeps (for invariant S6d)."""

    @abc.abstractmethod
    def busy_allowlist(self) -> Tuple[Tuple[Leaf, int, bool], ...]:
        """``(leaf, status, first_try_only)`` the policy survives as injected BUSY (SPEC §8 ``--busy``).

        ``first_try_only``: inject only while no zap retry is in progress (6.18 never survives
        a BUSY on the retry after its kick).
        """

    def __repr__(self) -> str:
        return f"Policy.{self.name}"


class Linux618Policy(Policy):
    """Linux 6.18 (= 6.16 semantics): zap retries once with vCPUs kicked; map path never retries.

    ``tdx_sept_zap_private_spte`` / ``tdx_track`` / ``tdx_sept_drop_private_spte`` with
    ``tdx_no_vcpus_enter_start/stop`` (v6.18 ``arch/x86/kvm/vmx/tdx.c``; linux-6.18.md §1).
    """

    name = "LINUX_6_18"
    local_retry = True

    def map_seamcall(self, vm: "TdxVm", call: SeamcallFn) -> Generator[Any, Any, Any]:
        """Try once: BUSY becomes -EBUSY → RET_PF_RETRY in the caller."""
        return (yield from call())

    def zap_seamcall(self, vm: "TdxVm", call: SeamcallFn) -> Generator[Any, Any, Any]:
        """Try once; on BUSY set ``wait_for_sept_zap``, kick every vCPU out, retry once, clear."""
        res = yield from call()
        if _is_busy(res):
            vm.count("nr_zap_busy_retries")
            vm.wait_for_sept_zap = True          # tdx_no_vcpus_enter_start
            try:
                yield from kick_all_vcpus(vm)
                res = yield from call()
            finally:
                vm.wait_for_sept_zap = False     # tdx_no_vcpus_enter_stop
        return res

    def track(self, vm: "TdxVm", call: SeamcallFn) -> Generator[Any, Any, Any]:
        """TRACK gets the same one retry as the other zap SEAMCALLs."""
        return (yield from self.zap_seamcall(vm, call))

    def bounds(self) -> Mapping[str, int]:
        """One zap retry per SEAMCALL; the local retry loop's model bound."""
        return {"zap_retries_per_call": 1, "local_retries_per_fault": MAX_LOCAL_RETRIES}

    def busy_allowlist(self) -> Tuple[Tuple[Leaf, int, bool], ...]:
        """AUG, SEPT.ADD: BUSY|SEPT_TREE or BUSY|RCX; the first try of BLOCK/TRACK/REMOVE; VP.ENTER."""
        return ((Leaf.TDH_MEM_PAGE_AUG, _BUSY_SEPT_TREE, False), (Leaf.TDH_MEM_PAGE_AUG, _BUSY_RCX, False),
                (Leaf.TDH_MEM_SEPT_ADD, _BUSY_SEPT_TREE, False), (Leaf.TDH_MEM_SEPT_ADD, _BUSY_RCX, False),
                (Leaf.TDH_MEM_RANGE_BLOCK, _BUSY_SEPT_TREE, True), (Leaf.TDH_MEM_TRACK, _BUSY_TD_EPOCH, True),
                (Leaf.TDH_MEM_PAGE_REMOVE, _BUSY_SEPT_TREE, True),
                (Leaf.TDH_VP_ENTER, _BUSY_SEPT_TREE, False), (Leaf.TDH_VP_ENTER, _BUSY_TD_EPOCH, False))


class Series2023Policy(Policy):
    """The 2023 series: SEPT SEAMCALLs retried while exactly BUSY|SEPT_TREE, no local retry.

    ``tdx_seamcall_sept`` retried up to ``SEAMCALL_RETRY_MAX`` extra times, then -EBUSY; the
    fault returns RET_PF_RETRY and re-enters the guest; TRACK is retried while BUSY up to
    ``TRACK_RETRY_MAX`` (seed ``004_…``; tdx-facts §4.1).
    """

    name = "SERIES_2023"
    local_retry = False

    def _sept(self, vm: "TdxVm", call: SeamcallFn) -> Generator[Any, Any, Any]:
        res = yield from call()
        tries = 0
        while res.status == _BUSY_SEPT_TREE and tries < SEAMCALL_RETRY_MAX:
            tries += 1
            vm.count("nr_sept_busy_retries")
            yield PREEMPT
            res = yield from call()
        return res

    def map_seamcall(self, vm: "TdxVm", call: SeamcallFn) -> Generator[Any, Any, Any]:
        """Retry as the wrapper does; a remaining BUSY becomes -EBUSY in the caller."""
        return (yield from self._sept(vm, call))

    def zap_seamcall(self, vm: "TdxVm", call: SeamcallFn) -> Generator[Any, Any, Any]:
        """Retry as the wrapper does (BLOCK, REMOVE); a remaining BUSY is a KVM_BUG in the caller."""
        return (yield from self._sept(vm, call))

    def track(self, vm: "TdxVm", call: SeamcallFn) -> Generator[Any, Any, Any]:
        """Retry while BUSY (any operand), at most ``TRACK_RETRY_MAX`` extra tries."""
        res = yield from call()
        tries = 0
        while _is_busy(res) and tries < TRACK_RETRY_MAX:
            tries += 1
            vm.count("nr_track_busy_retries")
            yield PREEMPT
            res = yield from call()
        return res

    def bounds(self) -> Mapping[str, int]:
        """Return the wrapper's and TRACK's bounds (no local retry)."""
        return {"sept_retries_per_call": SEAMCALL_RETRY_MAX, "track_retries_per_call": TRACK_RETRY_MAX,
                "local_retries_per_fault": 0}

    def busy_allowlist(self) -> Tuple[Tuple[Leaf, int, bool], ...]:
        """BUSY|SEPT_TREE on AUG, SEPT.ADD, BLOCK, REMOVE (the wrapper retries); TRACK; VP.ENTER."""
        return ((Leaf.TDH_MEM_PAGE_AUG, _BUSY_SEPT_TREE, False),
                (Leaf.TDH_MEM_SEPT_ADD, _BUSY_SEPT_TREE, False),
                (Leaf.TDH_MEM_RANGE_BLOCK, _BUSY_SEPT_TREE, False),
                (Leaf.TDH_MEM_PAGE_REMOVE, _BUSY_SEPT_TREE, False),
                (Leaf.TDH_MEM_TRACK, _BUSY_TD_EPOCH, False),
                (Leaf.TDH_VP_ENTER, _BUSY_SEPT_TREE, False), (Leaf.TDH_VP_ENTER, _BUSY_TD_EPOCH, False))


Policy.LINUX_6_18 = Linux618Policy()
Policy.SERIES_2023 = Series2023Policy()

#: Name → built-in policy (``--policy``).
POLICIES: Dict[str, Policy] = {p.name: p for p in (Policy.LINUX_6_18, Policy.SERIES_2023)}
