"""Drivers for the call sites of ``outcomes.SITES``: build a TD up to the site, then trigger it.

Each driver is ``site(leaf) -> Env`` with the TD prepared (nothing armed yet); ``env.trigger()``
runs the user-visible operation of the site and returns an :class:`Observed`; ``env.teardown()``
drops every remaining reference so the VM is destroyed. ``env.match`` (or None) is the
``InjectCall`` filter that singles out the site's call of the leaf (e.g. the RECLAIM of one page).

The TD: one package with two CPUs, one vCPU, a 4 MiB guest_memfd slot at 4 GiB (private), one
measured initial page at 4 GiB (so a 2 MiB S-EPT table exists there and a private page is mapped)
and nothing yet in the second 2 MiB (a fault there needs SEPT.ADD, then PAGE.AUG).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional

from tdxcore import guest
from tdxcore.constants import (
    MODEL_MAXPHYADDR,
    PAGE_SIZE,
    TDCS_NR_PAGES,
    Cap,
    FallocFlag,
    MemAttr,
    MemFlag,
    VmType,
)
from tdxcore.errors import KvmError
from tdxcore.kvm import Kvm
from tdxcore.module.host import Host
from tdxcore.module.inject import InjectCall
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_ATTRIBUTES,
    OPERAND_ID_R9,
    TDX_OPERAND_INVALID,
    Leaf,
)

BASE = 4 << 30
MEM = 4 << 20
#: A private GPA in the second 2 MiB of the slot: no S-EPT table there until a fault links one.
FAULT_GPA = BASE + (2 << 20) + 5 * PAGE_SIZE
PAGE = bytes(range(256)) * 16
_PFN_MASK = (1 << MODEL_MAXPHYADDR) - 1


class Observed(NamedTuple):
    """What the trigger returned: the ioctl's errno (None: success) and KVM_RUN's exit reason."""

    errno: Optional[int]
    exit_reason: Optional[str] = None


def _call(fn: Callable[[], Any]) -> Observed:
    try:
        r = fn()
    except KvmError as e:
        return Observed(e.errno)
    reason = getattr(r, "exit_reason", None)
    return Observed(None, None if reason is None else reason.name)


def _pfn_is(pfn: int) -> Callable[[InjectCall], bool]:
    return lambda c: ((c.rcx & _PFN_MASK) >> 12) == pfn


class Env:
    """One host, its KVM and (once created) one TD with its guest_memfd and vCPU."""

    def __init__(self, terminate_vm: bool = False) -> None:
        self.host = Host(packages=1, cpus_per_package=2, memory=16 << 20)
        self.kvm = Kvm(self.host, terminate_vm=terminate_vm)
        self.free0 = self.host.free_frames
        self.vm: Any = None
        self.gmem: Any = None
        self.vcpu: Any = None
        self.trigger_fn: Callable[[], Observed] = lambda: Observed(None)
        self.match: Optional[Callable[[InjectCall], bool]] = None
        #: The private page a zap site removes (its frame must be free after a clean zap).
        self.zap_pfn: Optional[int] = None
        #: Whether the trigger is a KVM_RUN (a clean run ends in a HLT exit).
        self.runs = False
        #: ``hw_error`` the trigger leaves when the case's status does not fill it.
        self.hw_error = 0

    # ---- building blocks -------------------------------------------------------------------------
    def create(self) -> "Env":
        self.vm = self.kvm.create_vm(VmType.TDX)
        self.vm.enable_cap(Cap.SPLIT_IRQCHIP, 24)
        self.free0 = self.host.free_frames      # the module is enabled now (PAMT, global key)
        return self

    def init(self) -> "Env":
        self.vm.init_vm(gpaw=48)
        return self

    def slot(self) -> "Env":
        self.gmem = self.vm.create_guest_memfd(size=MEM)
        self.vm.set_user_memory_region2(slot=0, flags=MemFlag.GUEST_MEMFD, guest_phys_addr=BASE,
                                        memory_size=MEM, userspace_addr=self.host.mmap(MEM),
                                        guest_memfd=self.gmem, guest_memfd_offset=0)
        self.vm.set_memory_attributes(BASE, MEM, MemAttr.PRIVATE)
        return self

    def new_vcpu(self, init: bool = True) -> "Env":
        self.vcpu = self.vm.create_vcpu(0)
        if init:
            self.vcpu.init_vcpu()
        return self

    def add_page(self) -> "Env":
        self.vcpu.init_mem_region(source=PAGE, gpa=BASE, nr_pages=1, measure=True)
        return self

    def finalize(self) -> "Env":
        self.vm.finalize_vm()
        return self

    def runnable(self) -> "Env":
        return self.create().init().slot().new_vcpu().add_page().finalize()

    def punch(self) -> Observed:
        return _call(lambda: self.gmem.fallocate(FallocFlag.KEEP_SIZE | FallocFlag.PUNCH_HOLE, 0, PAGE_SIZE))

    # ---- use ----------------------------------------------------------------------------------------
    def trigger(self) -> Observed:
        return self.trigger_fn()

    def teardown(self) -> None:
        """Close whatever is still open (the VM is destroyed when the last reference goes)."""
        if self.vcpu is not None and not self.vcpu.is_closed:
            self.vcpu.close()
        if self.gmem is not None and not self.gmem.is_closed:
            self.gmem.close()
        if self.vm is not None and not self.vm.is_closed:
            self.vm.close()


def _init_vm(leaf: Leaf) -> Env:
    env = Env().create()
    env.trigger_fn = lambda: _call(lambda: env.vm.init_vm(gpaw=48))
    return env


def _init_vcpu(leaf: Leaf) -> Env:
    env = Env().create().init().slot().new_vcpu(init=False)
    env.trigger_fn = lambda: _call(env.vcpu.init_vcpu)
    return env


def _init_mem_region(leaf: Leaf) -> Env:
    env = Env().create().init().slot().new_vcpu()
    env.trigger_fn = lambda: _call(env.add_page)
    return env


def _finalize(leaf: Leaf) -> Env:
    env = Env().create().init().slot().new_vcpu().add_page()
    env.trigger_fn = lambda: _call(env.vm.finalize_vm)
    return env


def _run_fault(leaf: Leaf) -> Env:
    env = Env().runnable()
    env.runs = True
    env.trigger_fn = lambda: _call(lambda: env.vcpu.run([guest.write(FAULT_GPA, 0x5A, 1)]))
    return env


def _pre_fault(leaf: Leaf) -> Env:
    env = Env().runnable()

    def go() -> Observed:
        try:
            left = env.vcpu.pre_fault_memory(FAULT_GPA, PAGE_SIZE)
        except KvmError as e:
            return Observed(e.errno)
        assert left == (FAULT_GPA + PAGE_SIZE, 0), left      # all of it was mapped
        return Observed(None)

    env.trigger_fn = go
    return env


def _run_entry(leaf: Leaf) -> Env:
    env = Env().runnable()
    env.runs = True
    env.trigger_fn = lambda: _call(lambda: env.vcpu.run([guest.write(BASE, 0x5A, 1)]))
    return env


def _zap(op: str) -> Callable[[Leaf], Env]:
    def make(leaf: Leaf) -> Env:
        env = Env().runnable()
        if op == "punch":
            env.trigger_fn = env.punch
        elif op == "shared":
            env.trigger_fn = lambda: _call(lambda: env.vm.set_memory_attributes(BASE, PAGE_SIZE, 0))
        elif op == "close":
            env.trigger_fn = lambda: _call(env.gmem.close)
        else:
            env.trigger_fn = lambda: _call(lambda: env.vm.set_user_memory_region2(
                slot=0, flags=MemFlag.GUEST_MEMFD, guest_phys_addr=BASE, memory_size=0, userspace_addr=0))
        env.zap_pfn = env.vm.mmu.leaves[0][1]
        if leaf == Leaf.TDH_PHYMEM_PAGE_WBINVD:
            env.match = _pfn_is(env.zap_pfn)
        return env
    return make


def _punch_before_finalize(leaf: Leaf) -> Env:
    env = Env().create().init().slot().new_vcpu().add_page()
    env.zap_pfn = env.vm.mmu.leaves[0][1]
    env.trigger_fn = env.punch
    return env


def _punch_premapped(leaf: Leaf) -> Env:
    env = Env().create().init().slot().new_vcpu()
    h = env.host.tdx.inject(Leaf.TDH_MEM_PAGE_ADD, TDX_OPERAND_INVALID | OPERAND_ID_R9, count=1)
    obs = _call(env.add_page)
    assert obs.errno is not None and h.nr_fired == 1 and env.vm.nr_premapped == 1, obs
    env.trigger_fn = env.punch
    return env


def _destroyed_env() -> Env:
    """Build a RUNNABLE TD whose vCPU ran (so it is associated with a CPU) and whose memory is gone."""
    env = Env().runnable()
    r = env.vcpu.run([guest.write(BASE, 0x5A, 1)])
    assert r.exit_reason.name == "HLT", r
    env.vcpu.close()
    env.gmem.close()

    def go() -> Observed:
        return _call(env.vm.close)

    env.trigger_fn = go
    return env


def _destroy(page: Optional[str]) -> Callable[[Leaf], Env]:
    def make(leaf: Leaf) -> Env:
        env = _destroyed_env()
        vm = env.vm
        if page == "tdcx":
            env.match = _pfn_is(vm.vcpus[0].tdcx[0])
        elif page == "tdvpr":
            env.match = _pfn_is(vm.vcpus[0].tdvpr)
        elif page == "sept":
            env.match = _pfn_is(vm.mmu.nonleaf[0][2])
        elif page == "tdcs":
            env.match = _pfn_is(vm.tdcs[0])
        elif page == "tdr":
            env.match = _pfn_is(vm.tdr)
        return env
    return make


def _init_vm_failure(page: Optional[str]) -> Callable[[Leaf], Env]:
    """INIT_VM whose MNG.INIT fails (a bad TD_PARAMS operand): the teardown runs inside the ioctl."""
    def make(leaf: Leaf) -> Env:
        env = Env().create()
        env.hw_error = TDX_OPERAND_INVALID | OPERAND_ID_ATTRIBUTES
        env.host.tdx.inject(Leaf.TDH_MNG_INIT, env.hw_error, count=1)
        if page is not None:
            # the frames are allocated inside the ioctl: pick the RECLAIM by its rank (TDCS pages
            # first, then the TDR)
            want = 1 if page == "tdcs" else 1 + TDCS_NR_PAGES
            seen = [0]

            def nth(call: InjectCall) -> bool:
                seen[0] += 1
                return seen[0] == want

            env.match = nth
        env.trigger_fn = lambda: _call(lambda: env.vm.init_vm(gpaw=48))
        return env
    return make


def _terminate(leaf: Leaf) -> Env:
    """KVM_TDX_TERMINATE_VM (the opt-in extension) on a RUNNABLE TD whose vCPU ran once."""
    env = Env(terminate_vm=True).runnable()
    r = env.vcpu.run([guest.write(BASE, 0x5A, 1)])
    assert r.exit_reason.name == "HLT", r
    env.trigger_fn = lambda: _call(env.vm.terminate_vm)
    return env


#: Site name → driver.
DRIVERS: Dict[str, Callable[[Leaf], Env]] = {
    "KVM_TDX_INIT_VM": _init_vm,
    "KVM_TDX_INIT_VCPU": _init_vcpu,
    "KVM_TDX_INIT_MEM_REGION": _init_mem_region,
    "KVM_TDX_FINALIZE_VM": _finalize,
    "KVM_RUN (EPT violation)": _run_fault,
    "KVM_PRE_FAULT_MEMORY": _pre_fault,
    "KVM_RUN (entry)": _run_entry,
    "fallocate(PUNCH_HOLE)": _zap("punch"),
    "KVM_SET_MEMORY_ATTRIBUTES (to shared)": _zap("shared"),
    "close(guest_memfd)": _zap("close"),
    "memslot delete": _zap("delete"),
    "fallocate(PUNCH_HOLE) before FINALIZE": _punch_before_finalize,
    "fallocate(PUNCH_HOLE) of a premapped page": _punch_premapped,
    "KVM_TDX_INIT_VM failure teardown": _init_vm_failure(None),
    "KVM_TDX_INIT_VM failure teardown (TDCS page)": _init_vm_failure("tdcs"),
    "KVM_TDX_INIT_VM failure teardown (TDR page)": _init_vm_failure("tdr"),
    "KVM_TDX_TERMINATE_VM (extension)": _terminate,
    "VM destruction": _destroy(None),
    "VM destruction (TDCX page)": _destroy("tdcx"),
    "VM destruction (TDVPR page)": _destroy("tdvpr"),
    "VM destruction (S-EPT page)": _destroy("sept"),
    "VM destruction (TDCS page)": _destroy("tdcs"),
    "VM destruction (TDR page)": _destroy("tdr"),
}
