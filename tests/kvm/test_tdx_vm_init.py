"""KVM_CREATE_VM(TDX), KVM_ENABLE_CAP, KVM_TDX_INIT_VM: every errno, precedence, "nothing changed",
and SEAMCALL injection at every init leaf (tdx-facts §4.2, §5.3, §5.8; anchors §2.3, A21/A22)."""

from __future__ import annotations

import errno

import pytest

from tdxcore.constants import (
    KVM_EXIT_HYPERCALL_VALID_MASK,
    TD_XFAM_SUPPORTED,
    TDCS_NR_PAGES,
    Cap,
    TdAttr,
    VmType,
)
from tdxcore.errors import KvmError, TdxTypeError, TdxValueError
import tdxcore.invariants.kvm  # noqa: F401  (the KVM invariants I16, I21, I20kvm)
from tdxcore.invariants import check_invariants
from tdxcore.kvm import CpuidEntry, Kvm, TdState, TdxVm
from tdxcore.module.host import Host
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_ATTRIBUTES,
    OPERAND_ID_KET,
    OPERAND_ID_KOT,
    OPERAND_ID_RCX,
    TDX_HKID_NOT_FREE,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_INVALID,
    TDX_RND_NO_ENTROPY,
    TDX_SYS_NOT_READY,
    TDX_TDCX_NUM_INCORRECT,
    Leaf,
)


def make_host(**kw):
    kw.setdefault("packages", 2)
    kw.setdefault("cpus_per_package", 2)
    kw.setdefault("memory", 32 << 20)
    return Host(**kw)


def new_td(host=None, split=True):
    """A TD VM (module enabled) on ``host``; returns (host, kvm, vm)."""
    host = host or make_host()
    kvm = Kvm(host)
    vm = kvm.create_vm(VmType.TDX)
    if split:
        vm.enable_cap(Cap.SPLIT_IRQCHIP, 24)
    return host, kvm, vm


def seamcalls(host, leaf=None):
    """Leaves of every completed SEAMCALL, in order (or the count of ``leaf``)."""
    if leaf is not None:
        return len(host.events.filter(kind="seamcall_end", leaf=leaf))
    return [e[1][2] for e in host.events.filter(kind="seamcall_end")]


def page_leaks(host):
    return sum(1 for lk in host.leaks if lk.pfn is not None)


@pytest.fixture
def td():
    return new_td()


def test_create_tdx_vm_enables_module_and_registers():
    host = make_host()
    assert not host.tdx.is_ready
    kvm = Kvm(host)
    vm = kvm.create_vm(VmType.TDX)
    assert isinstance(vm, TdxVm) and host.tdx.is_ready and vm.td_state is TdState.UNINITIALIZED
    assert kvm.check_extension(Cap.VM_TYPES) & (1 << VmType.TDX)
    assert vm.has_private_mem and not vm.has_readonly_mem
    assert vm.max_vcpus == host.nr_cpus == vm.check_extension(Cap.MAX_VCPUS)
    assert vm.check_extension(Cap.SPLIT_IRQCHIP) == 1
    assert vm.check_extension(Cap.EXIT_HYPERCALL) == KVM_EXIT_HYPERCALL_VALID_MASK


def test_create_tdx_vm_module_failure_is_kernel_errno():
    host = make_host(seamrr=False)
    kvm = Kvm(host)
    with pytest.raises(KvmError) as ei:
        kvm.create_vm(VmType.TDX)
    assert ei.value.errno == errno.ENODEV and host.vms == ()


def test_enable_cap_rules(td):
    host, kvm, vm = new_td(split=False)
    with pytest.raises(KvmError) as ei:
        vm.enable_cap(Cap.SPLIT_IRQCHIP, 49)
    assert ei.value.errno == errno.EINVAL and vm.split_irqchip_pins is None
    with pytest.raises(KvmError) as ei:
        vm.enable_cap(Cap.SPLIT_IRQCHIP, 24, flags=1)
    assert ei.value.errno == errno.EINVAL
    vm.enable_cap(Cap.SPLIT_IRQCHIP, 24)
    with pytest.raises(KvmError) as ei:
        vm.enable_cap(Cap.SPLIT_IRQCHIP, 24)
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(KvmError) as ei:
        vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << 3)
    assert ei.value.errno == errno.EINVAL and vm.hypercall_exit_enabled == 0
    vm.enable_cap(Cap.EXIT_HYPERCALL, KVM_EXIT_HYPERCALL_VALID_MASK)
    assert vm.hypercall_exit_enabled == KVM_EXIT_HYPERCALL_VALID_MASK
    with pytest.raises(KvmError) as ei:
        vm.enable_cap(Cap.NR_VCPUS, 1)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(TdxValueError):
        vm.enable_cap(Cap.SPLIT_IRQCHIP, 1, 2, 3, 4, 5)


def test_init_vm_happy_path(td):
    host, kvm, vm = td
    free0 = host.free_frames
    vm.init_vm(gpaw=48, attributes=int(TdAttr.SEPT_VE_DISABLE), cpuid=[CpuidEntry(1, eax=0x806F8)])
    assert vm.td_state is TdState.INITIALIZED and vm.hkid in host.keyids.allocated
    assert len(vm.tdcs) == TDCS_NR_PAGES and vm.tdr is not None
    assert host.free_frames == free0 - 1 - TDCS_NR_PAGES
    assert host.keyids.nr_configured == 1
    assert seamcalls(host, Leaf.TDH_MNG_KEY_CONFIG) == host.nr_packages
    assert seamcalls(host, Leaf.TDH_MNG_ADDCX) == TDCS_NR_PAGES
    assert vm.tsc_multiplier == 1 << 48 and vm.last_hw_error == 0
    cpuid = vm.get_cpuid()
    assert any(e.function == 0x80000008 and (e.eax >> 16) & 0xFF == 48 for e in cpuid)
    caps = vm.capabilities()
    assert caps.supported_attrs == int(TdAttr.SEPT_VE_DISABLE) and caps.supported_xfam == TD_XFAM_SUPPORTED


def test_init_vm_gpaw52_uses_5_level_ept(td):
    host, kvm, vm = td
    vm.init_vm(gpaw=52)
    assert host.tdx.td(vm.tdr).params.eptp_levels == 5


# (kwargs, errno, message fragment) in upstream order
BAD_INIT = [
    (dict(hw_error=1), errno.EINVAL, "hw_error"),
    (dict(flags=1), errno.EINVAL, "flags"),
    (dict(cpuid=[CpuidEntry(i) for i in range(257)]), errno.E2BIG, "nent"),
    (dict(reserved=[0, 1]), errno.EINVAL, "reserved"),
    (dict(cpuid_padding=1), errno.EINVAL, "padding"),
    (dict(cpuid=[CpuidEntry(1, padding=(0, 1, 0))]), errno.EINVAL, "padding"),
    (dict(attributes=int(TdAttr.DEBUG)), errno.EINVAL, "attributes"),
    (dict(xfam=1 << 40), errno.EINVAL, "xfam"),
    (dict(gpaw=50), errno.EINVAL, "GPAW"),
]


@pytest.mark.parametrize("kw,err,frag", BAD_INIT, ids=[b[2] + str(i) for i, b in enumerate(BAD_INIT)])
def test_init_vm_bad_input_changes_nothing(td, kw, err, frag):
    host, kvm, vm = td
    free0, hk0, sb0, mod0 = host.free_frames, host.keyids.allocated, vm.state_bytes(), host.tdx.state_bytes()
    with pytest.raises(KvmError, match=frag) as ei:
        vm.init_vm(**kw)
    assert vm.state_bytes() == sb0 and host.tdx.state_bytes() == mod0
    assert ei.value.errno == err and vm.td_state is TdState.UNINITIALIZED and vm.hkid is None
    assert host.free_frames == free0 and host.keyids.allocated == hk0
    assert seamcalls(host, Leaf.TDH_MNG_CREATE) == 0
    vm.init_vm()       # the VM is still usable
    assert vm.td_state is TdState.INITIALIZED


def test_init_vm_precedence(td):
    host, kvm, vm = td
    # hw_error (tdx_vm_ioctl) before flags before E2BIG before reserved before attributes before GPAW
    with pytest.raises(KvmError, match="hw_error"):
        vm.init_vm(hw_error=1, flags=1, gpaw=50)
    with pytest.raises(KvmError, match="flags"):
        vm.init_vm(flags=1, cpuid=[CpuidEntry(0)] * 257)
    with pytest.raises(KvmError) as ei:
        vm.init_vm(cpuid=[CpuidEntry(0, padding=(1, 0, 0))] * 257, reserved=[1])
    assert ei.value.errno == errno.E2BIG
    with pytest.raises(KvmError, match="reserved"):
        vm.init_vm(reserved=[1], attributes=1, gpaw=50)
    with pytest.raises(KvmError, match="attributes"):
        vm.init_vm(attributes=1, xfam=1 << 40, gpaw=50)
    with pytest.raises(KvmError, match="xfam"):
        vm.init_vm(xfam=1 << 40, gpaw=50)


def test_init_vm_twice_is_einval_state_first(td):
    host, kvm, vm = td
    vm.init_vm()
    vm.create_vcpu(0)
    with pytest.raises(KvmError, match="state") as ei:
        vm.init_vm(flags=1)          # the state check runs before flags (and before EBUSY)
    assert ei.value.errno == errno.EINVAL


def test_init_vm_python_type_errors(td):
    host, kvm, vm = td
    with pytest.raises(TdxTypeError):
        vm.init_vm(cpuid=[(1, 0)])
    with pytest.raises(TdxValueError):
        vm.init_vm(reserved=[0] * 13)
    with pytest.raises(TdxValueError):
        vm.init_vm(attributes=-1)


def test_init_vm_hkid_exhausted_enospc():
    host = make_host(tdx_keyids=2)        # the global KeyID + 1 guest HKID
    _, kvm, vm1 = new_td(host)
    vm1.init_vm()
    vm2 = kvm.create_vm(VmType.TDX)
    free0 = host.free_frames
    with pytest.raises(KvmError) as ei:
        vm2.init_vm()
    assert ei.value.errno == errno.ENOSPC and host.free_frames == free0 and vm2.hkid is None


def test_init_vm_package_without_online_cpu_eio():
    host = make_host()
    _, kvm, vm = new_td(host)
    host.cpu_offline(2)
    host.cpu_offline(3)
    free0, nfree = host.free_frames, host.keyids.nr_free
    with pytest.raises(KvmError) as ei:
        vm.init_vm()
    assert ei.value.errno == errno.EIO and host.free_frames == free0 and host.keyids.nr_free == nfree
    assert seamcalls(host, Leaf.TDH_MNG_CREATE) == 0 and not vm.is_bugged


def _nth(n):
    """A ``match`` that fires on the n-th matching call (1-based) only."""
    seen = [0]

    def m(call):
        seen[0] += 1
        return seen[0] == n
    return m


# (leaf, status, count, nth call, errno, hw_error?, bugged?)
INIT_INJECT = [
    (Leaf.TDH_MNG_CREATE, TDX_RND_NO_ENTROPY, 10, None, errno.EAGAIN, False, False),
    (Leaf.TDH_MNG_CREATE, TDX_HKID_NOT_FREE, 1, None, errno.EIO, False, False),
    (Leaf.TDH_MNG_CREATE, TDX_OPERAND_BUSY | OPERAND_ID_KOT, 1, None, errno.EIO, False, False),
    (Leaf.TDH_MNG_KEY_CONFIG, TDX_OPERAND_BUSY | OPERAND_ID_KET, 1, None, errno.EIO, False, True),
    (Leaf.TDH_MNG_KEY_CONFIG, TDX_OPERAND_BUSY | OPERAND_ID_KET, 1, 2, errno.EIO, False, True),
    (Leaf.TDH_MNG_ADDCX, TDX_RND_NO_ENTROPY, 10, None, errno.EAGAIN, False, False),
    (Leaf.TDH_MNG_ADDCX, TDX_TDCX_NUM_INCORRECT, 1, 3, errno.EIO, False, False),
    (Leaf.TDH_MNG_ADDCX, TDX_OPERAND_BUSY | OPERAND_ID_RCX, 1, TDCS_NR_PAGES, errno.EIO, False, False),
    (Leaf.TDH_MNG_INIT, TDX_OPERAND_INVALID | OPERAND_ID_ATTRIBUTES, 1, None, errno.EINVAL, True, False),
    (Leaf.TDH_MNG_INIT, TDX_SYS_NOT_READY, 1, None, errno.EIO, False, False),
]


@pytest.mark.parametrize("leaf,status,count,nth,err,hw,bugged", INIT_INJECT,
                         ids=[f"{c[0].name}-{c[1]:#x}-{c[3]}" for c in INIT_INJECT])
def test_init_vm_injection_cleans_up(leaf, status, count, nth, err, hw, bugged):
    host, kvm, vm = new_td()
    free0, nfree = host.free_frames, host.keyids.nr_free
    host.tdx.inject(leaf, status, count=count, match=None if nth is None else _nth(nth))
    with pytest.raises(KvmError) as ei:
        vm.init_vm()
    assert ei.value.errno == err
    assert ei.value.hw_error == (status if hw else 0) and vm.last_hw_error == ei.value.hw_error
    assert vm.is_bugged == bugged and vm.td_state is TdState.UNINITIALIZED
    # the full teardown gave everything back: no leak, HKID free, frames exact
    assert host.leaks == () and vm.leaks == ()
    assert host.free_frames == free0 and host.keyids.nr_free == nfree and host.keyids.nr_configured == 0
    assert vm.hkid is None and vm.tdr is None and vm.tdcs == []
    assert host.tdx.tds == {}
    assert seamcalls(host, Leaf.TDH_MNG_KEY_FREEID) == (0 if leaf == Leaf.TDH_MNG_CREATE else 1)
    check_invariants(host)
    vm.close()
    assert host.free_frames == free0


def test_init_vm_sc_retry_absorbs_nine_entropy_failures():
    host, kvm, vm = new_td()
    host.tdx.inject(Leaf.TDH_MNG_CREATE, TDX_RND_NO_ENTROPY, count=9)
    vm.init_vm()
    assert vm.td_state is TdState.INITIALIZED and seamcalls(host, Leaf.TDH_MNG_CREATE) == 10


def test_init_vm_mng_init_operand_invalid_hw_error_value():
    host, kvm, vm = new_td()
    host.tdx.inject(Leaf.TDH_MNG_INIT, TDX_OPERAND_INVALID | OPERAND_ID_ATTRIBUTES)
    with pytest.raises(KvmError) as ei:
        vm.init_vm()
    assert ei.value.hw_error == 0xC000010000000040
    for lf in (Leaf.TDH_MNG_VPFLUSHDONE, Leaf.TDH_PHYMEM_CACHE_WB, Leaf.TDH_MNG_KEY_FREEID):
        assert seamcalls(host, lf) >= 1
    assert seamcalls(host, Leaf.TDH_PHYMEM_PAGE_RECLAIM) == 1 + TDCS_NR_PAGES
    vm.init_vm()            # state stayed UNINITIALIZED: userspace may retry
    assert vm.td_state is TdState.INITIALIZED


def test_init_failure_with_teardown_leak_is_recorded():
    host, kvm, vm = new_td()
    free0, nfree = host.free_frames, host.keyids.nr_free
    host.tdx.inject(Leaf.TDH_MNG_INIT, TDX_SYS_NOT_READY)
    host.tdx.inject(Leaf.TDH_MNG_KEY_FREEID, TDX_OPERAND_BUSY | OPERAND_ID_KOT)
    with pytest.raises(KvmError) as ei:
        vm.init_vm()
    assert ei.value.errno == errno.EIO and vm.is_bugged
    whats = sorted(lk.what for lk in vm.leaks)
    assert whats == sorted(["hkid", "tdr"] + ["tdcs"] * TDCS_NR_PAGES)
    assert host.free_frames + page_leaks(host) == free0 and host.keyids.nr_free == nfree - 1
    assert host.leaks[0].event_index == vm.leaks[0].event_index
    with pytest.raises(KvmError) as ei:     # KVM_BUG: the VM is dead
        vm.init_vm()
    assert ei.value.errno == errno.EIO
    vm.close()
    assert host.free_frames + page_leaks(host) == free0 and len(vm.leaks) == 2 + TDCS_NR_PAGES


def test_frames_exact_after_enomem(monkeypatch):
    host, kvm, vm = new_td()
    free0 = host.free_frames
    real = host.alloc_frame
    calls = [0]

    def flaky():
        calls[0] += 1
        if calls[0] == 4:
            from tdxcore.errors import HostError
            raise HostError(errno.ENOMEM, "out of frames")
        return real()
    monkeypatch.setattr(host, "alloc_frame", flaky)
    with pytest.raises(KvmError) as ei:
        vm.init_vm()
    assert ei.value.errno == errno.ENOMEM and host.free_frames == free0 and vm.hkid is None
