"""Selftest-style helpers (SPEC §3.2 Helpers, issue 5 item 8): a RUNNABLE TD in one call."""

from __future__ import annotations

import errno

import pytest

import tdxcore as tdx
from tdxcore import guest
from tdxcore.constants import PAGE_SIZE, TDVPS_NR_PAGES, ExitReason, VmType
from tdxcore.errors import KvmError, TdxTypeError, TdxValueError
from tdxcore.kvm import Kvm, TdState, helpers
from tdxcore.kvm.helpers import InitialRegion, UnexpectedExit
from tdxcore.module.host import Host
from tdxcore.status import Leaf  # type: ignore[attr-defined]

BASE = 4 << 30


@pytest.fixture
def host():
    return Host(packages=2, cpus_per_package=2, memory=32 << 20)


def _leaves(host, since):
    return [e[1][2] for e in host.events.filter(kind="seamcall_end") if e[0] >= since]


def test_facade_exports():
    assert tdx.helpers is helpers and tdx.Kvm is Kvm
    assert callable(helpers.vm_set_memory_attributes) and callable(helpers.handle_memory_conversion)


def test_td_create_builds_a_runnable_td_in_upstream_order(host):
    n0 = len(host.events)
    td = helpers.td_create(Kvm(host), vcpus=2, memory=64 << 10, initial_pages=2)
    vm, vcpus, gmem = td
    assert vm.td_state == TdState.RUNNABLE and [v.vcpu_id for v in vcpus] == [0, 1]
    assert gmem is not None and gmem.size == 64 << 10 and vm.split_irqchip_pins == helpers.SPLIT_IRQCHIP_PINS
    assert len(vm.mmu.leaves) == 2
    ls = _leaves(host, n0)
    assert ls.index(Leaf.TDH_MNG_CREATE) < ls.index(Leaf.TDH_MNG_INIT) < ls.index(Leaf.TDH_VP_CREATE)
    assert ls.count(Leaf.TDH_VP_CREATE) == 2 and ls.count(Leaf.TDH_VP_ADDCX) == 2 * (TDVPS_NR_PAGES - 1)
    assert ls.count(Leaf.TDH_MEM_PAGE_ADD) == 2 and ls.count(Leaf.TDH_MR_EXTEND) == 2 * 16
    assert ls.index(Leaf.TDH_VP_INIT) < ls.index(Leaf.TDH_MEM_PAGE_ADD) and ls[-1] == Leaf.TDH_MR_FINALIZE
    td.close()
    assert vm.is_destroyed and host.leaks == ()


def test_td_create_options(host):
    kvm = Kvm(host)
    td = helpers.td_create(kvm, memory=16 << 10, initial_pages=0, measure=False)
    assert td.vm.mmu.leaves == () and td.vm.td_state == TdState.RUNNABLE
    td.close()
    src = bytes([7]) * PAGE_SIZE
    n0 = len(host.events)
    td = helpers.td_create(kvm, memory=16 << 10, measure=False, source=src)
    assert Leaf.TDH_MR_EXTEND not in _leaves(host, n0)
    run = helpers.vcpu_run_until_hlt(td.vcpus[0], [guest.read(BASE, 1)])
    assert run.exit_reason == ExitReason.HLT and td.vcpus[0].guest_log[0].value == 7
    td.close()
    td = helpers.td_create(kvm, memory=16 << 10, private=False, initial_pages=0)
    assert td.gmem is None and td.vm.memslots.gfn_to_memslot(BASE >> 12).gmem is None
    td.close()
    assert host.leaks == ()


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"vcpus": 0}, TdxValueError, "vcpus"),
    ({"memory": 4097}, TdxValueError, "4 KiB aligned"),
    ({"gpa": BASE + 1}, TdxValueError, "4 KiB aligned"),
    ({"private": 1}, TdxTypeError, "private"),
    ({"measure": None}, TdxTypeError, "measure"),
    ({"initial_pages": 5, "memory": 16 << 10}, TdxValueError, "initial_pages"),
    ({"private": False}, TdxValueError, "needs private memory"),
    ({"source": b"x"}, TdxValueError, "source has 1 bytes"),
    ({"source": "x"}, TdxTypeError, "bytes-like"),
])
def test_td_create_bad_arguments_change_nothing(host, kwargs, exc, match):
    kvm = Kvm(host)
    fds0 = kvm.fds.items()
    with pytest.raises(exc, match=match):
        helpers.td_create(kvm, **kwargs)
    assert kvm.fds.items() == fds0 and host.keyids.allocated == ()


def test_td_create_failure_drops_every_reference(host):
    kvm = Kvm(host)
    helpers.td_create(kvm, memory=16 << 10).close()      # the module is enabled on the first TD
    free0 = host.free_frames
    with pytest.raises(KvmError) as ei:                  # too many vCPUs for the host
        helpers.td_create(kvm, vcpus=host.nr_cpus + 1)
    assert ei.value.errno == errno.EINVAL
    assert host.free_frames == free0 and host.keyids.allocated == () and host.leaks == ()


def test_step_by_step_helpers(host):
    kvm = Kvm(host)
    vm = kvm.create_vm(VmType.TDX)
    helpers.td_initialize(vm, gpaw=52)
    assert vm.td_state == TdState.INITIALIZED and vm.gpaw == 52
    gmem = helpers.vm_userspace_mem_region_add(vm, 3, BASE, 8 << 10)
    assert gmem is not None and vm.memslots.gfn_to_memslot(BASE >> 12).gmem is gmem
    with pytest.raises(TdxValueError, match="4 KiB aligned"):
        helpers.vm_userspace_mem_region_add(vm, 4, BASE << 1, 100)
    with pytest.raises(KvmError) as ei:                  # overlapping GPA range: the gmem is dropped
        helpers.vm_userspace_mem_region_add(vm, 4, BASE, 4 << 10)
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(TdxValueError, match="needs a vCPU"):
        helpers.td_finalize(vm, [InitialRegion(BASE, bytes(PAGE_SIZE))])
    v = vm.create_vcpu(0)
    v.init_vcpu()
    with pytest.raises(TdxValueError, match="not a positive number of pages"):
        helpers.td_finalize(vm, [InitialRegion(BASE, b"")])
    helpers.td_finalize(vm, [InitialRegion(BASE, bytes(PAGE_SIZE), False)])
    assert vm.td_state == TdState.RUNNABLE
    with pytest.raises(TdxTypeError, match="TdxVm"):
        helpers.td_initialize(kvm.create_vm(VmType.DEFAULT))  # type: ignore[arg-type]
    for x in (v, gmem, vm):
        x.close()
    assert vm.is_destroyed and host.leaks == ()


def test_vcpu_run_until_hlt_retries_eintr_and_rejects_other_exits(host):
    td = helpers.td_create(Kvm(host), memory=16 << 10)
    v = td.vcpus[0]
    v.raise_signal()
    assert helpers.vcpu_run_until_hlt(v).exit_reason == ExitReason.HLT
    td.vm.wait_for_sept_zap = True
    with pytest.raises(UnexpectedExit, match="INTR"):
        helpers.vcpu_run_until_hlt(v, max_runs=2)
    td.vm.wait_for_sept_zap = False
    with pytest.raises(TdxValueError, match="max_runs"):
        helpers.vcpu_run_until_hlt(v, max_runs=0)
    td.close()
