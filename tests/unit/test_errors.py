"""errors.py: the exception tree and check_int."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from tdxcore.errors import InvariantViolation, KvmError, TdxError, TdxTypeError, TdxValueError, check_int


def test_tree():
    assert issubclass(TdxTypeError, TypeError) and issubclass(TdxTypeError, TdxError)
    assert issubclass(TdxValueError, ValueError) and issubclass(TdxValueError, TdxError)
    assert issubclass(KvmError, OSError) and issubclass(KvmError, TdxError)
    assert issubclass(InvariantViolation, AssertionError)


def test_kvm_error_carries_errno_and_hw_error():
    e = KvmError(errno.EINVAL, "KVM_SET_MEMORY_ATTRIBUTES: size 0 is not allowed", hw_error=0xC000010000000040)
    assert e.errno == errno.EINVAL and e.hw_error == 0xC000010000000040
    assert "size 0" in str(e)


def test_invariant_violation_message():
    e = InvariantViolation("I12", "in_progress went negative", gfn=0x10, event_index=7, replay="tdxcore replay r.json")
    assert e.invariant == "I12" and e.gfn == 0x10 and e.event_index == 7
    assert str(e).startswith("I12: in_progress went negative") and "replay: tdxcore replay r.json" in str(e)


def test_check_int():
    assert check_int("gfn", 5, 0, 10) == 5
    assert check_int("gfn", np.uint64(7), 0, 10) == 7
    with pytest.raises(TdxValueError, match=r"gfn=0xa is out of range") as ei:
        check_int("gfn", 10, 0, 10)
    assert ei.value.name == "gfn" and ei.value.value == 10
    with pytest.raises(TdxTypeError, match=r"gfn=True must be an int, not bool"):
        check_int("gfn", True, 0, 10)
    with pytest.raises(TdxTypeError, match=r"gfn=1.5 must be an int"):
        check_int("gfn", 1.5, 0, 10)


def test_check_u64_array():
    from tdxcore.errors import check_u64_array

    a = check_u64_array("gfns", [1, 2, 3], 10)
    assert a.dtype == np.uint64 and a.flags["C_CONTIGUOUS"] and list(a) == [1, 2, 3]
    assert check_u64_array("gfns", np.array([2**64 - 1], dtype=np.uint64))[0] == 2**64 - 1
    with pytest.raises(TdxTypeError, match=r"gfns must be an integer array \(dtype=float64\)"):
        check_u64_array("gfns", [1.5])
    with pytest.raises(TdxTypeError, match=r"dtype=bool"):
        check_u64_array("gfns", [True])
    with pytest.raises(TdxValueError, match=r"gfns must be 1-D \(ndim=2\)"):
        check_u64_array("gfns", np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TdxValueError, match=r"gfns\[1\]=-0x1 is out of range \[0x0, 0xa\)"):
        check_u64_array("gfns", np.array([0, -1]), 10)
    with pytest.raises(TdxValueError, match=r"gfns\[2\]=0xa is out of range") as ei:
        check_u64_array("gfns", np.array([0, 9, 10], dtype=np.uint64), 10)
    assert ei.value.name == "gfns" and ei.value.value == 10
