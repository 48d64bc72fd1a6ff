"""Lifecycle cycles (issue 5): create → populate → finalize → destroy, many times on one host.

Each cycle builds a RUNNABLE TD with initial private memory (KVM_TDX_INIT_MEM_REGION, measured)
through the selftest-style helper, then drops every reference; odd cycles tear down through the
opt-in KVM_TDX_TERMINATE_VM first. After every cycle the HKIDs and the free frames are back at
their start values and nothing leaked; the invariants run every few cycles and at the end.
"""

from __future__ import annotations

import pytest

from tdxcore.constants import VmType
from tdxcore.invariants import check_invariants
from tdxcore.invariants.kvm import frame_balance
from tdxcore.kvm import Kvm
from tdxcore.kvm.helpers import td_create
from tdxcore.module.host import Host

PAGES = 3


def _cycles(n, check_every=10):
    host = Host(packages=2, cpus_per_package=2, memory=32 << 20, seed=7)
    kvm = Kvm(host, terminate_vm=True)
    kvm.create_vm(VmType.TDX).close()          # enable the module outside the measured window
    free0, hkids0 = host.free_frames, host.keyids.nr_free
    hkids_seen = set()
    for i in range(n):
        td = td_create(kvm, vcpus=1 + i % 2, memory=1 << 20, initial_pages=PAGES, measure=i % 3 == 0)
        vm = td.vm
        hkids_seen.add(vm.hkid)
        assert len(vm.mmu.leaves) == PAGES and host.keyids.nr_free == hkids0 - 1
        if i % check_every == 0:
            check_invariants(host)
        if i % 2:
            vm.terminate_vm()
        td.close()
        assert vm.is_destroyed and vm.leaks == ()
        assert host.free_frames == free0 and host.keyids.nr_free == hkids0, f"cycle {i}"
    assert host.leaks == () and host.vms == () and host.tdx.tds == {} and host.keyids.allocated == ()
    assert hkids_seen == {min(hkids_seen)}      # the lowest HKID is handed out again every time
    free, owned, leaked, total = frame_balance(host)
    assert leaked == 0 and free + owned == total
    check_invariants(host)


def test_100_cycles_hkids_and_frames_return():
    _cycles(100)


@pytest.mark.slow
def test_1000_cycles_hkids_and_frames_return():
    _cycles(1000, check_every=100)
