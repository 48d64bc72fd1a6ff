"""Differential state machine: ``tdxcore._pamt.Pamt`` vs its twin (STYLE §2.8)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import tdxcore._pamt as core
import tdxcore.reference.pamt as twin
from tdxcore.constants import PAMT_NO_OWNER, PageType
from tdxcore.errors import TdxError

NR = 1 << 13                      # two chunks in the core
PFNS = st.sampled_from([0, 1, 2, 3, 4095, 4096, 4097, 8190, 8191])
TDRS = st.sampled_from([1, 4096])
TYPES = st.sampled_from([int(t) for t in PageType])
OWNERS = st.sampled_from([1, 4096, 2, PAMT_NO_OWNER])
OPERANDS = st.sampled_from([0, 1, 8, 146])


def _both(fn):
    """Run fn on core and twin; exceptions compare by type."""
    out = []
    for obj in fn:
        try:
            out.append(("ok", obj()))
        except TdxError as exc:
            out.append(("raise", type(exc).__mro__[1:3]))
    return out


class PamtMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.c = core.Pamt(NR)
        self.t = twin.Pamt(NR)

    def _same(self, name, *args, **kw):
        a, b = _both([lambda: getattr(self.c, name)(*args, **kw),
                      lambda: getattr(self.t, name)(*args, **kw)])
        assert a == b, (name, args, a, b)

    @rule(pfn=TDRS)
    def assign_tdr(self, pfn):
        self._same("assign", pfn, PageType.PT_TDR, PAMT_NO_OWNER, 1)

    @rule(pfn=PFNS, ty=TYPES, owner=OWNERS, op=OPERANDS)
    def assign(self, pfn, ty, owner, op):
        self._same("assign", pfn, ty, owner, op)

    @rule(pfn=PFNS | TDRS, op=OPERANDS)
    def release(self, pfn, op):
        self._same("release", pfn, op)

    @rule(pfn=PFNS, epoch=st.integers(0, 5))
    def set_bepoch(self, pfn, epoch):
        self._same("set_bepoch", pfn, epoch)

    @rule(pfn=PFNS)
    def reserve(self, pfn):
        self._same("reserve", pfn)

    @rule(pfn=PFNS, ex=st.booleans(), host=st.booleans())
    def try_lock(self, pfn, ex, host):
        self._same("try_lock", pfn, ex, 8, host)

    @rule(pfn=PFNS, ex=st.booleans())
    def unlock(self, pfn, ex):
        self._same("unlock", pfn, ex)

    @rule(pfns=st.lists(PFNS | TDRS | st.just(NR), max_size=6), owner=TDRS | PFNS)
    def reclaim_batch(self, pfns, owner):
        """Batch RECLAIM (repeats, out-of-range frames, TDRs, other owners): same statuses."""
        arr = np.array(pfns, dtype=np.uint64)
        a, b = _both([lambda: self.c.reclaim_batch(arr, owner).tolist(),
                      lambda: self.t.reclaim_batch(arr, owner).tolist()])
        assert a == b, (pfns, owner, a, b)

    @invariant()
    def same_state(self):
        if not hasattr(self, "c"):
            return
        assert self.c.state_hash() == self.t.state_hash()
        for ty in PageType:
            assert self.c.nr_assigned(ty) == self.t.nr_assigned(ty)
        for p in (0, 1, 2, 3, 4095, 4096, 4097, 8190, 8191):
            assert (self.c.page_type(p), self.c.owner(p), self.c.bepoch(p), self.c.child_count(p)) == (
                self.t.page_type(p), self.t.owner(p), self.t.bepoch(p), self.t.child_count(p))


PamtMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestPamtMachine = PamtMachine.TestCase


@pytest.mark.slow
def test_pamt_machine_long():
    from hypothesis.stateful import run_state_machine_as_test
    run_state_machine_as_test(PamtMachine, settings=settings(max_examples=2000,
                                                             stateful_step_count=80,
                                                             deadline=None))
