"""The S-EPT legality oracle (SPEC §4.2).

For every op of {SEPT.ADD, PAGE.ADD, AUG, BLOCK, UNBLOCK, PAGE.REMOVE, SEPT.REMOVE, ACCEPT} and
each of the 16 L1 states, the entry is forced into the state and the REAL operation runs (TD
RUNNABLE-like: tracking required, but BEPOCH 0 is tracked at td_epoch 2, so tracking never masks
the state check). ``status == EPT_ENTRY_STATE_INCORRECT|RCX`` must hold exactly when the
module's raw ``allowed`` bit is 0, read here straight from ``tdxcore/data/*.csv`` -- except for
the cases in ``OVERRIDES``, which are exactly SPEC §4.2's handler rules. Runs on core and twin.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, Tuple

import pytest

import tdxcore._pamt as core_pamt
import tdxcore._sept as core_sept
import tdxcore.reference.pamt as twin_pamt
import tdxcore.reference.sept as twin_sept

DATA = Path(__file__).resolve().parents[2] / "tdxcore" / "data"


def _csv(name: str):
    with open(DATA / name, newline="") as fh:
        return list(csv.DictReader(ln for ln in fh if not ln.startswith("#")))


def _status(name: str) -> int:
    for r in _csv("tdx_status_codes.csv"):
        if r["name"] == name:
            return int(r["value"], 0)
    raise KeyError(name)


STATES = {r["name"]: r for r in _csv("sept_states.csv") if r["scope"] == "L1"}
ALLOWED: Dict[Tuple[str, str], int] = {
    (r["leaf"], r["state"]): int(r["allowed"]) for r in _csv("sept_leaf_legality.csv")
}
RCX = _status("OPERAND_ID_RCX")
STATE_INCORRECT = _status("TDX_EPT_ENTRY_STATE_INCORRECT") | RCX
ALREADY_BLOCKED = _status("TDX_GPA_RANGE_ALREADY_BLOCKED") | RCX
SUCCESS = _status("TDX_SUCCESS")
ALREADY_ACCEPTED = _status("TDX_PAGE_ALREADY_ACCEPTED")
SIZE_MISMATCH = _status("TDX_PAGE_SIZE_MISMATCH")
ACCEPT_EPT_VIOLATION = SUCCESS | 48   # EXIT_REASON_EPT_VIOLATION (SPEC §4.2)

OPS = ["TDH.MEM.SEPT.ADD", "TDH.MEM.PAGE.ADD", "TDH.MEM.PAGE.AUG", "TDH.MEM.RANGE.BLOCK",
       "TDH.MEM.RANGE.UNBLOCK", "TDH.MEM.PAGE.REMOVE", "TDH.MEM.SEPT.REMOVE",
       "TDG.MEM.PAGE.ACCEPT"]


def _accept_rule(state: str, level: int) -> int:
    """SPEC §4.2: ACCEPT never returns EPT_ENTRY_STATE_INCORRECT."""
    s = STATES[state]
    if ALLOWED[("TDG.MEM.PAGE.ACCEPT", state)]:
        return SUCCESS
    if s["guest_accessible_leaf"] == "1":
        return ALREADY_ACCEPTED | level
    if s["kind"] == "non-leaf":
        return SIZE_MISMATCH | level
    return ACCEPT_EPT_VIOLATION


#: The complete override table: SPEC §4.2's handler rules, nothing else.
OVERRIDES = {
    ("TDH.MEM.RANGE.BLOCK", "NL_BLOCKED"): lambda lv: ALREADY_BLOCKED,
    ("TDH.MEM.RANGE.BLOCK", "BLOCKED"): lambda lv: ALREADY_BLOCKED,
    ("TDH.MEM.RANGE.BLOCK", "PENDING_BLOCKED"): lambda lv: ALREADY_BLOCKED,
    ("TDH.MEM.SEPT.ADD", "NL_MAPPED"): lambda lv: STATE_INCORRECT,
    **{("TDG.MEM.PAGE.ACCEPT", st): (lambda lv, st=st: _accept_rule(st, lv)) for st in STATES},
}

IMPLS = {"core": (core_sept, core_pamt), "twin": (twin_sept, twin_pamt)}
PAGE = 1024          # a free, 512-aligned frame for the op under test
TD_EPOCH = 2         # BEPOCH 0 is tracked at epoch 2 with refcount_prev 0


def _level(op: str, state: str) -> int:
    if op in ("TDH.MEM.SEPT.ADD", "TDH.MEM.SEPT.REMOVE"):
        return 1
    if STATES[state]["kind"] == "non-leaf" and op != "TDH.MEM.PAGE.ADD":
        return 1
    return 0


def _run(tree, op: str, gpa: int, level: int) -> int:
    if op == "TDH.MEM.SEPT.ADD":
        return tree.sept_add(gpa, level, PAGE)[0]
    if op == "TDH.MEM.PAGE.ADD":
        return tree.page_add(gpa, level, PAGE)[0]
    if op == "TDH.MEM.PAGE.AUG":
        return tree.page_aug(gpa, level, PAGE)[0]
    if op == "TDH.MEM.RANGE.BLOCK":
        return tree.range_block(gpa, level, TD_EPOCH, 0, True)[0]
    if op == "TDH.MEM.RANGE.UNBLOCK":
        return tree.range_unblock(gpa, level, TD_EPOCH, 0, True)[0]
    if op == "TDH.MEM.PAGE.REMOVE":
        return tree.page_remove(gpa, level, TD_EPOCH, 0, True)[0]
    if op == "TDH.MEM.SEPT.REMOVE":
        return tree.sept_remove(gpa, level, TD_EPOCH, 0, True)[0]
    return tree.page_accept(gpa, level)[0]


CASES = [(impl, op, st) for impl in IMPLS for op in OPS for st in STATES]


def test_override_table_is_exactly_spec_4_2():
    blocks = {st for (op, st) in OVERRIDES if op == "TDH.MEM.RANGE.BLOCK"}
    assert blocks == {"NL_BLOCKED", "BLOCKED", "PENDING_BLOCKED"}
    assert [k for k in OVERRIDES if k[0] == "TDH.MEM.SEPT.ADD"] == [("TDH.MEM.SEPT.ADD", "NL_MAPPED")]
    assert {st for (op, st) in OVERRIDES if op == "TDG.MEM.PAGE.ACCEPT"} == set(STATES)
    assert len(OVERRIDES) == 3 + 1 + 16
    assert len(STATES) == 16


@pytest.mark.parametrize(("impl", "op", "state"), CASES,
                         ids=[f"{i}-{o}-{s}" for i, o, s in CASES])
def test_legality_oracle(impl, op, state):
    sept, pamt_mod = IMPLS[impl]
    tree = sept.SeptTree(levels=4, pamt=pamt_mod.Pamt(1 << 16), tdr=1)
    level = _level(op, state)
    gpa = 3 << 21                       # a 2M-aligned GPA, not the first table slot
    sept._testing_force_state(tree, gpa, level, int(STATES[state]["encoding_hex"], 16))
    status = _run(tree, op, gpa, level)
    if (op, state) in OVERRIDES:
        assert status == OVERRIDES[(op, state)](level), hex(status)
        return
    allowed = ALLOWED[(op, state)]
    assert (status == STATE_INCORRECT) == (allowed == 0), hex(status)
