"""KVM-layer invariants (I16, I21, I20kvm, I17, S6ckvm) and their mutation tests.

Clean TDs pass; one deliberate break each is reported with exactly that id, a frame where there
is one, an event index and a replay hint.
"""

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
    assert {"I16", "I21", "I20kvm", "I17", "S6ckvm"} <= set(invariant_ids("kvm"))
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


# ---------------------------------------------------------------------------------- I17, S6ckvm
def _mem_td(erratum=False, pages=4, terminate=False):
    """Build a RUNNABLE TD with ``pages`` private pages, checked once while alive; (host, td, free0)."""
    from tdxcore.constants import VmType
    from tdxcore.kvm import Kvm
    from tdxcore.kvm.helpers import td_create
    from tdxcore.module.host import Host

    host = Host(packages=2, cpus_per_package=2, memory=32 << 20, cpu_erratum_pw_mce=erratum)
    kvm = Kvm(host, terminate_vm=terminate)
    kvm.create_vm(VmType.TDX).close()
    free0 = host.free_frames
    td = td_create(kvm, vcpus=1, memory=2 << 20, initial_pages=pages, measure=False)
    check_invariants(host)
    return host, td, free0


def _close_mem(td):
    for v in td.vcpus:
        v.close()
    td.gmem.close()


def _fake_wbinvd(monkeypatch, host, skip):
    """Mutation: a PAGE.WBINVD that reports success without running when ``skip(keyid)``."""
    from tdxcore.module.tdx_module import result
    from tdxcore.status import TDX_SUCCESS

    real = host.tdx.tdh_phymem_page_wbinvd

    def wbinvd(page, keyid, **kw):
        return result(TDX_SUCCESS) if skip(keyid) else real(page, keyid, **kw)
    monkeypatch.setattr(host.tdx, "tdh_phymem_page_wbinvd", wbinvd)


def test_clean_memory_td_both_paths_pass_i17_s6ckvm():
    for terminate in (False, True):
        for erratum in (False, True):
            host, td, free0 = _mem_td(erratum=erratum, terminate=terminate)
            if terminate:
                td.vm.terminate_vm()
            _close_mem(td)
            check_invariants(host)
            td.vm.close()
            check_invariants(host)
            assert host.free_frames == free0


def test_i17_private_page_freed_without_wbinvd(monkeypatch):
    host, td, _ = _mem_td()
    victim = td.vm.mmu.leaves[0][1]
    hkid = td.vm.hkid
    _fake_wbinvd(monkeypatch, host, lambda k: k == hkid)   # the zap "forgets" its write-back
    _close_mem(td)                                          # pages go back while the HKID is live
    only(host, "I17", pfn=victim)


def test_i17_tdr_freed_without_global_keyid_wbinvd(monkeypatch):
    host, td, _ = _mem_td()
    tdr = td.vm.tdr
    _fake_wbinvd(monkeypatch, host, lambda k: k == host.keyids.global_keyid)
    td.close()
    only(host, "I17", pfn=tdr)


def test_i17_erratum_host_page_freed_without_reset(monkeypatch):
    host, td, _ = _mem_td(erratum=True, terminate=True)
    victim = td.vm.mmu.leaves[1][1]
    real = host.frame_clear
    monkeypatch.setattr(host, "frame_clear", lambda pfn: None if pfn == victim else real(pfn))
    td.vm.terminate_vm()
    _close_mem(td)                                          # RECLAIM, then the reset is skipped
    only(host, "I17", pfn=victim)


def test_s6ckvm_control_page_lost_in_teardown(monkeypatch):
    host, td, _ = _mem_td()
    victim = td.vm.tdcs[1]
    real = host.free_frame
    # mutation: teardown reclaims the TDCS page but neither frees nor records it as leaked
    monkeypatch.setattr(host, "free_frame", lambda pfn: None if pfn == victim else real(pfn))
    td.close()
    only(host, "S6ckvm", pfn=victim)


def test_s6ckvm_hkid_kept_without_leak_record(monkeypatch):
    host, td, _ = _mem_td()
    hkid = td.vm.hkid
    # mutation: KEY.FREEID succeeds but KVM never gives the HKID back (and records no leak)
    monkeypatch.setattr(host.keyids, "free", lambda k: None)
    td.close()
    assert hkid in host.keyids.allocated
    only(host, "S6ckvm")


def test_s6ckvm_balance_without_a_live_check(monkeypatch):
    host, td, _ = _mem_td()
    # a TD never seen alive by a check: only the exact balance can notice a lost frame
    from tdxcore.invariants import kvm as kinv
    kinv._HELD.pop(host, None)
    victim = td.vcpus[0].tdvpr
    real = host.free_frame
    monkeypatch.setattr(host, "free_frame", lambda pfn: None if pfn == victim else real(pfn))
    td.close()
    only(host, "S6ckvm")
