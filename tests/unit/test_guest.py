"""Guest-op constructors (SPEC §3.3, issue 7).

Types are checked and values bounded to their register width; nothing KVM itself refuses is
refused here.
"""

from __future__ import annotations

import dataclasses

import pytest

from tdxcore import guest
from tdxcore.errors import TdxTypeError, TdxValueError

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1


def test_ops_tuples():
    assert guest.MEMORY_OPS == (guest.Read, guest.Write, guest.Accept)
    assert set(guest.MEMORY_OPS) < set(guest.OPS) and len(set(guest.OPS)) == 15
    for cls in guest.OPS:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def test_constructors_build_their_op():
    assert guest.accept(0x1000) == guest.Accept(0x1000, 0)
    assert guest.accept(0x1000, 1) == guest.Accept(0x1000, 1)
    assert guest.map_gpa(0x1000, 0x2000, shared=True) == guest.MapGpa(0x1000, 0x2000, True)
    assert guest.get_quote(1 << 47, 4096) == guest.GetQuote(1 << 47, 4096)
    assert guest.report_fatal_error(0x0BAAAAAD00000000) == guest.ReportFatalError(0x0BAAAAAD00000000)
    assert guest.get_tdvmcall_info(1) == guest.GetTdvmcallInfo(1)
    assert guest.setup_event_notify(32) == guest.SetupEventNotify(32)
    assert guest.io(0x50, 1, True, 0xAB) == guest.Io(0x50, 1, 1, 0xAB)
    assert guest.io(0x50, 4, False) == guest.Io(0x50, 4, 0, 0)
    assert guest.mmio(1 << 47, 8, 1, U64) == guest.Mmio(1 << 47, 8, 1, U64)
    assert guest.msr_read(0x1B) == guest.MsrRead(0x1B)
    assert guest.msr_write(0x277, U64) == guest.MsrWrite(0x277, U64)
    assert guest.cpuid(1) == guest.Cpuid(1, 0) and guest.cpuid(7, 1) == guest.Cpuid(7, 1)
    assert guest.tdvmcall(0x10010) == guest.Tdvmcall(0x10010, ())


def test_tdvmcall_regs_sorted_and_hashable():
    a = guest.tdvmcall(1, r13=3, r10=5, r12=4)
    b = guest.tdvmcall(1, r12=4, r13=3, r10=5)
    assert a == b and hash(a) == hash(b)
    assert a.regs == (("r10", 5), ("r12", 4), ("r13", 3))
    for bad in ("r11", "rcx", "rax", "rsp", "rbp", "R12", "xmm0"):
        with pytest.raises(TdxValueError, match="not a TDVMCALL register"):
            guest.tdvmcall(1, **{bad: 0})
    with pytest.raises(TdxValueError, match="r12=0x10000000000000000 is out of range"):
        guest.tdvmcall(1, r12=1 << 64)
    with pytest.raises(TdxTypeError, match="r13"):
        guest.tdvmcall(1, r13="1")


def test_values_kvm_refuses_are_accepted():
    # the guest can issue these; KVM answers INVALID_OPERAND / ALIGN_ERROR (tests/kvm/test_exits.py)
    guest.io(0x50, 5, 2, 0)
    guest.io(U64, U64, U64, U64)
    guest.mmio(0x1000, 3, 7)
    guest.setup_event_notify(7)
    guest.setup_event_notify(U64)
    guest.map_gpa(0x1001, 0x1001, shared=False)
    guest.map_gpa(U64, U64, shared=True)
    guest.get_quote(0x1000, 0)                  # a private buffer
    guest.get_tdvmcall_info(2)


def test_intenum_values_are_stored_plain():
    import enum

    class E(enum.IntEnum):
        X = 1

    op = guest.tdvmcall(E.X, r10=E.X)
    assert type(op.leaf) is int and type(op.regs[0][1]) is int
    assert type(guest.accept(0, E.X).level) is int and guest.accept(0, E.X).level == 1


@pytest.mark.parametrize("make, name", [
    (lambda: guest.accept(-1), "gpa"),
    (lambda: guest.accept(1 << 64), "gpa"),
    (lambda: guest.accept(0, 5), "level"),
    (lambda: guest.map_gpa(0, 1 << 64, True), "size"),
    (lambda: guest.get_quote(-1, 0), "gpa"),
    (lambda: guest.report_fatal_error(1 << 64), "code"),
    (lambda: guest.get_tdvmcall_info(-1), "leaf"),
    (lambda: guest.setup_event_notify(1 << 64), "vector"),
    (lambda: guest.io(1 << 64, 1, 1), "port"),
    (lambda: guest.io(0, 1, 1 << 64), "write"),
    (lambda: guest.mmio(0, 1, 0, -1), "value"),
    (lambda: guest.msr_read(U32 + 1), "index"),
    (lambda: guest.msr_write(0, 1 << 64), "value"),
    (lambda: guest.cpuid(U32 + 1), "leaf"),
    (lambda: guest.cpuid(0, U32 + 1), "subleaf"),
])
def test_out_of_register_width(make, name):
    with pytest.raises(TdxValueError) as ei:
        make()
    assert ei.value.name == name


@pytest.mark.parametrize("make, name", [
    (lambda: guest.accept("0"), "gpa"),
    (lambda: guest.accept(0, True), "level"),
    (lambda: guest.map_gpa(0, 4096, 1), "shared"),
    (lambda: guest.map_gpa(0.0, 4096, True), "gpa"),
    (lambda: guest.get_quote(0, None), "size"),
    (lambda: guest.report_fatal_error(True), "code"),
    (lambda: guest.io(0, 1.0, 1), "size"),
    (lambda: guest.io(0, 1, "out"), "write"),
    (lambda: guest.mmio(0, 1, None), "write"),
    (lambda: guest.msr_read(False), "index"),
    (lambda: guest.cpuid("1"), "leaf"),
    (lambda: guest.tdvmcall(None), "leaf"),
])
def test_wrong_types(make, name):
    with pytest.raises(TdxTypeError) as ei:
        make()
    assert ei.value.name == name


def test_ops_are_frozen():
    for op in (guest.io(1, 1, 1), guest.tdvmcall(1, r12=1), guest.map_gpa(0, 1, True)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            op.size = 2  # type: ignore[misc, union-attr]
