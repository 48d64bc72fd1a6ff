"""Scenarios A14–A19 (anchors.md §2.4 as corrected) and the policy contrast of issue 6 item 5:
touching a page before accept, BUSY on the map path (local retry), BUSY on the zap path (one
retry with vCPUs kicked; a second BUSY is a KVM_BUG), zero-step contention (SERIES_2023 triggers
it, LINUX_6_18 does not), the 6.18 invalid-memslot exit of the local retry, and ACCEPT against the
host on one entry — with forced schedules where a race is named."""

from __future__ import annotations

import errno

import pytest

import tdxcore as tdx
from tdxcore import guest
from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE, ExitReason, MemAttr, TdAttr
from tdxcore.errors import KvmError
from tdxcore.invariants import check_invariants
from tdxcore.kvm import helpers
from tdxcore.sched import PREEMPT
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    OPERAND_ID_SEPT_TREE,
    OPERAND_ID_TD_EPOCH,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
    Leaf,
)
from tdxcore.storm.scheduler import Scheduler

BASE = 4 << 30
MiB = 1 << 20
BUSY_SEPT = TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE


def make_td(policy=tdx.Policy.LINUX_6_18, vcpus=2, **init_vm):
    host = tdx.Host(packages=2, cpus_per_package=2, memory=128 << 20, tdx_keyids=8, seed=0)
    kvm = tdx.Kvm(host, policy=policy)
    return host, helpers.td_create(kvm, vcpus=vcpus, memory=4 * MiB, gpa=BASE, initial_pages=0, **init_vm)


def seamcalls(host, leaf):
    return host.stats.nr_seamcalls.get(leaf, 0)


def finish(td, host):
    td.close()
    assert host.leaks == ()


# ---------------------------------------------------------------------------------------------- A14
def test_a14_access_before_accept_with_sept_ve_disable_kills_the_vm():
    host, td = make_td(attributes=int(TdAttr.SEPT_VE_DISABLE))
    v = td.vcpus[0]
    with pytest.raises(KvmError) as ei:
        v.run([guest.read(BASE)])             # EPT violation → AUG → PENDING → touched again
    assert ei.value.errno == errno.EIO and td.vm.is_dead and not td.vm.is_bugged
    assert "before accepting" in td.vm.bug_reason
    for _ in range(2):
        with pytest.raises(KvmError) as ei:
            v.run()
        assert ei.value.errno == errno.EIO
    finish(td, host)


def test_a14_access_before_accept_without_sept_ve_disable_is_a_ve():
    host, td = make_td()
    v = td.vcpus[0]
    run = v.run([guest.write(BASE, 5), guest.read(BASE)])
    assert run.exit_reason == ExitReason.HLT and not td.vm.is_dead
    assert v.guest_log[0].ve is not None and v.guest_log[0].ve.kind == "pending"
    assert v.guest_log[1].value == 5 and v.guest_log[1].ve is None
    finish(td, host)


# ---------------------------------------------------------------------------------------------- A15
def test_a15_busy_on_aug_is_retried_locally():
    host, td = make_td()
    v = td.vcpus[0]
    host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, BUSY_SEPT, count=3)
    run = v.run([guest.read(BASE)])
    assert run.exit_reason == ExitReason.HLT and not td.vm.is_bugged
    assert v.stats["nr_local_retries"] == 3 and v.stats["nr_ept_violations"] == 1
    assert seamcalls(host, Leaf.TDH_MEM_PAGE_AUG) == 4 and len(td.vm.mmu.leaves) == 1
    check_invariants(host)
    finish(td, host)


def test_a15_signal_after_the_first_retry_returns_to_userspace():
    host, td = make_td()
    v = td.vcpus[0]
    host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, BUSY_SEPT, count=3)
    s = Scheduler(seed=0)
    a = s.add(v.run_gen([guest.read(BASE)]), "vcpu0")
    s.run_until(a, lambda y: v.stats.get("nr_local_retries", 0) == 1)
    v.raise_signal()
    while not a.done:
        s.step(a)
    assert v.kvm_run.exit_reason == ExitReason.INTR and v.kvm_run.ret == -errno.EINTR
    assert td.vm.mmu.leaves == ()
    run = v.run()                              # re-entry: the mapping completes
    assert run.exit_reason == ExitReason.HLT and len(td.vm.mmu.leaves) == 1
    finish(td, host)


# ---------------------------------------------------------------------------------------------- A16
def _mapped(td, n=4):
    v = td.vcpus[0]
    v.run([guest.write(BASE + i * PAGE_SIZE, i + 1) for i in range(n)])
    assert len(td.vm.mmu.leaves) == n


@pytest.mark.parametrize(("leaf", "status"), [
    (Leaf.TDH_MEM_RANGE_BLOCK, BUSY_SEPT),
    (Leaf.TDH_MEM_TRACK, TDX_OPERAND_BUSY | OPERAND_ID_TD_EPOCH),
    (Leaf.TDH_MEM_PAGE_REMOVE, BUSY_SEPT),
])
def test_a16_zap_busy_is_retried_once_with_vcpus_kicked(leaf, status):
    host, td = make_td()
    vm = td.vm
    _mapped(td)
    v1 = td.vcpus[1]
    s = Scheduler(seed=0)
    guest_prog = [guest.read(BASE + 3 * PAGE_SIZE)] * 50
    g = s.add(v1.run_gen(guest_prog), "vcpu1")
    s.run_until(g, lambda y: v1.in_guest)
    host.tdx.inject(leaf, status, count=1)
    conv = s.add(vm.set_memory_attributes_gen(BASE, PAGE_SIZE, 0), "convert")
    entries_while_flag = []
    while not conv.done:
        if conv in s.runnable():
            s.step(conv)
        elif not g.done:                          # the kick: vCPU1 takes its IPI exit
            s.step(g)
        if vm.wait_for_sept_zap and not v1.in_guest and not g.done:
            n_enter = len(host.events.filter(kind="td_enter"))
            for _ in range(3):                    # it may not enter while the flag is set
                if g in s.runnable():
                    s.step(g)
            entries_while_flag.append(len(host.events.filter(kind="td_enter")) - n_enter)
    assert conv.result == (0, "") and not vm.wait_for_sept_zap and not vm.is_bugged
    # the injected BUSY was retried after a kick; a conflict-born BUSY (TRACK against vCPU1's
    # entry) may add a retry of its own, which 6.18 survives the same way
    assert vm.stats["nr_zap_busy_retries"] >= 1 and vm.stats["nr_kicks"] >= 2
    assert host.stats.nr_busy[(leaf, status & 0xFFFFFFFF)] >= 1
    assert entries_while_flag and all(k == 0 for k in entries_while_flag)   # no entry under the flag
    assert vm.mmu.leaf(BASE >> PAGE_SHIFT) is None
    while not g.done:
        s.step(g)
    check_invariants(host)
    finish(td, host)


def test_a16_double_busy_is_a_kvm_bug_and_pages_stay_accounted():
    host, td = make_td()
    vm = td.vm
    _mapped(td)
    host.tdx.inject(Leaf.TDH_MEM_RANGE_BLOCK, BUSY_SEPT, count=2)
    vm.set_memory_attributes(BASE, PAGE_SIZE, 0)     # the hook's -EIO is not the ioctl's result
    assert vm.is_bugged and "RANGE.BLOCK" in vm.bug_reason
    assert [lk.what for lk in vm.leaks] == ["private"]
    for call in (lambda: vm.set_memory_attributes(BASE, PAGE_SIZE, MemAttr.PRIVATE),
                 lambda: td.vcpus[0].run([guest.read(BASE)])):
        with pytest.raises(KvmError) as ei:
            call()
        assert ei.value.errno == errno.EIO
    free0 = host.free_frames
    td.close()
    leaked = {lk.pfn for lk in host.leaks if lk.pfn is not None}
    assert len(leaked) >= 1 and host.free_frames > free0


# ---------------------------------------------------------------------------------------------- A17
def _zero_step_run(policy, signals):
    host, td = make_td(policy=policy)
    v0, v1 = td.vcpus
    # the mapping of P stays unresolved: AUG of P answers BUSY|SEPT_TREE many times
    p_gpa = BASE
    inj = host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, BUSY_SEPT, count=None,
                          match=lambda call: call.gpa == p_gpa)
    s = Scheduler(seed=0)
    a = s.add(v0.run_gen([guest.read(p_gpa)]), "vcpu0")
    mod_v0 = host.tdx.vcpu(v0.tdvpr)
    raised_at = 0
    for _ in range(400):
        if mod_v0.zero_step or (a.done and not signals):
            break
        faults = v0.stats.get("nr_faults", 0)
        if signals and faults > raised_at:        # a signal arrives while the fault is handled
            v0.raise_signal()
            raised_at = faults
        s.step(a)
        if a.done and signals and v0.kvm_run.exit_reason == ExitReason.INTR:
            a = s.add(v0.run_gen(), f"vcpu0.{len(s.actors)}")
    return host, td, s, a, inj, mod_v0


def test_a17_series_2023_triggers_zero_step_and_blocks_other_maps():
    host, td, s, a, inj, mod_v0 = _zero_step_run(tdx.Policy.SERIES_2023, signals=False)
    v0, v1 = td.vcpus
    assert mod_v0.zero_step and mod_v0.ept_count == 6
    # vCPU0's next VP.ENTER takes the S-EPT tree lock exclusively for its entry phase
    s.run_until(a, lambda y: v0._enter_op is not None and not mod_v0.in_guest)
    b = s.add(v1.run_gen([guest.read(BASE + 64 * PAGE_SIZE)]), "vcpu1")
    s.run_until(b, lambda y: v1.stats.get("nr_faults", 0) == 1 and y is not PREEMPT)
    busy0 = host.stats.as_dict().get("nr_sept_busy_retries", 0)
    while v1.stats.get("nr_faults", 0) == 1 and not b.done and host.stats.as_dict().get(
            "nr_sept_busy_retries", 0) == busy0:
        s.step(b)
    assert host.stats.as_dict().get("nr_sept_busy_retries", 0) > busy0   # BUSY|SEPT_TREE, retried
    assert host.events.filter(kind="lock_conflict")
    host.tdx.injector.remove(inj)                 # P's mapping resolves
    while not (a.done and b.done):
        for x in (a, b):
            if not x.done and x in s.runnable():
                s.step(x)
    assert v0.kvm_run.exit_reason == ExitReason.HLT and v1.kvm_run.exit_reason == ExitReason.HLT
    assert not mod_v0.zero_step
    check_invariants(host)
    finish(td, host)


def test_a17_linux_6_18_does_not_trigger_zero_step():
    host, td, s, a, inj, mod_v0 = _zero_step_run(tdx.Policy.LINUX_6_18, signals=False)
    v0 = td.vcpus[0]
    assert not mod_v0.zero_step and v0.stats["nr_ept_violations"] == 1
    assert v0.stats["nr_local_retries"] > 6
    host.tdx.injector.remove(inj)
    while not a.done:
        s.step(a)
    assert v0.kvm_run.exit_reason == ExitReason.HLT and host.stats.as_dict().get("nr_zero_step_entries", 0) == 0
    finish(td, host)


def test_a17_linux_6_18_with_signals_reaches_zero_step():
    """The corrected A17: a pending signal makes each retry return to userspace and re-enter at
    the same RIP, so six EPT violations accumulate even under 6.18."""
    host, td, s, a, inj, mod_v0 = _zero_step_run(tdx.Policy.LINUX_6_18, signals=True)
    assert mod_v0.zero_step and mod_v0.ept_count == 6
    host.tdx.injector.remove(inj)
    v0 = td.vcpus[0]
    while not a.done:
        s.step(a)
    run = v0.run() if v0.kvm_run.exit_reason == ExitReason.INTR else v0.kvm_run
    assert run.exit_reason == ExitReason.HLT
    assert host.stats.as_dict().get("nr_zero_step_entries", 0) >= 1
    finish(td, host)


# ---------------------------------------------------------------------------------------------- A18
def test_a18_local_retry_stops_when_the_memslot_is_deleted():
    host, td = make_td()
    vm, v0 = td.vm, td.vcpus[0]
    inj = host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, BUSY_SEPT, count=None)
    s = Scheduler(seed=1)
    a = s.add(v0.run_gen([guest.read(BASE)]), "vcpu0")
    s.run_until(a, lambda y: v0.stats.get("nr_local_retries", 0) >= 3)
    slot = vm.memslots.gfn_to_memslot(BASE >> PAGE_SHIFT)
    from tdxcore.kvm.memslot import UserMemoryRegion, kvm_set_memory_region

    d = s.add(kvm_set_memory_region(vm, UserMemoryRegion(0, slot.flags, BASE, 0, slot.userspace_addr,
                                                         0, None), v1=False), "delete")
    s.run(max_steps=100_000)
    host.tdx.injector.remove(inj)
    assert d.result == (0, "") and len(vm.memslots) == 0
    run = v0.kvm_run
    assert run.exit_reason == ExitReason.MEMORY_FAULT and run.ret == -errno.EFAULT
    assert (run.memory_fault.flags, run.memory_fault.gpa, run.memory_fault.size) == (8, BASE, 4096)
    v0._queue.clear()
    check_invariants(host)
    finish(td, host)


# ---------------------------------------------------------------------------------------------- A19
def test_a19_accept_against_the_host_on_one_entry():
    host, td = make_td()
    vm, v0 = td.vm, td.vcpus[0]
    t = host.tdx
    # G is AUGed (PENDING) by a fault, then the guest's ACCEPT of G is in flight
    s = Scheduler(seed=0)
    a = s.add(v0.run_gen([guest.accept(BASE), guest.accept(BASE), guest.read(BASE)]), "vcpu0")
    s.run_until(a, lambda y: any(isinstance(op.leaf, tdx.TdcallLeaf) for op in t.inflight.values()))
    res = t.tdh_mem_range_block(vm.tdr, BASE, 0)
    assert res.status == TDX_OPERAND_BUSY | OPERAND_ID_RCX           # lost: host-priority bit set
    s.step(a)                                                         # the in-flight ACCEPT completes
    assert v0.guest_log[-1].status == 0
    s.run_until(a, lambda y: v0._last_accept_status != 0 or a.done)
    assert v0._last_accept_status == TDX_OPERAND_BUSY_HOST_PRIORITY | OPERAND_ID_RCX
    res = t.tdh_mem_range_block(vm.tdr, BASE, 0)                      # the host's retry wins
    assert res.status == 0
    t.tdh_mem_range_unblock  # noqa: B018 - the entry stays BLOCKED; the guest's read faults
    assert not td.vm.is_bugged
    a.gen.close()
