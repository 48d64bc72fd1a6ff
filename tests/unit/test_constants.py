"""constants.py: kernel values (include/uapi/linux/kvm.h, 6.18) and model bounds."""

from __future__ import annotations

from tdxcore import constants as c


def test_kvm_abi_values():
    assert c.VmType.TDX == 5 and c.VmType.SW_PROTECTED == 1
    assert c.ExitReason.MEMORY_FAULT == 39 and c.ExitReason.TDX == 40 and c.ExitReason.HYPERCALL == 3
    assert c.ExitReason.SYSTEM_EVENT == 24 and c.ExitReason.MMIO == 6 and c.ExitReason.IO == 2
    assert c.MemAttr.PRIVATE == 1 << 3 and c.MEMORY_EXIT_FLAG_PRIVATE == 1 << 3
    assert c.MemFlag.GUEST_MEMFD == 1 << 2
    assert c.Cap.MEMORY_ATTRIBUTES == 233 and c.Cap.SPLIT_IRQCHIP == 121 and c.Cap.EXIT_HYPERCALL == 201
    assert c.HC.MAP_GPA_RANGE == 12 and c.SYSTEM_EVENT_TDX_FATAL == 7
    assert c.TdAttr.SEPT_VE_DISABLE == 1 << 28


def test_tdvmcall_statuses():
    s = c.TdvmcallStatus
    assert (s.SUCCESS, s.RETRY) == (0, 1)
    assert s.INVALID_OPERAND == 0x8000000000000000 and s.ALIGN_ERROR == 0x8000000000000002
    assert s.SUBFUNC_UNSUPPORTED == 0x8000000000000003


def test_sept_entry_bits_reproduce_module_masks():
    """Encoding bit i maps to entry bit SEPT_STATE_BITS[i] (reference/README.md)."""
    import csv

    from tdxcore.status import DATA_DIR

    with open(DATA_DIR / "sept_states.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(ln for ln in fh if not ln.startswith("#")) if r["scope"] == "L1"]
    for r in rows:
        enc = int(r["encoding_hex"], 16)
        mask = 0
        for i, bit in enumerate(c.SEPT_STATE_BITS):
            if enc >> i & 1:
                mask |= 1 << bit
        assert mask == int(r["entry_bits_mask_hex"], 16), r["name"]


def test_pamt_page_types():
    assert [(t.name, int(t)) for t in c.PageType] == [
        ("PT_NDA", 0), ("PT_RSVD", 1), ("PT_REG", 3), ("PT_TDR", 4), ("PT_TDCX", 5), ("PT_TDVPR", 6),
        ("PT_EPT", 8),
    ]


def test_retry_bounds():
    assert c.SEAMCALL_RETRY_MAX == 16 and c.TRACK_RETRY_MAX == 10_000
    assert c.MAX_LOCAL_RETRIES == 1_000_000 and c.ZERO_STEP_THRESHOLD == 6
