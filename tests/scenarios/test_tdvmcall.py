"""TDVMCALL exits end to end through ``vcpu.run`` (issue 7).

Acceptance scenarios A25-A27 of anchors §2.4 and the exit behaviours of the TDX selftests of
anchors §2.2 (``tdx_vm_test``, ``tdx_get_quote_test``, ``tdx_shared_mem_test``), playing
userspace (the selftest / QEMU side) between ``run()`` calls.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxcore import guest
from tdxcore.constants import (
    HC,
    PAGE_SHIFT,
    TDVMCALLINFO_SETUP_EVENT_NOTIFY_INTERRUPT,
    Cap,
    ExitReason,
    MemAttr,
    TdvmcallLeaf,
    TdvmcallStatus,
)
from tdxcore.invariants import check_invariants
from tdxcore.invariants.exits import is_unknown_tdvmcall
from tdxcore.kvm import Kvm, helpers
from tdxcore.kvm.exits import LEGAL_STATUSES
from tdxcore.kvm.run import Interrupt
from tdxcore.module.host import Host

S = TdvmcallStatus
SB = 1 << 47
BASE = 0x8000_0000             # tdx_upm_test's test area
MIB2 = 2 << 20


@pytest.fixture
def td():
    host = Host(packages=1, cpus_per_package=2, memory=64 << 20, seed=11)
    t = helpers.td_create(Kvm(host), vcpus=1, memory=8 << 20, gpa=BASE, initial_pages=1)
    t.vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << HC.MAP_GPA_RANGE)
    yield t
    check_invariants(host)
    t.close()


def _program_log(vcpu):
    """Return the log of the ops the program issued (delivered interrupts left out)."""
    return [e for e in vcpu.guest_log if not isinstance(e.op, Interrupt)]


def _no_exit(vcpu, op):
    """``op`` is answered in the kernel: the run ends at the guest's HLT; return its log entry."""
    run = helpers.vcpu_run_until_hlt(vcpu, [op, guest.hlt()])
    assert run.exit_reason == ExitReason.HLT
    log = _program_log(vcpu)
    assert log[-1].op == guest.hlt()
    return log[-2]


# ------------------------------------------------------------------ A25 MapGPA
def test_a25_basic_shared(td):
    vm, vcpu = td.vm, td.vcpus[0]
    run = vcpu.run([guest.map_gpa(BASE, 40 << 10, shared=True)])
    assert run.exit_reason == ExitReason.HYPERCALL and run.ret == 0
    assert (run.hypercall.nr, run.hypercall.args[:3], run.hypercall.ret) == (12, (BASE, 10, 0), 0)
    helpers.handle_memory_conversion(vm, run)
    assert vcpu.run().exit_reason == ExitReason.HLT
    e = _program_log(vcpu)[-1]
    assert (e.status, e.op) == (S.SUCCESS, guest.MapGpa(BASE, 40 << 10, True))
    assert vm.get_memory_attributes(BASE >> PAGE_SHIFT) == 0
    assert vm.get_memory_attributes((BASE + (40 << 10)) >> PAGE_SHIFT) == MemAttr.PRIVATE


def test_a25_five_mib_private_three_chunks(td):
    vm, vcpu = td.vm, td.vcpus[0]
    run = vcpu.run([guest.map_gpa(BASE, 5 << 20, shared=False)])
    seen = []
    while run.exit_reason == ExitReason.HYPERCALL:
        seen.append(run.hypercall.args[:3])
        helpers.handle_memory_conversion(vm, run)
        run = vcpu.run()
    assert seen == [(BASE, 512, 16), (BASE + MIB2, 512, 16), (BASE + 2 * MIB2, 256, 16)]
    assert run.exit_reason == ExitReason.HLT and _program_log(vcpu)[-1].status == S.SUCCESS


def test_a25_pending_event_after_chunk_1_retries(td):
    vm, vcpu = td.vm, td.vcpus[0]
    run = vcpu.run([guest.map_gpa(BASE, 5 << 20, shared=True), guest.hlt()])
    helpers.handle_memory_conversion(vm, run)
    vcpu.queue_interrupt(0x30)
    assert vcpu.run().exit_reason == ExitReason.HLT
    e = _program_log(vcpu)[-2]
    assert (e.status, e.r11) == (S.RETRY, SB | (BASE + MIB2))
    assert any(isinstance(x.op, Interrupt) and x.value == 0x30 for x in vcpu.guest_log)
    assert vcpu.stats["nr_hypercall_exits"] == 1


def test_a25_userspace_error_on_chunk_2(td):
    vm, vcpu = td.vm, td.vcpus[0]
    run = vcpu.run([guest.map_gpa(BASE, 5 << 20, shared=True)])
    helpers.handle_memory_conversion(vm, run)
    run = vcpu.run()
    assert run.exit_reason == ExitReason.HYPERCALL and run.hypercall.args[0] == BASE + MIB2
    run.hypercall.ret = 1
    assert vcpu.run().exit_reason == ExitReason.HLT
    e = _program_log(vcpu)[-1]
    assert (e.status, e.r11) == (S.INVALID_OPERAND, SB | (BASE + MIB2))


# ------------------------------------------------------------------ A26 MapGPA errors
A26 = [
    ("start private, end shared", SB - 0x1000, 0x2000, S.INVALID_OPERAND),
    ("gpa + size wraps", (1 << 64) - 0x1000, 0x2000, S.INVALID_OPERAND),
    ("unaligned", 0x1001, 0x1000, S.ALIGN_ERROR),
    ("unaligned and straddling", SB - 0x1001, 0x2000, S.INVALID_OPERAND),
]


@pytest.mark.parametrize("why, gpa, size, status", A26, ids=[a[0] for a in A26])
def test_a26_map_gpa_errors_no_exit(td, why, gpa, size, status):
    e = _no_exit(td.vcpus[0], guest.tdvmcall(TdvmcallLeaf.MAP_GPA, r12=gpa, r13=size))
    assert (e.status, e.r11) == (status, gpa), why
    assert "nr_hypercall_exits" not in td.vcpus[0].stats


def test_a26_exit_not_enabled(td):
    td.vm.enable_cap(Cap.EXIT_HYPERCALL, 0)
    for gpa in (BASE, 0x1001, SB - 0x1000):
        e = _no_exit(td.vcpus[0], guest.tdvmcall(TdvmcallLeaf.MAP_GPA, r12=gpa, r13=0x2000))
        assert (e.status, e.r11) == (S.SUBFUNC_UNSUPPORTED, gpa)


# ------------------------------------------------------------------ A27 other leaves
def test_a27_get_quote(td):
    vcpu = td.vcpus[0]
    assert _no_exit(vcpu, guest.get_quote(BASE, 4096)).status == S.INVALID_OPERAND
    run = vcpu.run([guest.get_quote(SB | BASE, 4096)])
    q = run.tdx.get_quote
    assert (run.exit_reason, run.tdx.nr, q.gpa, q.size, q.ret) == (
        ExitReason.TDX, 0x10002, BASE, 4096, S.SUBFUNC_UNSUPPORTED)
    q.ret = 0
    assert vcpu.run().exit_reason == ExitReason.HLT
    assert _program_log(vcpu)[-1].status == S.SUCCESS


def test_a27_report_fatal_error(td):
    vcpu = td.vcpus[0]
    run = vcpu.run([guest.report_fatal_error(0x0BAAAAAD00000000)])
    se = run.system_event
    assert (run.exit_reason, se.type, se.ndata, se.data[12], se.data[13]) == (
        ExitReason.SYSTEM_EVENT, 7, 16, 0x0BAAAAAD00000000, 0)


def test_a27_get_tdvmcall_info(td):
    vcpu = td.vcpus[0]
    e = _no_exit(vcpu, guest.get_tdvmcall_info(0))
    assert (e.status, e.r11, e.outputs) == (S.SUCCESS, 0, (0, 0, 0))
    run = vcpu.run([guest.get_tdvmcall_info(1)])
    assert (run.exit_reason, run.tdx.nr, run.tdx.get_tdvmcall_info.leaf) == (ExitReason.TDX, 0x10000, 1)
    run.tdx.get_tdvmcall_info.r11 = TDVMCALLINFO_SETUP_EVENT_NOTIFY_INTERRUPT     # what QEMU advertises
    vcpu.run()
    e = _program_log(vcpu)[-1]
    assert (e.status, e.r11) == (S.SUCCESS, TDVMCALLINFO_SETUP_EVENT_NOTIFY_INTERRUPT)
    assert _no_exit(vcpu, guest.get_tdvmcall_info(2)).status == S.INVALID_OPERAND


def test_a27_io_and_unknown_leaf(td):
    vcpu = td.vcpus[0]
    assert _no_exit(vcpu, guest.io(0x50, 5, True, 1)).status == S.INVALID_OPERAND
    for size in (1, 2, 4):
        run = vcpu.run([guest.io(0x50, size, True, 0xA1B2C3D4)])
        assert run.exit_reason == ExitReason.IO and run.io.size == size
    assert _no_exit(vcpu, guest.tdvmcall(0x10010)).status == S.SUBFUNC_UNSUPPORTED
    assert not [e for e in td.vm.kvm.host.events if e[0] == "tdvmcall" and e[3] == 0x10010 and e[4]]


def test_setup_event_notify_round_trip(td):
    vcpu = td.vcpus[0]
    assert _no_exit(vcpu, guest.setup_event_notify(7)).status == S.INVALID_OPERAND
    run = vcpu.run([guest.setup_event_notify(0xEC)])
    assert (run.exit_reason, run.tdx.nr, run.tdx.setup_event_notify.vector) == (ExitReason.TDX, 0x10004, 0xEC)
    run.tdx.setup_event_notify.ret = S.SUCCESS
    vcpu.run()
    assert _program_log(vcpu)[-1].status == S.SUCCESS


# ------------------------------------------------------------------ selftest behaviours (§2.2)
def test_tdx_vm_test_io_round_trip(td):
    """``tdx_vm_test``: a byte written to port 0x50 comes back + 1; sizes reach the host exactly."""
    vcpu = td.vcpus[0]
    run = vcpu.run([guest.io(0x50, 1, True, 0x41), guest.io(0x50, 1, False)])
    assert (run.io.direction, run.io.port, run.io.data) == (1, 0x50, b"\x41")
    port = run.io.data[0]
    run = vcpu.run()
    assert (run.exit_reason, run.io.direction, run.io.size) == (ExitReason.IO, 0, 1)
    run.io.data = bytes([port + 1])
    assert vcpu.run().exit_reason == ExitReason.HLT
    assert _program_log(vcpu)[-1].value == 0x42
    for size, val in ((2, 0xBEEF), (4, 0xDEADBEEF)):
        run = vcpu.run([guest.io(0x51, size, True, val)])
        assert run.io.data == val.to_bytes(size, "little")


def test_tdx_vm_test_cpuid_msr(td):
    vcpu = td.vcpus[0]
    assert _no_exit(vcpu, guest.cpuid(0x80000008)).outputs[0] & 0xFF == 48
    assert _no_exit(vcpu, guest.msr_read(0x1B)).value & (1 << 8)          # BSP
    assert _no_exit(vcpu, guest.msr_write(0x1B, 0)).status == S.INVALID_OPERAND


def test_tdx_get_quote_test(td):
    """Check tdx_get_quote_test: GetQuote on a MapGPA'd shared buffer, host marks it IN_FLIGHT.

    GetQuote exits with the shared bit stripped; the host marks the buffer IN_FLIGHT and answers
    0; the guest sees the marker through the shared alias.
    """
    vm, vcpu = td.vm, td.vcpus[0]
    buf = BASE + 0x10000
    run = vcpu.run([guest.map_gpa(buf, 4096, shared=True), guest.get_quote(SB | buf, 4096)])
    helpers.handle_memory_conversion(vm, run)
    run = vcpu.run()
    assert (run.exit_reason, run.tdx.nr, run.tdx.get_quote.gpa, run.tdx.get_quote.size) == (
        ExitReason.TDX, 0x10002, buf, 4096)
    slot = vm.memslots.gfn_to_memslot(buf >> PAGE_SHIFT)
    vm.kvm.host.write(slot.gfn_to_hva(buf >> PAGE_SHIFT), b"\xff" * 8)     # status: IN_FLIGHT
    run.tdx.get_quote.ret = 0
    run = vcpu.run([guest.read(SB | buf, 8)])
    assert run.exit_reason == ExitReason.HLT
    log = _program_log(vcpu)
    assert log[-2].status == S.SUCCESS and log[-1].value == (1 << 64) - 1


def test_tdx_shared_mem_test(td):
    """Check tdx_shared_mem_test: a shared page written by each side, echoed through port 0x87.

    MapGPA one page to shared; the guest writes 0xcafecafe, the host reads it; the host writes
    0xabcdabcd and the guest echoes it back through port 0x87.
    """
    vm, vcpu = td.vm, td.vcpus[0]
    page = BASE + 0x20000
    run = vcpu.run([guest.map_gpa(page, 4096, shared=True), guest.write(SB | page, 0xCAFECAFE, 4)])
    helpers.handle_memory_conversion(vm, run)
    run = vcpu.run([guest.io(0x87, 4, False)])
    assert run.exit_reason == ExitReason.IO and run.io.port == 0x87
    host = vm.kvm.host
    hva = vm.memslots.gfn_to_memslot(page >> PAGE_SHIFT).gfn_to_hva(page >> PAGE_SHIFT)
    assert host.read(hva, 4) == (0xCAFECAFE).to_bytes(4, "little")
    host.write(hva, (0xABCDABCD).to_bytes(4, "little"))
    run.io.data = b"\0\0\0\0"
    run = vcpu.run([guest.read(SB | page, 4)])
    val = _program_log(vcpu)[-1].value
    run = vcpu.run([guest.io(0x87, 4, True, val)])
    assert run.io.data == (0xABCDABCD).to_bytes(4, "little")


def test_mmio_through_ve_of_unbacked_shared_gpa(td):
    """A load of a shared GPA no memslot backs: the guest's #VE handler issues TDVMCALL<MMIO>."""
    vcpu = td.vcpus[0]
    mmio = SB | 0xFEC0_0000
    run = vcpu.run([guest.read(mmio, 4)])
    if run.exit_reason != ExitReason.MMIO:
        pytest.skip(f"the MMIO #VE path is not routed yet (exit {run.exit_reason.name})")
    assert (run.mmio.phys_addr, run.mmio.len, run.mmio.is_write) == (0xFEC0_0000, 4, False)
    run.mmio.data = (0x11223344).to_bytes(4, "little") + bytes(4)
    vcpu.run()
    e = _program_log(vcpu)[-1]
    assert (e.status, e.value, type(e.op)) == (S.SUCCESS, 0x11223344, guest.Mmio)
    assert e.ve is not None and e.ve.kind == "mmio"
    run = vcpu.run([guest.write(mmio + 8, 0xAB, 1)])
    assert (run.exit_reason, run.mmio.is_write, run.mmio.data[:1]) == (ExitReason.MMIO, True, b"\xab")


# ------------------------------------------------------------------ random programs through vcpu.run
_OPS = st.one_of(
    st.builds(guest.tdvmcall, st.one_of(st.integers(0, 0x10010), st.integers(0, (1 << 64) - 1)),
              r12=st.integers(0, (1 << 64) - 1), r13=st.integers(0, 1 << 22)),
    st.builds(lambda nr, a: guest.tdvmcall(a, r10=nr, r12=1), st.integers(1, 20), st.integers(0, 1 << 40)),
    st.builds(guest.map_gpa, st.integers(0, 1 << 48), st.integers(0, 5 << 20), st.booleans()),
    st.builds(guest.io, st.integers(0, 0xFFFF), st.sampled_from([1, 2, 4, 5]), st.integers(0, 2)),
    st.builds(guest.mmio, st.sampled_from([SB | 0xFEC0_0000, 0xFEC0_0000]), st.sampled_from([1, 3, 8]),
              st.integers(0, 1)),
    st.builds(guest.get_quote, st.sampled_from([SB | BASE, BASE]), st.just(4096)),
    st.builds(guest.get_tdvmcall_info, st.integers(0, 3)),
    st.builds(guest.setup_event_notify, st.integers(0, 300)),
    st.builds(guest.msr_read, st.integers(0, 0x900)),
    st.builds(guest.cpuid, st.integers(0, 0x80000010)),
)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(_OPS, min_size=1, max_size=6))
def test_random_programs_never_leak_unknown_leaves(ops):
    host = Host(packages=1, cpus_per_package=2, memory=64 << 20, seed=5)
    t = helpers.td_create(Kvm(host), vcpus=1, memory=4 << 20, gpa=BASE, initial_pages=1)
    t.vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << HC.MAP_GPA_RANGE)
    vcpu = t.vcpus[0]
    run = vcpu.run(ops)
    for _ in range(64):
        if run.exit_reason == ExitReason.HLT:
            break
        assert run.exit_reason in (ExitReason.HYPERCALL, ExitReason.TDX, ExitReason.IO, ExitReason.MMIO,
                                   ExitReason.SYSTEM_EVENT)
        head = vcpu.queue[0]
        assert not is_unknown_tdvmcall(head)
        if run.exit_reason == ExitReason.HYPERCALL:
            run.hypercall.ret = 1              # refuse: the guest gets INVALID_OPERAND / 1
        run = vcpu.run()
    assert run.exit_reason == ExitReason.HLT and not vcpu.queue
    log = _program_log(vcpu)
    assert [e.op for e in log] == ops
    for e in log:
        if is_unknown_tdvmcall(e.op):
            assert e.status == S.SUBFUNC_UNSUPPORTED
        elif not dict(getattr(e.op, "regs", ())).get("r10"):
            assert e.status in LEGAL_STATUSES
    check_invariants(host)
    t.close()
