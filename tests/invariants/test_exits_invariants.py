"""I23 (unknown TDVMCALLs never reach userspace): clean dispatch passes, each break is caught.

Deliberate breaks of the dispatcher - forwarding an unknown leaf to userspace (the NAKed generic
exit), answering it with another status, leaving it pending without any event, and letting a KVM
hypercall other than MAP_GPA_RANGE out - are each reported as I23 and only I23.
"""

from __future__ import annotations

import pytest

from tdxcore import guest
from tdxcore.constants import HC, Cap, ExitReason, TdvmcallStatus
from tdxcore.errors import InvariantViolation
from tdxcore.invariants import check_invariants, invariant_ids
from tdxcore.kvm import Kvm, exits, helpers
from tdxcore.module.host import Host
from tdxcore.sched import run_to_completion

UNKNOWN = 0x10010


def _td():
    host = Host(packages=1, cpus_per_package=2, memory=32 << 20, seed=3)
    td = helpers.td_create(Kvm(host), vcpus=1, memory=1 << 20, initial_pages=1)
    td.vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << HC.MAP_GPA_RANGE)
    return host, td.vcpus[0]


def _dispatch(vcpu, op):
    vcpu._queue.append(op)
    return run_to_completion(exits.handle_tdvmcall(vcpu, op), name="tdvmcall")


def _only_i23(host):
    with pytest.raises(InvariantViolation) as ei:
        check_invariants(host)
    e = ei.value
    assert e.invariant == "I23", str(e)
    assert e.event_index is not None and e.replay and f"seed={host.seed}" in e.replay
    check_invariants(host, [i for i in invariant_ids() if i != "I23"])
    # a broken model stays broken
    with pytest.raises(InvariantViolation):
        check_invariants(host, ["I23"])
    return e


def test_i23_registered_and_clean():
    assert "I23" in invariant_ids("kvm")
    host, vcpu = _td()
    for op in (guest.tdvmcall(UNKNOWN), guest.get_tdvmcall_info(0), guest.tdvmcall(0, r10=5),
               guest.tdvmcall(0x10005, r12=1)):
        assert _dispatch(vcpu, op) is None
    _dispatch(vcpu, guest.map_gpa(0x8000_0000, 0x1000, shared=True))     # a dedicated exit: fine
    check_invariants(host)


def test_i23_unknown_leaf_forwarded_to_userspace(monkeypatch):
    host, vcpu = _td()

    def generic_exit(v, regs):
        # mutation: the NAKed design - dump the unknown TDVMCALL to userspace as KVM_EXIT_TDX
        t = v.kvm_run.tdx
        t.nr = regs["r11"]
        v.completion = lambda w: exits._complete(w, regs, TdvmcallStatus.SUCCESS)
        return v.set_exit(ExitReason.TDX, 0)

    monkeypatch.setattr(exits, "_unsupported", generic_exit)
    assert _dispatch(vcpu, guest.tdvmcall(UNKNOWN, r12=7)) is not None
    e = _only_i23(host)
    assert "0x10010" in str(e) and "TDX" in str(e)


def test_i23_unknown_leaf_wrong_status(monkeypatch):
    host, vcpu = _td()
    # mutation: the pre-6.16 answer (INVALID_OPERAND) for an unknown leaf
    monkeypatch.setattr(exits, "_unsupported",
                        lambda v, regs: exits._complete(v, regs, TdvmcallStatus.INVALID_OPERAND))
    assert _dispatch(vcpu, guest.tdvmcall(UNKNOWN)) is None
    _only_i23(host)


def test_i23_pending_exit_on_unknown_leaf_seen_without_events(monkeypatch):
    host, vcpu = _td()
    monkeypatch.setattr(exits, "_emit", lambda *a: None)         # mutation: no event either

    def generic_exit(v, regs):
        v.completion = lambda w: None
        return v.set_exit(ExitReason.TDX, 0)

    monkeypatch.setattr(exits, "_unsupported", generic_exit)
    _dispatch(vcpu, guest.tdvmcall(UNKNOWN))
    e = _only_i23(host)
    assert "waits for userspace" in str(e)


def test_i23_unknown_hypercall_forwarded(monkeypatch):
    host, vcpu = _td()
    real = exits._emulate_vmcall

    def leaky(v, regs):
        # mutation: every KVM hypercall exits to userspace
        if regs["r10"] != HC.MAP_GPA_RANGE:
            v.completion = lambda w: exits._complete(w, regs, 0)
            return v.set_exit(ExitReason.HYPERCALL, 0)
        return real(v, regs)

    monkeypatch.setattr(exits, "_emulate_vmcall", leaky)
    _dispatch(vcpu, guest.tdvmcall(0, r10=0x77))
    _only_i23(host)
