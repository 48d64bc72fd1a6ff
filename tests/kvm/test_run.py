"""``vcpu.run()`` basics (SPEC §3.3, issue 5 item 4): KvmRun, the guest queue, VP.ENTER, HLT, -EINTR."""

from __future__ import annotations

import dataclasses
import errno

import pytest

from tdxcore import guest
from tdxcore.constants import ExitReason, VmType
from tdxcore.errors import KvmError, TdxTypeError, TdxValueError
from tdxcore.kvm import Kvm, KvmRun, helpers
from tdxcore.kvm.vcpu import SEPT_ZAP_MAX_WAITS
from tdxcore.module.host import Host
from tdxcore.sched import Actor, Driver, WaitOutOfGuest, run_to_completion
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_TD_EPOCH,
    TDX_OPERAND_BUSY,
    TDX_VCPU_STATE_INCORRECT,
    Leaf,
)

BASE = 4 << 30
PATTERN = bytes(range(256)) * 16


@pytest.fixture
def host():
    return Host(packages=1, cpus_per_package=2, memory=32 << 20)


@pytest.fixture
def td(host):
    t = helpers.td_create(Kvm(host), vcpus=2, memory=1 << 20, initial_pages=2)
    yield t
    t.close()


def _entries(host):
    return len(host.events.filter(kind="td_enter"))


# ------------------------------------------------------------------ guest ops
def test_guest_op_constructors_validate():
    assert guest.read(BASE) == guest.Read(BASE, 8)
    assert guest.write(BASE, 0xFF, 1) == guest.Write(BASE, 0xFF, 1)
    assert guest.hlt() == guest.Hlt()
    with pytest.raises(dataclasses.FrozenInstanceError):
        guest.read(BASE).gpa = 0  # type: ignore[misc]
    with pytest.raises(TdxTypeError, match="gpa"):
        guest.read("0x1000")  # type: ignore[arg-type]
    with pytest.raises(TdxTypeError, match="size"):
        guest.read(BASE, True)
    with pytest.raises(TdxValueError, match="size=3 must be one of"):
        guest.read(BASE, 3)
    with pytest.raises(TdxValueError, match="crosses a 4 KiB page"):
        guest.write(BASE + 0xFFC, 0, 8)
    with pytest.raises(TdxValueError, match="value=0x100 is out of range"):
        guest.write(BASE, 0x100, 1)
    with pytest.raises(TdxValueError, match="gpa"):
        guest.read(1 << 64)


# ------------------------------------------------------------------ KvmRun
def test_kvm_run_has_every_payload():
    r = KvmRun()
    assert r.exit_reason == ExitReason.UNKNOWN and r.ret == 0
    assert (r.memory_fault.flags, r.memory_fault.gpa, r.memory_fault.size) == (0, 0, 0)
    assert r.hypercall.args == (0,) * 6 and r.hypercall.nr == r.hypercall.ret == r.hypercall.flags == 0
    t = r.tdx
    assert (t.flags, t.nr, t.get_quote.ret, t.get_quote.gpa, t.get_quote.size) == (0,) * 5
    g = t.get_tdvmcall_info
    assert (g.ret, g.leaf, g.r11, g.r12, g.r13, g.r14) == (0,) * 6
    assert (t.setup_event_notify.ret, t.setup_event_notify.vector) == (0, 0)
    assert (r.system_event.type, r.system_event.ndata, r.system_event.data) == (0, 0, ())
    assert (r.io.direction, r.io.size, r.io.port, r.io.count, r.io.data) == (0, 0, 0, 0, b"")
    assert (r.mmio.phys_addr, r.mmio.data, r.mmio.len, r.mmio.is_write) == (0, bytes(8), 0, False)
    with pytest.raises(AttributeError):
        r.bogus = 1  # type: ignore[attr-defined]


# ------------------------------------------------------------------ run
def test_empty_queue_halts_through_vp_enter(host, td):
    v = td.vcpus[0]
    n0 = len(host.events)
    r = v.run()
    assert r is v.kvm_run and r.exit_reason == ExitReason.HLT and r.ret == 0
    ends = [e[1][2] for e in host.events.filter(kind="seamcall_end") if e[0] >= n0]
    assert ends == [Leaf.TDH_VP_ENTER]
    assert _entries(host) == 1 and len(host.events.filter(kind="td_exit")) == 1
    assert v.guest_log == [] and not v.in_guest and v.stats["nr_entries"] == 1
    assert v.run() is r and v.stats["nr_entries"] == 2


def test_reads_writes_and_hlt_in_order(td):
    v = td.vcpus[0]
    prog = [guest.read(BASE), guest.write(BASE + 8, 0xDEADBEEF), guest.read(BASE + 8, 4),
            guest.read(BASE + 4096 + 3, 1), guest.hlt(), guest.read(BASE + 8, 2)]
    r = v.run(prog)
    assert r.exit_reason == ExitReason.HLT and r.ret == 0
    log = v.guest_log
    assert [e.index for e in log] == [0, 1, 2, 3, 4]
    assert log[0].value == int.from_bytes(PATTERN[:8], "little")
    assert log[1].value is None and log[2].value == 0xDEADBEEF and log[3].value == 3
    assert log[4].op == guest.hlt() and log[4].status == 0
    assert v.queue == (guest.read(BASE + 8, 2),)
    v.run()                                   # the rest of the program runs on the next entry
    assert v.guest_log[-1].index == 5 and v.guest_log[-1].value == 0xBEEF and v.queue == ()


def test_iterator_program_is_consumed_at_queue_time(td):
    v = td.vcpus[1]
    v.run(iter([guest.read(BASE)]))
    assert len(v.guest_log) == 1 and td.vcpus[0].guest_log == []


def test_signal_returns_eintr_once_without_entry(host, td):
    v = td.vcpus[0]
    v.raise_signal()
    n = _entries(host)
    r = v.run([guest.hlt()])
    assert r.exit_reason == ExitReason.INTR and r.ret == -errno.EINTR
    assert _entries(host) == n and v.queue == (guest.hlt(),)
    assert v.run().exit_reason == ExitReason.HLT and r.ret == 0 and _entries(host) == n + 1


def test_stale_payloads_are_kept(td):
    r = td.vcpus[0].kvm_run
    r.hypercall.nr = 5
    r.io.data = b"\x01"
    td.vcpus[0].run()
    assert r.hypercall.nr == 5 and r.io.data == b"\x01" and r.exit_reason == ExitReason.HLT


def test_bad_ops_raise_before_anything_is_queued(td):
    v = td.vcpus[0]
    with pytest.raises(TdxTypeError, match="ops"):
        v.run(guest.hlt())  # type: ignore[arg-type]
    with pytest.raises(TdxTypeError, match=r"ops\[1\]"):
        v.run([guest.hlt(), "hlt"])
    assert v.queue == ()


def test_einval_before_finalize_and_uninitialized_vcpu(host):
    kvm = Kvm(host)
    vm = kvm.create_vm(VmType.TDX)
    helpers.td_initialize(vm)
    a, b = vm.create_vcpu(0), vm.create_vcpu(1)
    a.init_vcpu()
    with pytest.raises(KvmError, match="not RUNNABLE") as ei:
        a.run([guest.hlt()])
    assert ei.value.errno == errno.EINVAL and a.queue == ()
    vm.finalize_vm()
    with pytest.raises(KvmError, match="not initialized") as ei:
        b.run()
    assert ei.value.errno == errno.EINVAL
    assert a.run().exit_reason == ExitReason.HLT
    for x in (a, b, vm):
        x.close()
    assert vm.is_destroyed


def test_eio_when_bugged_and_ebadf_when_closed(td):
    v0, v1 = td.vcpus
    v1.close()
    with pytest.raises(KvmError) as ei:
        v1.run()
    assert ei.value.errno == errno.EBADF
    td.vm.bug("test")
    with pytest.raises(KvmError) as ei:
        v0.run([guest.hlt()])
    assert ei.value.errno == errno.EIO and v0.queue == ()


def test_no_entry_while_wait_for_sept_zap(host, td):
    v = td.vcpus[0]
    td.vm.wait_for_sept_zap = True
    n = _entries(host)
    r = v.run()
    assert r.exit_reason == ExitReason.INTR and r.ret == -errno.EINTR and _entries(host) == n
    assert v.stats["nr_sept_zap_waits"] == SEPT_ZAP_MAX_WAITS
    td.vm.wait_for_sept_zap = False
    assert v.run().exit_reason == ExitReason.HLT and _entries(host) == n + 1


def test_vp_enter_busy_is_reentered_and_counted(host, td):
    v = td.vcpus[0]
    host.tdx.inject(Leaf.TDH_VP_ENTER, TDX_OPERAND_BUSY | OPERAND_ID_TD_EPOCH, count=2)
    r = v.run([guest.read(BASE)])
    assert r.exit_reason == ExitReason.HLT and r.ret == 0 and len(v.guest_log) == 1
    assert v.stats["nr_vp_enter_busy"] == 2 and v.stats["nr_entries"] == 1


def test_vp_enter_error_is_an_internal_error_exit(host, td):
    v = td.vcpus[0]
    host.tdx.inject(Leaf.TDH_VP_ENTER, TDX_VCPU_STATE_INCORRECT, count=1)
    r = v.run()
    assert r.exit_reason == ExitReason.INTERNAL_ERROR and r.ret == 0
    assert v.run().exit_reason == ExitReason.HLT


def test_unmapped_private_gpa_faults_in_and_shared_alias_exits(td):
    """A private page never touched is AUGed on the fault and accepted by the #VE handler; the
    shared alias of a PRIVATE gfn is a KVM_EXIT_MEMORY_FAULT (flags 0) that keeps the op queued."""
    v = td.vcpus[0]
    gpa = BASE + (4 << 12)
    run = v.run([guest.read(gpa)])
    assert run.exit_reason == ExitReason.HLT and v.guest_log[-1].value == 0
    assert v.guest_log[-1].ve is not None and v.guest_log[-1].ve.kind == "pending"
    shared = gpa | (1 << (td.vm.gpaw - 1))
    run = v.run([guest.read(shared)])
    assert run.exit_reason == ExitReason.MEMORY_FAULT and run.ret == -errno.EFAULT
    assert (run.memory_fault.flags, run.memory_fault.gpa, run.memory_fault.size) == (0, gpa, 4096)
    assert v.queue == (guest.read(shared),) and not v.in_guest
    v._queue.clear()


def test_run_gen_is_the_same_operation(td):
    v = td.vcpus[0]
    assert run_to_completion(v.run_gen([guest.read(BASE)])) == (0, "")
    assert v.kvm_run.exit_reason == ExitReason.HLT and len(v.guest_log) == 1
    assert v.mutex.holders() == ()


def test_same_program_same_hash(host):
    def once():
        h = Host(packages=1, cpus_per_package=2, memory=32 << 20)
        kvm = Kvm(h)
        t = helpers.td_create(kvm, vcpus=2, memory=1 << 20)
        for i, v in enumerate(t.vcpus):
            v.run([guest.write(BASE + 8 * i, i + 1), guest.read(BASE), guest.hlt()])
        logs = [tuple(v.guest_log) for v in t.vcpus]
        return h.state_hash(), kvm.state_hash(), logs

    assert once() == once()


def _round_robin(driver, actors):
    while not all(a.done for a in actors):
        for a in actors:
            if driver.runnable(a):
                driver.step(a)


def test_interleaved_vcpus_mutex_and_kick(host, td):
    v0, v1 = td.vcpus
    prog = [guest.write(BASE + 16, 1), guest.read(BASE + 16), guest.hlt()]
    a = Actor("a", v0.run_gen(prog))
    b = Actor("b", v0.run_gen([guest.read(BASE)]))       # same vCPU: waits on its mutex
    c = Actor("c", v1.run_gen(prog))
    d = Driver()
    while not host.tdx.vcpu(v0.tdvpr).in_guest:          # mutex, entry phase, then in the guest
        d.step(a)
    assert v0.in_guest and v0.mutex.holders() == (a,)
    def kicker():
        yield WaitOutOfGuest([host.tdx.vcpu(v0.tdvpr)])

    kick = Actor("kick", kicker())
    d.step(kick)
    assert not d.runnable(kick)                          # a kick waits for the vCPU to leave
    _round_robin(d, [a, b, c, kick])
    assert a.result == b.result == c.result == (0, "")
    assert [e.index for e in v0.guest_log] == [0, 1, 2, 3] and v0.guest_log[3].op == guest.read(BASE)
    assert [e.value for e in v1.guest_log] == [None, 1, None] and not v0.in_guest


def test_closing_the_actor_in_the_guest_exits_the_guest(host, td):
    v = td.vcpus[0]
    gen = v.run_gen([guest.read(BASE), guest.hlt()])
    d = Driver()
    a = Actor("a", gen)
    while not host.tdx.vcpu(v.tdvpr).in_guest:
        d.step(a)
    gen.close()
    assert not v.in_guest and not host.tdx.vcpu(v.tdvpr).in_guest and v.mutex.holders() == ()
    assert v.run().exit_reason == ExitReason.HLT and len(v.guest_log) == 2


def test_closing_the_actor_in_the_entry_phase_aborts_vp_enter(host, td):
    """An actor closed between VP.ENTER's begin and its entry gives the entry locks back."""
    v = td.vcpus[0]
    gen = v.run_gen([guest.read(BASE), guest.hlt()])
    d = Driver()
    a = Actor("a", gen)
    while v._enter_op is None:
        d.step(a)
    assert v.in_guest and not host.tdx.vcpu(v.tdvpr).in_guest     # guest mode, not yet entered
    gen.close()
    assert not v.in_guest and host.tdx.inflight == {} and v.mutex.holders() == ()
    assert v.run().exit_reason == ExitReason.HLT
