"""TDVMCALL dispatch at the handler level (issue 7; SPEC §3.3, §4.8; tdx-facts §9.3-§9.6).

Each op is pushed at the head of a real TD vCPU's queue and handed to
``exits.handle_tdvmcall`` exactly as the run loop does after the TD exits; ``resume`` plays the
next ``run()``: it clears ``vcpu.completion`` and calls it. One test per validation failure of
every leaf (with precedence where several apply), the payload of every exit, the completion of
every exit, and a hypothesis sweep over random leaves and registers.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxcore import guest
from tdxcore.constants import (
    EXIT_REASON_TDCALL,
    HC,
    KVM_HC_ENOSYS,
    MAP_GPA_RANGE_ENCRYPTED,
    MSR_IA32_CR_PAT_DEFAULT,
    TDVMCALL_EXPOSE_REGS_MASK,
    U64_MAX,
    Cap,
    ExitReason,
    TdvmcallLeaf,
    TdvmcallStatus,
)
from tdxcore.errors import TdxTypeError
from tdxcore.invariants import check_invariants
from tdxcore.kvm import Kvm, exits, helpers
from tdxcore.kvm.run import KvmRun, TdxExit
from tdxcore.module.host import Host
from tdxcore.sched import run_to_completion

S = TdvmcallStatus
SB = 1 << 47                     # shared bit of a GPAW-48 TD
MIB2 = 2 << 20


class Harness:
    """One TD vCPU driven at the TDVMCALL boundary."""

    def __init__(self, hypercall: bool = True) -> None:
        self.host = Host(packages=1, cpus_per_package=2, memory=32 << 20, seed=7)
        self.td = helpers.td_create(Kvm(self.host), vcpus=1, memory=1 << 20, initial_pages=1)
        self.vm = self.td.vm
        self.vcpu = self.td.vcpus[0]
        self.run = self.vcpu.kvm_run
        if hypercall:
            self.vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << HC.MAP_GPA_RANGE)

    def call(self, op):
        """Dispatch ``op`` as the run loop does after the TD exit; return the Ret or None."""
        assert not self.vcpu.queue and self.vcpu.completion is None
        self.vcpu._queue.append(op)
        return run_to_completion(exits.handle_tdvmcall(self.vcpu, op), name="tdvmcall")

    def resume(self):
        """Play the next KVM_RUN: clear complete_userspace_io, then call it (as upstream)."""
        fn, self.vcpu.completion = self.vcpu.completion, None
        assert fn is not None
        return fn(self.vcpu)

    @property
    def last(self):
        """The last guest_log entry."""
        return self.vcpu.guest_log[-1]

    def in_kernel(self, op, status, r11=None):
        """``op`` completes without an exit with ``status`` (and ``r11`` if given)."""
        n = len(self.vcpu.guest_log)
        assert self.call(op) is None
        assert len(self.vcpu.guest_log) == n + 1 and not self.vcpu.queue
        assert self.vcpu.completion is None
        assert self.last.status == status, (hex(self.last.status), hex(status))
        if r11 is not None:
            assert self.last.r11 == r11
        return self.last


@pytest.fixture
def h():
    return Harness()


def _events(h):
    return [e for e in h.host.events if e[0] == "tdvmcall"]


# ------------------------------------------------------------------ dispatch
@pytest.mark.parametrize("leaf", [0, 1, 11, 0xFFFF, 0x10005, 0x10010, U64_MAX])
def test_unknown_leaf_subfunc_unsupported_no_exit(h, leaf):
    before = h.run.exit_reason
    e = h.in_kernel(guest.tdvmcall(leaf, r12=1, r13=2, r14=3, r15=4), S.SUBFUNC_UNSUPPORTED, r11=leaf)
    assert e.outputs == () and e.value is None
    assert h.run.exit_reason == before                  # kvm_run untouched
    assert _events(h)[-1][2:] == (0, leaf, 0, S.SUBFUNC_UNSUPPORTED)
    assert h.vcpu.stats["nr_tdvmcall_unsupported"] == 1
    check_invariants(h.host)


def test_typed_ops_are_their_leaves(h):
    regs = exits.tdvmcall_regs(guest.map_gpa(0x1000, 0x2000, shared=True), SB)
    assert [regs[r] for r in ("r10", "r11", "r12", "r13")] == [0, TdvmcallLeaf.MAP_GPA, SB | 0x1000, 0x2000]
    assert exits.tdvmcall_regs(guest.map_gpa(SB | 0x1000, 0x1000, shared=False), SB)["r12"] == 0x1000
    regs = exits.tdvmcall_regs(guest.io(0x50, 2, True, 7), SB)
    assert [regs[r] for r in ("r11", "r12", "r13", "r14", "r15")] == [30, 2, 1, 0x50, 7]
    assert regs["rcx"] == TDVMCALL_EXPOSE_REGS_MASK
    # the raw form of a typed op is dispatched identically
    h.in_kernel(guest.tdvmcall(TdvmcallLeaf.GET_TD_VM_CALL_INFO, r12=2), S.INVALID_OPERAND)
    with pytest.raises(TdxTypeError, match="not a TDVMCALL op"):
        exits.tdvmcall_regs(guest.read(0x1000), SB)


def test_no_generic_register_dump_exit():
    run = KvmRun()
    for name in ("unknown", "vmcall"):
        assert not hasattr(run.tdx, name)
    assert TdxExit.__slots__ == ("flags", "nr", "get_quote", "get_tdvmcall_info", "setup_event_notify")
    assert not [m for m in ExitReason.__members__ if "VMCALL" in m or "TDVMCALL" in m]
    assert not hasattr(run, "tdvmcall") and not hasattr(run, "vmcall")


# ------------------------------------------------------------------ KVM hypercalls (R10 != 0)
def test_hypercall_vapic_poll_irq_and_unknown_nr(h):
    h.in_kernel(guest.tdvmcall(0, r10=1), 0)
    assert h.run.hypercall.ret == 0
    for nr in (5, 10, 11, 9, 0x1234):            # no PV feature advertised: -KVM_ENOSYS
        h.in_kernel(guest.tdvmcall(0, r10=nr), (-KVM_HC_ENOSYS) & U64_MAX)
        assert h.run.hypercall.ret == (-KVM_HC_ENOSYS) & U64_MAX
    assert h.vcpu.stats["nr_hypercalls"] == 6 and "nr_hypercall_exits" not in h.vcpu.stats


def test_hypercall_map_gpa_range_disabled_and_invalid():
    h = Harness(hypercall=False)
    h.in_kernel(guest.tdvmcall(0x1000, r10=HC.MAP_GPA_RANGE, r12=1), (-KVM_HC_ENOSYS) & U64_MAX)
    h.vm.enable_cap(Cap.EXIT_HYPERCALL, 1 << HC.MAP_GPA_RANGE)
    einval = (-errno.EINVAL) & U64_MAX
    h.in_kernel(guest.tdvmcall(0x1001, r10=HC.MAP_GPA_RANGE, r12=1), einval)       # unaligned
    h.in_kernel(guest.tdvmcall(0x1000, r10=HC.MAP_GPA_RANGE, r12=0), einval)       # no pages
    h.in_kernel(guest.tdvmcall(0x2000, r10=HC.MAP_GPA_RANGE, r12=U64_MAX), einval)   # gfn + npages wraps


def test_hypercall_map_gpa_range_exit(h):
    h.run.hypercall.args = (9, 9, 9, 9, 9, 9)
    assert h.call(guest.tdvmcall(0x3000, r10=HC.MAP_GPA_RANGE, r12=4, r13=0x10)) is not None
    hc = h.run.hypercall
    assert h.run.exit_reason == ExitReason.HYPERCALL
    assert (hc.nr, hc.args, hc.ret, hc.flags) == (12, (0x3000, 4, 0x10, 9, 9, 9), 0, 1)
    hc.ret = (-errno.EINVAL) & U64_MAX                    # complete_hypercall_exit: R10 = ret
    assert h.resume() is None
    assert h.last.status == (-errno.EINVAL) & U64_MAX and h.last.r11 == 0x3000


# ------------------------------------------------------------------ MapGPA (A25, A26)
def test_map_gpa_not_enabled_precedes_everything():
    h = Harness(hypercall=False)
    for gpa, size in ((0x1001, 0x10), (SB - 0x1000, 0x2000), (U64_MAX, 2), (0x1000, 0x1000)):
        h.in_kernel(guest.tdvmcall(TdvmcallLeaf.MAP_GPA, r12=gpa, r13=size), S.SUBFUNC_UNSUPPORTED, r11=gpa)
    assert not [e for e in h.host.events if e[0] == "tdvmcall" and e[4]]     # no exit at all


@pytest.mark.parametrize("gpa, size, status", [
    (SB - 0x1000, 0x2000, S.INVALID_OPERAND),            # starts private, ends shared
    (U64_MAX & ~0xFFF, 0x2000, S.INVALID_OPERAND),       # wraps
    (0x1000, 0, S.INVALID_OPERAND),                      # size 0: gpa + size <= gpa
    (1 << 48, 0x1000, S.INVALID_OPERAND),                # beyond GPAW: not a legal GPA
    ((1 << 48) - 0x1000, 0x2000, S.INVALID_OPERAND),     # last byte beyond GPAW
    (0x1001, 0x1000, S.ALIGN_ERROR),
    (0x1000, 0x1001, S.ALIGN_ERROR),
    (SB - 0x1001, 0x2000, S.INVALID_OPERAND),            # unaligned AND straddling: range first
    (U64_MAX, 2, S.INVALID_OPERAND),                     # unaligned AND wrapping
])
def test_map_gpa_validation(h, gpa, size, status):
    h.in_kernel(guest.tdvmcall(TdvmcallLeaf.MAP_GPA, r12=gpa, r13=size), status, r11=gpa)


def test_map_gpa_basic_shared(h):
    gpa = SB | 0x8000_0000
    assert h.call(guest.map_gpa(0x8000_0000, 40 << 10, shared=True)) is not None
    hc = h.run.hypercall
    assert h.run.exit_reason == ExitReason.HYPERCALL and h.run.ret == 0
    assert (hc.nr, hc.args[:3], hc.ret, hc.flags) == (12, (0x8000_0000, 10, 0), 0, 1)
    assert h.resume() is None
    assert (h.last.status, h.last.r11) == (S.SUCCESS, TdvmcallLeaf.MAP_GPA)
    assert _events(h)[-1][2:] == (0, TdvmcallLeaf.MAP_GPA, ExitReason.HYPERCALL, None)
    assert gpa == h.last.op.gpa | SB


def test_map_gpa_chunks_private(h):
    gpa = 0x8000_0000
    assert h.call(guest.map_gpa(gpa, 5 << 20, shared=False)) is not None
    seen = []
    while True:
        hc = h.run.hypercall
        seen.append(hc.args[:3])
        r = h.resume()
        if r is None:
            break
    assert seen == [(gpa, 512, MAP_GPA_RANGE_ENCRYPTED), (gpa + MIB2, 512, 16), (gpa + 2 * MIB2, 256, 16)]
    assert h.last.status == S.SUCCESS
    assert h.vcpu.stats["nr_hypercall_exits"] == 3


def test_map_gpa_pending_event_between_chunks_retries(h):
    gpa = SB | 0x8000_0000
    h.call(guest.map_gpa(0x8000_0000, 5 << 20, shared=True))
    h.vcpu.queue_interrupt(0x30)
    assert h.resume() is None
    assert (h.last.status, h.last.r11) == (S.RETRY, gpa + MIB2)


def test_map_gpa_nonzero_ret_is_invalid_operand_618(h):
    gpa = 0x8000_0000
    h.call(guest.map_gpa(gpa, 5 << 20, shared=False))
    assert h.resume() is not None                      # chunk 1 done, chunk 2 exits
    assert h.run.hypercall.args[0] == gpa + MIB2
    h.run.hypercall.ret = 1                             # 6.18: any non-zero ret, no RETRY mapping
    assert h.resume() is None
    assert (h.last.status, h.last.r11) == (S.INVALID_OPERAND, gpa + MIB2)


@pytest.mark.parametrize("ret", [-errno.EAGAIN, -errno.EINVAL, errno.EBUSY, U64_MAX])
def test_map_gpa_any_error_ret_is_invalid_operand(h, ret):
    h.call(guest.map_gpa(0x8000_0000, 0x1000, shared=True))
    h.run.hypercall.ret = ret
    assert h.resume() is None
    assert (h.last.status, h.last.r11) == (S.INVALID_OPERAND, SB | 0x8000_0000)


@pytest.mark.parametrize("bad", ["0", 1.0, None, True, 1 << 64, -(1 << 63) - 1])
def test_map_gpa_bad_completion_einval_stays_armed(h, bad):
    h.call(guest.map_gpa(0x8000_0000, 0x1000, shared=True))
    h.run.hypercall.ret = bad
    ret = h.resume()
    assert ret is not None and ret[0] == -errno.EINVAL and "hypercall.ret" in ret[1]
    assert h.vcpu.completion is not None and h.vcpu.queue       # op still pending
    h.run.hypercall.ret = 0
    assert h.resume() is None and h.last.status == S.SUCCESS


def test_map_gpa_chunks_keep_stale_args(h):
    h.run.hypercall.args = (1, 2, 3, 4, 5, 6)
    h.call(guest.map_gpa(0x8000_0000, 0x1000, shared=False))
    assert h.run.hypercall.args == (0x8000_0000, 1, 16, 4, 5, 6)


# ------------------------------------------------------------------ KVM_EXIT_TDX leaves
def test_get_quote(h):
    h.in_kernel(guest.get_quote(0x8000_0000, 4096), S.INVALID_OPERAND)      # private buffer
    assert h.run.exit_reason != ExitReason.TDX
    assert h.call(guest.get_quote(SB | 0x8000_0000, 4096)) is not None
    t = h.run.tdx
    assert (h.run.exit_reason, t.flags, t.nr) == (ExitReason.TDX, 0, 0x10002)
    assert (t.get_quote.ret, t.get_quote.gpa, t.get_quote.size) == (S.SUBFUNC_UNSUPPORTED, 0x8000_0000, 4096)
    t.get_quote.ret = 0
    assert h.resume() is None and h.last.status == S.SUCCESS
    # userspace that does not answer: the preset reaches the guest
    h.call(guest.get_quote(SB | 0x9000_0000, 1))
    assert h.resume() is None and h.last.status == S.SUBFUNC_UNSUPPORTED
    h.call(guest.get_quote(SB, 0))
    h.run.tdx.get_quote.ret = "done"
    assert h.resume()[0] == -errno.EINVAL


def test_get_tdvmcall_info(h):
    e = h.in_kernel(guest.get_tdvmcall_info(0), S.SUCCESS, r11=0)
    assert e.outputs == (0, 0, 0)
    h.in_kernel(guest.get_tdvmcall_info(2), S.INVALID_OPERAND, r11=TdvmcallLeaf.GET_TD_VM_CALL_INFO)
    h.in_kernel(guest.get_tdvmcall_info(U64_MAX), S.INVALID_OPERAND)
    assert h.call(guest.get_tdvmcall_info(1)) is not None
    t = h.run.tdx
    i = t.get_tdvmcall_info
    assert (h.run.exit_reason, t.nr, i.ret, i.leaf, i.r11, i.r12, i.r13, i.r14) == (
        ExitReason.TDX, 0x10000, S.SUCCESS, 1, 0, 0, 0, 0)
    i.r11, i.r12, i.r13, i.r14 = 2, 3, 4, 5
    assert h.resume() is None
    assert (h.last.status, h.last.r11, h.last.outputs) == (S.SUCCESS, 2, (3, 4, 5))


@pytest.mark.parametrize("vector", [0, 31, 256, U64_MAX])
def test_setup_event_notify_bad_vector(h, vector):
    h.in_kernel(guest.setup_event_notify(vector), S.INVALID_OPERAND)


@pytest.mark.parametrize("vector", [32, 255])
def test_setup_event_notify_exit(h, vector):
    assert h.call(guest.setup_event_notify(vector)) is not None
    t = h.run.tdx
    assert (h.run.exit_reason, t.nr, t.setup_event_notify.ret, t.setup_event_notify.vector) == (
        ExitReason.TDX, 0x10004, S.SUBFUNC_UNSUPPORTED, vector)
    t.setup_event_notify.ret = S.SUCCESS
    assert h.resume() is None and h.last.status == S.SUCCESS


def test_report_fatal_error(h):
    code = 0x0BAAAAAD00000000
    assert h.call(guest.report_fatal_error(code)) is not None
    se = h.run.system_event
    assert (h.run.exit_reason, se.type, se.ndata, len(se.data)) == (ExitReason.SYSTEM_EVENT, 7, 16, 16)
    assert se.data[12] == code and se.data[13] == 0
    assert se.data[0] == EXIT_REASON_TDCALL and se.data[1] == TDVMCALL_EXPOSE_REGS_MASK
    assert se.data[4] == se.data[5] == 0 and se.data[10] == 0 and se.data[11] == 0x10003
    assert h.resume() is None and h.last.status == S.SUCCESS


def test_report_fatal_error_raw_registers_in_gpr_order(h):
    regs = dict(rdx=2, rbx=3, rsi=6, rdi=7, r8=8, r9=9, r12=12, r13=13, r14=14, r15=15)
    h.call(guest.tdvmcall(TdvmcallLeaf.REPORT_FATAL_ERROR, **regs))
    d = h.run.system_event.data
    assert d[2:4] == (2, 3) and d[4:6] == (0, 0) and d[6:8] == (6, 7)
    assert d[8:] == (8, 9, 0, 0x10003, 12, 13, 14, 15)


# ------------------------------------------------------------------ instruction leaves
def test_hlt(h):
    ret = h.call(guest.hlt())
    assert ret is not None and h.run.exit_reason == ExitReason.HLT
    assert h.vcpu.completion is None and not h.vcpu.queue and h.last.status == S.SUCCESS


@pytest.mark.parametrize("size, write", [(5, 1), (3, 0), (0, 1), (8, 1), (1, 2), (5, 2), (2, U64_MAX)])
def test_io_invalid(h, size, write):
    h.in_kernel(guest.io(0x50, size, write, 1), S.INVALID_OPERAND)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_io_out_exact_data(h, size):
    assert h.call(guest.io(0x10050, size, True, 0x1122334455667788)) is not None
    io = h.run.io
    assert (h.run.exit_reason, io.direction, io.size, io.port, io.count) == (ExitReason.IO, 1, size, 0x50, 1)
    assert io.data == (0x1122334455667788).to_bytes(8, "little")[:size]
    assert h.resume() is None and h.last.status == S.SUCCESS and h.last.value is None


def test_io_in_completes_from_data(h):
    h.call(guest.io(0x50, 2, False))
    assert (h.run.io.direction, h.run.io.data) == (0, b"\0\0")
    h.run.io.data = b"\x34\x12\xff"
    assert h.resume() is None
    assert (h.last.status, h.last.r11, h.last.value) == (S.SUCCESS, 0x1234, 0x1234)
    h.call(guest.io(0x50, 4, False))
    h.run.io.data = b"\x01"
    assert h.resume()[0] == -errno.EINVAL and h.vcpu.completion is not None


@pytest.mark.parametrize("gpa, size, write", [
    (SB | 0x1000, 3, 0), (SB | 0x1000, 16, 1), (SB | 0x1000, 4, 2),
    (0x1000, 4, 0),                                   # private
    ((1 << 48) - 4, 8, 1),                            # first byte shared, last byte private (bit 48)
    (SB - 2, 4, 0),                                   # first byte private
    (0x1000, 5, 2),                                   # everything wrong: still INVALID_OPERAND
])
def test_mmio_invalid(h, gpa, size, write):
    h.in_kernel(guest.mmio(gpa, size, write, 0), S.INVALID_OPERAND)


def test_mmio_write_and_read(h):
    h.run.mmio.data = bytes(range(8))
    assert h.call(guest.mmio(SB | 0xFEC0_0000, 2, True, 0xBEEF)) is not None
    m = h.run.mmio
    assert (h.run.exit_reason, m.phys_addr, m.len, m.is_write) == (ExitReason.MMIO, 0xFEC0_0000, 2, True)
    assert m.data == b"\xef\xbe" + bytes(range(2, 8))     # memcpy of len bytes; the rest stale
    assert h.resume() is None and h.last.status == S.SUCCESS
    h.call(guest.mmio(SB | 0xFEC0_0010, 8, False))
    assert not h.run.mmio.is_write
    h.run.mmio.data = (0x0102030405060708).to_bytes(8, "little")
    assert h.resume() is None
    assert (h.last.status, h.last.value, h.last.r11) == (S.SUCCESS, 0x0102030405060708, 0x0102030405060708)


def test_cpuid(h):
    e = h.in_kernel(guest.cpuid(0x80000008), S.SUCCESS, r11=TdvmcallLeaf.CPUID)
    assert e.outputs == (48 | (48 << 16), 0, 0, 0)
    assert h.in_kernel(guest.cpuid(0x4000_0000, 3), S.SUCCESS).outputs == (0, 0, 0, 0)


def test_msr_read_write(h):
    e = h.in_kernel(guest.msr_read(0x1B), S.SUCCESS)                    # APIC base: x2APIC, BSP
    assert e.value == e.r11 == 0xFEE00000 | 0xD00
    assert h.in_kernel(guest.msr_read(0xC0000080), S.SUCCESS).value == 0xD01     # EFER
    assert h.in_kernel(guest.msr_read(0x3A), S.SUCCESS).value == 1                # FEAT_CTL locked
    assert h.in_kernel(guest.msr_read(0x277), S.SUCCESS).value == MSR_IA32_CR_PAT_DEFAULT
    h.in_kernel(guest.msr_write(0x277, 0x0606060606060606), S.SUCCESS)
    assert h.in_kernel(guest.msr_read(0x277), S.SUCCESS).value == 0x0606060606060606
    for ro in (0x1B, 0xC0000080, 0x3A):                                 # read-only for a TD
        h.in_kernel(guest.msr_write(ro, 0), S.INVALID_OPERAND)
    for idx in (0x10, 0x4D0, 0x808, 0xC0000081):                        # not emulated / no LMCE
        h.in_kernel(guest.msr_read(idx), S.INVALID_OPERAND)
    h.in_kernel(guest.msr_read(0x802), S.SUCCESS)                       # x2APIC id: emulated
    h.in_kernel(guest.tdvmcall(TdvmcallLeaf.MSR_READ, r12=(1 << 32) | 0x1B), S.SUCCESS)   # ECX = low 32


def test_msr_filter_denies(h):
    exits.set_msr_filter(h.vm, exits.MsrFilter(deny_read=frozenset({0x277, 0x802}),
                                               deny_write=frozenset({0x277})))
    h.in_kernel(guest.msr_read(0x277), S.INVALID_OPERAND)
    h.in_kernel(guest.msr_write(0x277, 0), S.INVALID_OPERAND)
    h.in_kernel(guest.msr_read(0x802), S.SUCCESS)                        # x2APIC MSRs are never filtered
    exits.set_msr_filter(h.vm, None)
    h.in_kernel(guest.msr_read(0x277), S.SUCCESS)
    with pytest.raises(TdxTypeError, match="msr_filter"):
        exits.set_msr_filter(h.vm, {0x277})


# ------------------------------------------------------------------ random leaves and registers
_REG_NAMES = ("r10", "r12", "r13", "r14", "r15")
_LEAF = st.one_of(st.sampled_from(sorted(exits.KNOWN_LEAVES)), st.integers(0, 0x10010),
                  st.integers(0, U64_MAX))
_VAL = st.one_of(st.integers(0, 300), st.sampled_from([SB, SB | 0x8000_0000, 0x8000_0000, 1 << 48]),
                 st.integers(0, U64_MAX))
_HYPERCALL_RESULTS = {0, (-KVM_HC_ENOSYS) & U64_MAX, (-errno.EINVAL) & U64_MAX}


@pytest.fixture(scope="module")
def shared_harness():
    return Harness()


@settings(max_examples=150, deadline=None)
@given(leaf=_LEAF, regs=st.dictionaries(st.sampled_from(_REG_NAMES), _VAL, max_size=5),
       hypercall=st.booleans())
def test_random_tdvmcalls_legal_and_contained(shared_harness, leaf, regs, hypercall):
    h = shared_harness
    if not hypercall:
        regs["r10"] = 0
    op = guest.tdvmcall(leaf, **regs)
    n = len(h.vcpu.guest_log)
    ret = h.call(op)
    unknown = not regs.get("r10") and leaf not in exits.KNOWN_LEAVES
    if unknown:
        assert ret is None
    exits_seen = 0
    while h.vcpu.queue:                          # userspace answers with the presets
        assert ret is not None and ret[0] == 0
        exits_seen += 1
        if exits_seen > 3:
            h.run.hypercall.ret = 1              # stop a long MapGPA
        ret = h.resume()
    assert len(h.vcpu.guest_log) == n + 1
    e = h.last
    if unknown:
        assert e.status == S.SUBFUNC_UNSUPPORTED and exits_seen == 0
    elif regs.get("r10"):
        assert e.status in _HYPERCALL_RESULTS | {1}
    else:
        assert e.status in exits.LEGAL_STATUSES
    check_invariants(h.host, ["I23"])
