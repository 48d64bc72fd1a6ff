"""Differential state machine: ``tdxcore._sept.SeptTree`` vs its twin, plus the mutation test.

Both trees start with the tables over the first 4 MiB (so leaf ops succeed from step one) and
then run the same random ops; results must be equal down to every status bit, and the full
state (every entry, table frames, PAMT) must agree after each step.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import tdxcore._pamt as core_pamt
import tdxcore._sept as core_sept
import tdxcore.reference.pamt as twin_pamt
import tdxcore.reference.sept as twin_sept
from tdxcore.errors import TdxError
from tdxcore.status import SeptState

M2 = 1 << 21
GPA4K = st.sampled_from([0, 0x1000, M2, M2 + 0x1000, 1 << 47, 0x800])
GPA_ANY = GPA4K | st.sampled_from([0, M2, 3 * M2, 1 << 30, 1 << 39])
LEVELS = st.sampled_from([0, 0, 1, 1, 2, 3, 4])
PAGES = st.sampled_from([100, 101, 102, 103, 104, 1024, 1536, 1 << 14, 1])
EPOCH = st.integers(0, 4)
STATES = st.sampled_from([int(s) for s in SeptState])


class SeptMachine(RuleBasedStateMachine):
    mutation = "none"

    @initialize()
    def setup(self):
        self.c = core_sept.SeptTree(4, core_pamt.Pamt(1 << 14), tdr=1)
        self.t = twin_sept.SeptTree(4, twin_pamt.Pamt(1 << 14), tdr=1)
        core_sept._testing_mutate(self.c, self.mutation)
        for tree in (self.c, self.t):
            tree.sept_add_range(0, 1024, np.arange(10, 20))

    def _same(self, name, *args):
        out = []
        for tree in (self.c, self.t):
            try:
                out.append(("ok", tuple(int(x) for x in getattr(tree, name)(*args))))
            except TdxError as exc:
                out.append(("raise", type(exc).__mro__[1]))
        assert out[0] == out[1], (name, args, out)

    @rule(gpa=GPA_ANY, level=LEVELS)
    def walk(self, gpa, level):
        self._same("walk", gpa, level)

    @rule(gpa=GPA_ANY, level=LEVELS, page=PAGES, ae=st.booleans())
    def sept_add(self, gpa, level, page, ae):
        self._same("sept_add", gpa, level, page, ae)

    @rule(gpa=GPA4K, page=PAGES)
    def page_add(self, gpa, page):
        self._same("page_add", gpa, 0, page)

    @rule(gpa=GPA4K | GPA_ANY, level=st.integers(0, 1), page=PAGES)
    def page_aug(self, gpa, level, page):
        self._same("page_aug", gpa, level, page)

    @rule(gpa=GPA4K, level=st.integers(0, 2))
    def page_accept(self, gpa, level):
        self._same("page_accept", gpa, level)

    @rule(gpa=GPA_ANY, level=LEVELS, ep=EPOCH)
    def range_block(self, gpa, level, ep):
        self._same("range_block", gpa, level, ep, 0, True)

    @rule(gpa=GPA_ANY, level=LEVELS, ep=EPOCH, rc=st.integers(0, 1), tr=st.booleans())
    def range_unblock(self, gpa, level, ep, rc, tr):
        self._same("range_unblock", gpa, level, ep, rc, tr)

    @rule(gpa=GPA_ANY, level=st.integers(0, 2), ep=EPOCH, rc=st.integers(0, 1), tr=st.booleans())
    def page_remove(self, gpa, level, ep, rc, tr):
        self._same("page_remove", gpa, level, ep, rc, tr)

    @rule(gpa=GPA_ANY, level=LEVELS, ep=EPOCH, rc=st.integers(0, 1), tr=st.booleans())
    def sept_remove(self, gpa, level, ep, rc, tr):
        self._same("sept_remove", gpa, level, ep, rc, tr)

    @rule(gpa=GPA4K, host=st.booleans(), unlock=st.booleans())
    def entry_lock(self, gpa, host, unlock):
        if unlock:
            res = []
            for tree in (self.c, self.t):
                try:
                    tree.entry_unlock(gpa, 0)
                    res.append("ok")
                except TdxError:
                    res.append("raise")
            assert res[0] == res[1]
        else:
            assert self.c.entry_try_lock(gpa, 0, host) == self.t.entry_try_lock(gpa, 0, host)

    @rule(gfn0=st.integers(0, 12), n=st.integers(1, 8), page0=st.integers(200, 300),
          op=st.sampled_from(["aug", "accept", "block", "remove"]), ep=EPOCH)
    def batch(self, gfn0, n, page0, op, ep):
        g = np.arange(gfn0, gfn0 + n, dtype=np.uint64)
        res = []
        for tree in (self.c, self.t):
            if op == "aug":
                res.append(tree.page_aug_batch(g, g - gfn0 + page0).tolist())
            elif op == "accept":
                res.append(tree.page_accept_batch(g).tolist())
            elif op == "block":
                res.append(tree.range_block_batch(g, ep).tolist())
            else:
                res.append(tree.page_remove_batch(g, ep, 0, True).tolist())
        assert res[0] == res[1], (op, res)

    @rule(gpa=st.sampled_from([0x3000, M2 + 0x5000, 3 * M2, 5 * M2]), level=st.integers(0, 1),
          state=STATES)
    def force(self, gpa, level, state):
        gpa -= gpa % (1 << (12 + 9 * level))
        a = core_sept._testing_force_state(self.c, gpa, level, state)
        b = twin_sept._testing_force_state(self.t, gpa, level, state)
        assert a == b

    @invariant()
    def same_state(self):
        if not hasattr(self, "c"):
            return
        for lv in range(4):
            assert self.c.entries(lv) == self.t.entries(lv), lv
        assert self.c.nr_tables == self.t.nr_tables
        assert self.c.state_hash() == self.t.state_hash()
        assert self.c.pamt.state_hash() == self.t.pamt.state_hash()


SETTINGS = settings(max_examples=200, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
SeptMachine.TestCase.settings = SETTINGS
TestSeptMachine = SeptMachine.TestCase


class MutatedSeptMachine(SeptMachine):
    mutation = "block_pending_to_blocked"


def test_mutation_is_caught():
    """With BLOCK mapping PENDING to BLOCKED in the core only, the machine must fail."""
    quick = settings(SETTINGS, database=None, phases=[Phase.explicit, Phase.generate])
    with pytest.raises(AssertionError):
        run_state_machine_as_test(MutatedSeptMachine, settings=quick)


@pytest.mark.slow
def test_sept_machine_long():
    run_state_machine_as_test(SeptMachine, settings=settings(SETTINGS, max_examples=2000,
                                                             stateful_step_count=60))


def test_freed_table_takes_its_entry_locks_with_it():
    """Regression (found by the slow machine): replacing a subtree frees its tables' lock words.

    A guest holds the entry lock of gpa 0x201000; forcing the 2M entry above it to a fresh
    NL_MAPPED table frees the old leaf table, so the lock is free again in core and twin alike.
    """
    trees = []
    for sept, pamt in ((core_sept, core_pamt), (twin_sept, twin_pamt)):
        tree = sept.SeptTree(4, pamt.Pamt(1 << 14), tdr=1)
        tree.sept_add_range(0, 1024, np.arange(10, 20))
        assert tree.entry_try_lock(0x201000, 0, False) == 0
        sept._testing_force_state(tree, 0x200000, 1, 0x00)      # NL_MAPPED, a new child table
        trees.append(tree.entry_try_lock(0x201000, 0, False))
    assert trees == [0, 0]


def test_force_supply_reuses_freed_frames():
    """Regression (slow machine): forcing 2M leaves over and over reuses the frames freed by the
    previous force instead of running the test supply dry; core and twin pick the same frames."""
    entries = []
    for sept, pamt in ((core_sept, core_pamt), (twin_sept, twin_pamt)):
        tree = sept.SeptTree(4, pamt.Pamt(1 << 14), tdr=1)
        tree.sept_add_range(0, 1024, np.arange(10, 20))
        got = [sept._testing_force_state(tree, 0x200000 * 3, 1, 0x60) for _ in range(100)]
        entries.append(got)
    assert entries[0] == entries[1]
