"""A TD built with ``helpers.td_create`` runs to HLT on every vCPU, then is destroyed leak-free.

Modelled on the upstream selftest ``tools/testing/selftests/kvm/x86/tdx_vm_test`` (``verify_td_lifecycle``:
create, run each vCPU to its first exit, destroy) on Linux 6.18 (SPEC §3.2, §3.3).
"""

from __future__ import annotations

import pytest

from tdxcore import guest
from tdxcore.constants import ExitReason
from tdxcore.invariants import check_invariants
from tdxcore.kvm import Kvm, helpers
from tdxcore.module.host import Host
from tdxcore.status import Leaf  # type: ignore[attr-defined]

BASE = 4 << 30


@pytest.mark.parametrize("nr_vcpus", [1, 4])
def test_td_runs_to_hlt_on_each_vcpu_then_destroys_without_leaks(nr_vcpus):
    host = Host(packages=2, cpus_per_package=2, memory=32 << 20)
    kvm = Kvm(host)
    helpers.td_create(kvm, memory=16 << 10).close()        # enables the module (PAMT etc.) once
    free0, nfree0 = host.free_frames, host.keyids.nr_free

    td = helpers.td_create(kvm, vcpus=nr_vcpus, memory=256 << 10, initial_pages=4)
    n0 = len(host.events)
    for i, v in enumerate(td.vcpus):
        run = helpers.vcpu_run_until_hlt(v, [guest.write(BASE + 8 * i, 0x1000 + i), guest.read(BASE + 8 * i),
                                             guest.hlt()])
        assert run.exit_reason == ExitReason.HLT and run.ret == 0
        assert [e.index for e in v.guest_log] == [0, 1, 2] and v.guest_log[1].value == 0x1000 + i
        assert helpers.vcpu_run_until_hlt(v).exit_reason == ExitReason.HLT   # empty queue: HLT again
    ends = [e[1][2] for e in host.events.filter(kind="seamcall_end") if e[0] >= n0]
    assert ends == [Leaf.TDH_VP_ENTER] * (2 * nr_vcpus)
    check_invariants(host)

    vm = td.vm
    n1 = len(host.events)
    td.close()
    assert vm.is_destroyed and vm.leaks == () and host.leaks == ()
    ends = [e[1][2] for e in host.events.filter(kind="seamcall_end") if e[0] >= n1]
    assert ends.count(Leaf.TDH_VP_FLUSH) == nr_vcpus       # every vCPU was associated by its entry
    assert host.free_frames == free0 and host.keyids.nr_free == nfree0 and host.keyids.allocated == ()
    check_invariants(host)
