"""KVM_TDX_INIT_MEM_REGION (tdx-facts §5.5; linux-6.18.md §2): gmem populate → mirror map (SEPT.ADD
for missing levels, ``nr_premapped``) → PAGE.ADD → 16 × MR.EXTEND when measured; every errno in
upstream order, progress written back on error, and FINALIZE refusing while ``nr_premapped`` ≠ 0."""

from __future__ import annotations

import errno

import pytest

from tdxcore.constants import MemAttr, PAGE_SIZE, MemFlag, VmType
from tdxcore.errors import KvmError, TdxTypeError
from tdxcore.invariants import check_invariants
from tdxcore.kvm import Kvm
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    OPERAND_ID_RDX,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_INVALID,
    Leaf,
)
from tests.kvm.test_tdx_vm_init import make_host, new_td, page_leaks, seamcalls

BASE = 4 << 30
MEM = 1 << 20


def td_with_slot(host=None, nvcpu=1, erratum=False, size=MEM):
    """An INITIALIZED TD with a GUEST_MEMFD memslot at BASE and ``nvcpu`` initialized vCPUs.

    Returns (host, kvm, vm, gmem, vcpus, free0)
    free0 is taken before INIT_VM.
    """
    host = host or make_host(cpu_erratum_pw_mce=erratum)
    host, kvm, vm = new_td(host)
    free0 = host.free_frames
    vm.init_vm(gpaw=48)
    gmem = vm.create_guest_memfd(size=size)
    vm.set_user_memory_region2(slot=0, flags=MemFlag.GUEST_MEMFD, guest_phys_addr=BASE, memory_size=size,
                               userspace_addr=host.mmap(size), guest_memfd=gmem, guest_memfd_offset=0)
    vm.set_memory_attributes(BASE, size, MemAttr.PRIVATE)
    vcpus = [vm.create_vcpu(i) for i in range(nvcpu)]
    for v in vcpus:
        v.init_vcpu()
    return host, kvm, vm, gmem, vcpus, free0


def src(n):
    return b"".join(bytes([i + 1]) * PAGE_SIZE for i in range(n))


def leaves_since(host, n0):
    return [e[1][2] for e in host.events.filter(kind="seamcall_end") if e[0] >= n0]


@pytest.mark.parametrize("measure", [True, False])
def test_populate_order_and_state(measure):
    host, kvm, vm, gmem, (v,), free0 = td_with_slot()
    n0 = len(host.events)
    r = v.init_mem_region(source=src(3), gpa=BASE, nr_pages=3, measure=measure)
    assert r == v.mem_region and r.nr_pages == 0
    assert r.gpa == BASE + 3 * PAGE_SIZE and r.source_offset == 3 * PAGE_SIZE
    ext = [Leaf.TDH_MR_EXTEND] * (16 if measure else 0)
    # first page links the three missing levels (512G, 1G, 2M tables), the others only ADD
    assert leaves_since(host, n0) == ([Leaf.TDH_MEM_SEPT_ADD] * 3 + [Leaf.TDH_MEM_PAGE_ADD] + ext
                                      + ([Leaf.TDH_MEM_PAGE_ADD] + ext) * 2)
    assert vm.nr_premapped == 0 and len(vm.mmu.leaves) == 3 and len(vm.mmu.nonleaf) == 3
    assert [lv for lv, _, _ in vm.mmu.nonleaf] == [4, 3, 2]
    sept = host.tdx.td(vm.tdr).sept
    for i, (gfn, pfn) in enumerate(vm.mmu.leaves):
        assert gfn == (BASE >> 12) + i and gmem.pfn_of(i) == pfn
        assert sept.walk(gfn << 12)[2] is not None
    vm.finalize_vm()
    check_invariants(host)
    v.close()
    gmem.close()
    vm.close()
    assert vm.leaks == () and host.free_frames == free0


def test_measure_changes_mrtd_and_content_is_copied():
    mr = []
    for measure in (True, False):
        host, kvm, vm, gmem, (v,), _ = td_with_slot()
        v.init_mem_region(source=src(1), gpa=BASE, nr_pages=1, measure=measure)
        mr.append(host.tdx.td(vm.tdr).mrtd_now())
        pfn = gmem.pfn_of(0)
        assert host.frame_read(pfn, 0, 4, vm.hkid) == b"\x01" * 4       # encrypted copy, TD key
        assert host.frame_read(pfn, 0, 4, 0) != b"\x01" * 4             # host sees scramble
    assert mr[0] != mr[1]


def _err(fn, code):
    with pytest.raises(KvmError) as ei:
        fn()
    assert ei.value.errno == code, ei.value
    return ei.value


@pytest.mark.parametrize("kw, match", [
    (dict(gpa=BASE + 1), "not page aligned"),
    (dict(nr_pages=0), "nr_pages is 0"),
    (dict(gpa=(1 << 64) - PAGE_SIZE, nr_pages=2), "overflows"),
    (dict(gpa=BASE | (1 << 47)), "not all private"),
    (dict(gpa=(1 << 47) - PAGE_SIZE, nr_pages=2), "not all private"),        # last page shared
])
def test_region_einval_nothing_changed(kw, match):
    host, kvm, vm, gmem, (v,), _ = td_with_slot()
    args = dict(source=src(2), gpa=BASE, nr_pages=1)
    args.update(kw)
    n0 = len(host.events.filter(kind="seamcall_end"))
    e = _err(lambda: v.init_mem_region(**args), errno.EINVAL)
    assert match in str(e)
    assert len(host.events.filter(kind="seamcall_end")) == n0 and vm.nr_premapped == 0


def test_state_errors_in_order():
    host, kvm, vm, gmem, (v,), _ = td_with_slot()
    u = vm.create_vcpu(1)
    # vCPU not initialized
    assert "not initialized" in str(_err(lambda: u.init_mem_region(source=src(1), gpa=BASE, nr_pages=1),
                                         errno.EINVAL))
    # hw_error before the vCPU state
    assert "hw_error" in str(_err(lambda: u.init_mem_region(source=src(1), gpa=BASE + 1, nr_pages=1,
                                                            hw_error=1), errno.EINVAL))
    u.init_vcpu()
    vm.finalize_vm()
    # RUNNABLE wins over a bad gpa
    assert "finalized" in str(_err(lambda: v.init_mem_region(source=src(1), gpa=BASE + 1, nr_pages=1),
                                   errno.EINVAL))
    with pytest.raises(TdxTypeError):
        v.init_mem_region(source="x", gpa=BASE, nr_pages=1)
    with pytest.raises(TdxTypeError):
        v.init_mem_region(source=src(1), gpa=BASE, nr_pages=1, measure=1)


def test_populate_errors_and_progress_written_back():
    host, kvm, vm, gmem, (v,), free0 = td_with_slot()
    # page 2 past the memslot: EINVAL after two pages were added; progress written back
    last = BASE + MEM - 2 * PAGE_SIZE
    e = _err(lambda: v.init_mem_region(source=src(3), gpa=last, nr_pages=3), errno.EINVAL)
    assert "not in a guest_memfd memslot" in str(e)
    assert v.mem_region == (2 * PAGE_SIZE, BASE + MEM, 1)
    # already populated → EEXIST, nothing added
    n0 = seamcalls(host, Leaf.TDH_MEM_PAGE_ADD)
    _err(lambda: v.init_mem_region(source=src(1), gpa=last, nr_pages=1), errno.EEXIST)
    assert seamcalls(host, Leaf.TDH_MEM_PAGE_ADD) == n0 and v.mem_region == (0, last, 1)
    # a short source faults on the missing page
    _err(lambda: v.init_mem_region(source=src(1), gpa=BASE, nr_pages=2), errno.EFAULT)
    assert v.mem_region == (PAGE_SIZE, BASE + PAGE_SIZE, 1)
    assert vm.nr_premapped == 0
    vm.finalize_vm()
    v.close()
    gmem.close()
    vm.close()
    assert vm.leaks == () and host.free_frames == free0


def test_slot_without_guest_memfd_is_einval():
    host, kvm, vm, gmem, (v,), _ = td_with_slot()
    vm.set_user_memory_region2(slot=1, flags=0, guest_phys_addr=8 << 30, memory_size=MEM,
                               userspace_addr=host.mmap(MEM))
    _err(lambda: v.init_mem_region(source=src(1), gpa=8 << 30, nr_pages=1), errno.EINVAL)


def test_closed_guest_memfd_is_efault():
    host, kvm, vm, gmem, (v,), _ = td_with_slot()
    gmem.close()
    _err(lambda: v.init_mem_region(source=src(1), gpa=BASE, nr_pages=1), errno.EFAULT)


def test_sept_add_busy_is_retried_by_the_map_loop():
    host, kvm, vm, gmem, (v,), _ = td_with_slot()
    host.tdx.inject(Leaf.TDH_MEM_SEPT_ADD, TDX_OPERAND_BUSY | OPERAND_ID_RCX, count=1)
    n0 = host.free_frames
    v.init_mem_region(source=src(1), gpa=BASE, nr_pages=1)
    assert seamcalls(host, Leaf.TDH_MEM_SEPT_ADD) == 4 and len(vm.mmu.nonleaf) == 3
    assert n0 - host.free_frames == 3 + 1      # 3 S-EPT + the gmem page; the BUSY try's went back


@pytest.mark.parametrize("status, code", [(TDX_OPERAND_BUSY | OPERAND_ID_RDX, errno.EBUSY),
                                          (TDX_OPERAND_INVALID | OPERAND_ID_RCX, errno.EIO)])
def test_page_add_failure_leaves_premapped_finalize_refuses_teardown_handles(status, code):
    host, kvm, vm, gmem, (v,), free0 = td_with_slot()
    host.tdx.inject(Leaf.TDH_MEM_PAGE_ADD, status, count=1)
    _err(lambda: v.init_mem_region(source=src(2), gpa=BASE, nr_pages=2), code)
    assert vm.nr_premapped == 1 and v.mem_region == (0, BASE, 2) and not vm.is_bugged
    e = _err(vm.finalize_vm, errno.EINVAL)
    assert "pre-mapped" in str(e)
    n0 = len(host.events)
    v.close()
    gmem.close()
    vm.close()
    # the premapped-never-ADDed page: BLOCK answers EPT_ENTRY_STATE_INCORRECT|RCX → premap case
    assert leaves_since(host, n0)[0] == Leaf.TDH_MEM_RANGE_BLOCK
    assert Leaf.TDH_MEM_PAGE_REMOVE not in leaves_since(host, n0)
    assert vm.nr_premapped == 0 and not vm.is_bugged and vm.leaks == ()
    assert host.free_frames == free0 and page_leaks(host) == 0


def test_retry_after_page_add_failure_adds_the_premapped_page():
    host, kvm, vm, gmem, (v,), free0 = td_with_slot()
    host.tdx.inject(Leaf.TDH_MEM_PAGE_ADD, TDX_OPERAND_BUSY | OPERAND_ID_RDX, count=1)
    _err(lambda: v.init_mem_region(source=src(1), gpa=BASE, nr_pages=1), errno.EBUSY)
    v.init_mem_region(source=src(1), gpa=BASE, nr_pages=1)
    assert vm.nr_premapped == 0
    vm.finalize_vm()
    v.close()
    gmem.close()
    vm.close()
    assert vm.leaks == () and host.free_frames == free0


def test_default_vm_has_no_init_mem_region():
    host = make_host()
    vm = Kvm(host).create_vm(VmType.DEFAULT)
    assert not hasattr(vm, "mmu")


def test_mr_extend_failure_is_eio_after_the_add():
    host, kvm, vm, gmem, (v,), free0 = td_with_slot()
    host.tdx.inject(Leaf.TDH_MR_EXTEND, TDX_OPERAND_INVALID | OPERAND_ID_RCX, count=1)
    _err(lambda: v.init_mem_region(source=src(1), gpa=BASE, nr_pages=1), errno.EIO)
    assert vm.nr_premapped == 0 and seamcalls(host, Leaf.TDH_MR_EXTEND) == 1 and v.mem_region == (0, BASE, 1)
    v.close()
    gmem.close()
    vm.close()
    assert vm.leaks == () and host.free_frames == free0
