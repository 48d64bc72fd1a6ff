"""status.py: every status code and operand id with the module's spelling; TdxStatus formatting."""

from __future__ import annotations

import csv

import pytest

from tdxcore import status
from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.status import Leaf, SeptState, TdcallLeaf, TdxLevel, TdxStatus


def _csv_rows():
    with open(status.DATA_DIR / "tdx_status_codes.csv", newline="") as fh:
        return list(csv.DictReader(ln for ln in fh if not ln.startswith("#")))


def test_every_status_and_operand_is_exposed_with_module_spelling():
    rows = _csv_rows()
    statuses = [r for r in rows if r["kind"] == "status"]
    operands = [r for r in rows if r["kind"] == "operand_id"]
    assert len(statuses) == 168 and len(operands) == 50
    for r in statuses:
        assert getattr(status, r["name"]) == int(r["value"], 16), r["name"]
    for r in operands:
        assert getattr(status, r["name"]) == int(r["value"]), r["name"]


def test_kvm_alias_operand_id_sept():
    assert status.OPERAND_ID_SEPT == status.OPERAND_ID_SEPT_TREE == 146


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0x8000020000000092, "TDX_OPERAND_BUSY|SEPT_TREE (0x8000020000000092)"),
        (0x80000200000000A9, "TDX_OPERAND_BUSY|TD_EPOCH (0x80000200000000A9)"),
        (0xC0000B0D00000001, "TDX_EPT_ENTRY_STATE_INCORRECT|RCX (0xC0000B0D00000001)"),
        (0x00000B0700000001, "TDX_GPA_RANGE_ALREADY_BLOCKED|RCX (0x00000B0700000001)"),
        (0x8000020400000001, "TDX_OPERAND_BUSY_HOST_PRIORITY|RCX (0x8000020400000001)"),
        (0xC000030000000008, "TDX_PAGE_METADATA_INCORRECT|R8 (0xC000030000000008)"),
        (0x8000020100000000, "TDX_PREVIOUS_TLB_EPOCH_BUSY (0x8000020100000000)"),
        (0x0000000000000030, "TDX_SUCCESS|0x30 (0x0000000000000030)"),
        (0x0000082100000000, "TDX_NO_HKID_READY_TO_WBCACHE (0x0000082100000000)"),
        (0xC000060800000007, "TDX_OP_STATE_INCORRECT|0x7 (0xC000060800000007)"),
    ],
)
def test_status_str_and_repr(value, text):
    s = TdxStatus(value)
    assert str(s) == repr(s) == text
    assert s == value and isinstance(s, int)


def test_status_fields():
    s = TdxStatus(status.TDX_OPERAND_BUSY | status.OPERAND_ID_SEPT_TREE)
    assert s.is_error and s.base == status.TDX_OPERAND_BUSY and s.operand == 146
    w = TdxStatus(status.TDX_GPA_RANGE_ALREADY_BLOCKED | status.OPERAND_ID_RCX)
    assert not w.is_error and w.base == status.TDX_GPA_RANGE_ALREADY_BLOCKED
    assert not TdxStatus(0).is_error and TdxStatus(0).name == "TDX_SUCCESS"


@pytest.mark.parametrize("bad", [-1, 1 << 64])
def test_status_out_of_range(bad):
    with pytest.raises(TdxValueError, match="value="):
        TdxStatus(bad)


@pytest.mark.parametrize("bad", ["0", 1.0, None, True])
def test_status_wrong_type(bad):
    with pytest.raises(TdxTypeError, match="value="):
        TdxStatus(bad)


def test_leaf_enums_are_separate():
    assert Leaf.TDH_MEM_PAGE_AUG == 6 and TdcallLeaf.TDG_MEM_PAGE_ACCEPT == 6
    assert Leaf.TDH_MEM_PAGE_AUG is not TdcallLeaf.TDG_MEM_PAGE_ACCEPT
    assert type(Leaf.TDH_MEM_PAGE_AUG) is not type(TdcallLeaf.TDG_MEM_PAGE_ACCEPT)
    assert str(Leaf.TDH_MEM_RANGE_BLOCK) == "TDH.MEM.RANGE.BLOCK"
    assert str(TdcallLeaf.TDG_MEM_PAGE_ACCEPT) == "TDG.MEM.PAGE.ACCEPT"
    assert Leaf.TDH_MEM_TRACK == 38 and Leaf.TDH_PHYMEM_PAGE_RECLAIM == 28 and Leaf.TDH_SYS_CONFIG == 45


def test_leaf_numbers_match_module_tables():
    """Every leaf named in the legality CSVs has that number in Leaf / TdcallLeaf."""
    for name in ("sept_leaf_legality.csv", "op_state_legality.csv"):
        with open(status.DATA_DIR / name, newline="") as fh:
            for r in csv.DictReader(ln for ln in fh if not ln.startswith("#")):
                enum_cls = TdcallLeaf if r["leaf"].startswith("TDG.") else Leaf
                key = r["leaf"].replace(".", "_")
                if key in enum_cls.__members__:
                    assert enum_cls[key] == int(r["leaf_number"]), r["leaf"]


def test_levels_use_module_numbering():
    assert [int(x) for x in TdxLevel] == [0, 1, 2, 3, 4]
    assert TdxLevel.L4K == 0 and TdxLevel.L2M == 1


def test_sept_states_and_tables():
    assert SeptState.FREE == 0x0E and SeptState.NL_MAPPED == 0x00 and SeptState.PENDING == 0x70
    assert len(SeptState) == 16
    assert sorted(status.SEPT_STATE_INDEX.values()) == list(range(16))
    assert len(status.SEPT_LEGALITY_SEAMCALL) == 19 and len(status.SEPT_LEGALITY_TDCALL) == 3  # 22 leaves
    aug = status.SEPT_LEGALITY_SEAMCALL[Leaf.TDH_MEM_PAGE_AUG]
    assert [s.name for s in SeptState if aug[status.SEPT_STATE_INDEX[s]]] == ["FREE", "REMOVED"]
    assert status.OP_STATE_TLB_TRACKING_REQUIRED[status.OpState.RUNNABLE]
    assert not status.OP_STATE_TLB_TRACKING_REQUIRED[status.OpState.INITIALIZED]


def test_status_module_is_stdlib_only():
    """setup.py runs status.py and constants.py standalone: they may import only the stdlib."""
    import ast
    import sys
    from pathlib import Path

    for name in ("status.py", "constants.py"):
        tree = ast.parse((Path(status.__file__).parent / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top = node.module.split(".")[0]
            elif isinstance(node, ast.Import):
                top = node.names[0].name.split(".")[0]
            else:
                continue
            # status.py imports tdxcore.errors lazily inside TdxStatus.__new__ only (error path).
            if top == "tdxcore" and name == "status.py":
                continue
            assert top in sys.stdlib_module_names or top == "__future__", (name, top)
