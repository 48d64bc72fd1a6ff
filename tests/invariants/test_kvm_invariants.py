"""KVM-layer invariants (I16, I21, I20kvm): clean TDs pass; one deliberate break each is reported
with exactly that id, a frame where there is one, an event index and a replay hint."""

from __future__ import annotations

import pytest

import tdxcore.invariants.kvm  # noqa: F401  (registers the KVM invariants)
from tdxcore.errors import InvariantViolation
from tdxcore.invariants import check_invariants, invariant_ids
from tdxcore.kvm import TdState
from tdxcore.module.td import TdLifecycle
from tests.kvm.test_tdx_teardown import full_td


def only(host, inv, pfn=None):
    with pytest.raises(InvariantViolation) as ei:
        check_invariants(host)
    e = ei.value
    assert e.invariant == inv, str(e)
    if pfn is not None:
        assert e.pfn == pfn, str(e)
    assert e.event_index is not None and e.replay and f"seed={host.seed}" in e.replay
    others = [i for i in invariant_ids() if i != inv]
    check_invariants(host, others)


def test_kvm_invariants_registered_and_clean():
    assert {"I16", "I21", "I20kvm"} <= set(invariant_ids("kvm"))
    host, kvm, vm, _ = full_td()
    check_invariants(host)
    vm.close()
    check_invariants(host)


def test_i16_page_reclaimed_while_hkid_assigned(monkeypatch):
    host, kvm, vm, _ = full_td()
    victim = vm.tdcs[1]
    td = host.tdx.td(vm.tdr)
    # mutation: a module whose RECLAIM skips the lifecycle rule, driven while the HKID is assigned
    monkeypatch.setattr(td, "lifecycle", TdLifecycle.TEARDOWN)
    assert host.tdx.tdh_phymem_page_reclaim(victim).status == 0
    monkeypatch.setattr(td, "lifecycle", TdLifecycle.KEYS_CONFIGURED)
    with pytest.raises(InvariantViolation) as ei:
        check_invariants(host, ["I16"])
    assert ei.value.invariant == "I16" and ei.value.pfn == victim


def test_i21_kvm_state_ahead_of_module():
    host, kvm, vm, _ = full_td(nvcpu=1)
    # mutation: KVM says RUNNABLE... then goes back (skipped teardown reset)
    check_invariants(host, ["I21"])
    vm.td_state = TdState.INITIALIZED           # module is RUNNABLE: inconsistent and not monotonic
    only(host, "I21")


def test_i21_vcpu_on_uninitialized_td():
    host, kvm, vm, _ = full_td(nvcpu=1)
    check_invariants(host, ["I21"])
    vm.td_state = TdState.RUNNABLE
    vm.vcpus[0].tdvpr = None                   # mutation: an INITIALIZED vCPU with no module vCPU
    only(host, "I21")


def test_i20kvm_package_not_configured():
    host, kvm, vm, _ = full_td(nvcpu=1)
    td = host.tdx.td(vm.tdr)
    # mutation: a TD that came up with KEY.CONFIG skipped on package 1 (as if it had no online CPU)
    td.pkg_configured.discard(1)
    td.lifecycle = TdLifecycle.HKID_ASSIGNED
    only(host, "I20kvm", pfn=vm.tdr)
