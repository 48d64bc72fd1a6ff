"""``host.tdx.begin`` / ``Op``: handles, both event edges, abort, release on failure (SPEC §3.1, §5)."""

from __future__ import annotations

import pytest

from tdxcore import status as st
from tdxcore.constants import PAGE_SHIFT, PageType
from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.module import Host
from tdxcore.status import Leaf, TdcallLeaf
from tests.scenarios import GPA, MEM, aug, runnable_td, sept_path

S = st.TDX_SUCCESS


def _aug_op(h, b, actor="host"):
    sept_path(h, b)
    p = h.alloc_frame()
    return p, h.tdx.begin(Leaf.TDH_MEM_PAGE_AUG, GPA, b.tdr << PAGE_SHIFT, p << PAGE_SHIFT, actor=actor)


def test_begin_acquires_complete_applies_once():
    h, b = runnable_td()
    p, op = _aug_op(h, b)
    assert op.acquired and not op.finished and op.result is None
    assert h.pamt.page_type(p) == PageType.PT_NDA               # nothing applied at begin
    assert op.id in h.tdx.inflight and ("entry", b.tdr, GPA, 0) in h.tdx.holders
    r = op.complete()
    assert r.status == S and op.result is r and not op.acquired
    assert op.complete() is r                                   # idempotent
    assert h.pamt.page_type(p) == PageType.PT_REG
    assert h.tdx.holders == {} and h.tdx.inflight == {}


def test_event_edges_begin_and_end():
    h, b = runnable_td()
    n = len(h.events)
    _, op = _aug_op(h, b, actor="cpu3")
    begins = [e for i, e in h.events.filter(kind="seamcall_begin", leaf=Leaf.TDH_MEM_PAGE_AUG) if i >= n]
    assert len(begins) == 1 and begins[0][1] == "cpu3"
    assert not h.events.filter(kind="seamcall_end", leaf=Leaf.TDH_MEM_PAGE_AUG)
    op.complete()
    ends = h.events.filter(kind="seamcall_end", leaf=Leaf.TDH_MEM_PAGE_AUG)
    assert len(ends) == 1 and ends[0][1][4] == S and ends[0][1][6] == GPA >> PAGE_SHIFT


def test_abort_releases_without_effect():
    h, b = runnable_td()
    p, op = _aug_op(h, b)
    before = h.tdx.state_bytes(), h.pamt.state_hash()
    assert op.abort() is None and not op.acquired and op.result is None
    assert (h.tdx.state_bytes(), h.pamt.state_hash()) == before
    assert h.tdx.holders == {} and h.tdx.inflight == {}
    assert len(h.events.filter(kind="seamcall_abort")) == 1
    assert h.tdx.tdh_mem_page_aug(b.tdr, GPA, 0, p).status == S     # locks really released


def test_failed_check_finishes_at_begin_and_releases_locks():
    h, b = runnable_td()
    op = h.tdx.begin(Leaf.TDH_MEM_PAGE_AUG, GPA, b.tdr << PAGE_SHIFT, h.alloc_frame() << PAGE_SHIFT)
    assert not op.acquired and op.result.status == st.TDX_EPT_WALK_FAILED | st.OPERAND_ID_RCX
    assert op.complete() is op.result and op.abort() is op.result
    assert h.tdx.holders == {}                                 # TDR, OPS and tree locks dropped
    assert not h.pamt.try_lock(b.tdr, True, 0) and not h.pamt.unlock(b.tdr, True)


def test_busy_op_is_finished():
    h, b = runnable_td()
    _, a = _aug_op(h, b, "a")
    c = h.tdx.begin(Leaf.TDH_MEM_PAGE_AUG, GPA, b.tdr << PAGE_SHIFT, h.alloc_frame() << PAGE_SHIFT, actor="c")
    assert not c.acquired and c.result.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX
    assert len(h.events.filter(kind="seamcall_end", actor="c")) == 1
    a.complete()


def test_seamcall_is_begin_plus_complete_and_counts():
    h, b = runnable_td()
    n = h.stats.nr_seamcalls_total
    aug(h, b)
    assert h.stats.nr_seamcalls_total == n + 4                     # 3 SEPT.ADD + AUG


def test_begin_rejects_bad_input():
    h, b = runnable_td()
    with pytest.raises(TdxTypeError, match="bare int"):
        h.tdx.begin(6, GPA)
    with pytest.raises(TdxTypeError, match="leaf"):
        h.tdx.begin(TdcallLeaf.TDG_MEM_PAGE_ACCEPT, GPA)
    with pytest.raises(TdxValueError, match="rcx"):
        h.tdx.begin(Leaf.TDH_MEM_TRACK, -1)
    with pytest.raises(TdxTypeError, match="actor"):
        h.tdx.begin(Leaf.TDH_MEM_TRACK, b.tdr << 12, actor=3)
    with pytest.raises(TdxValueError, match="not a vCPU"):
        h.tdx.tdg_mem_page_accept(b.tdr, GPA, 0)
    assert h.tdx.holders == {}


def test_td_leaf_before_ready_is_not_ready():
    h = Host(memory=MEM)
    op = h.tdx.begin(Leaf.TDH_MEM_PAGE_AUG, GPA)
    assert op.result.status == st.TDX_SYS_NOT_READY and not op.acquired


def test_guest_accept_op_lifecycle():
    h, b = runnable_td()
    aug(h, b)
    op = h.tdx.begin_accept(b.vcpus[0], GPA, 0, actor="g")
    assert op.acquired and op.leaf == TdcallLeaf.TDG_MEM_PAGE_ACCEPT
    assert op.abort() is None and h.tdx.holders == {}
    op = h.tdx.begin_accept(b.vcpus[0], GPA, 0, actor="g")
    assert op.complete().status == S
    assert [e[0] for _, e in h.events.filter(actor="g")] == ["tdcall_begin", "tdcall_abort", "tdcall_begin",
                                                             "tdcall_end"]


def test_accept_bad_operand():
    h, b = runnable_td()
    assert h.tdx.tdg_mem_page_accept(b.vcpus[0], GPA, 3).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX


def test_state_hash_deterministic_and_tracks_module_state():
    hs = []
    for _ in range(2):
        h, b = runnable_td(vcpus=2)
        aug(h, b)
        hs.append(h.state_hash())
    assert hs[0] == hs[1]
    h, b = runnable_td(vcpus=2)
    aug(h, b)
    h.tdx.tdh_mem_track(b.tdr)
    assert h.state_hash() != hs[0]


# --- random overlapping leaves: the locks always balance, nothing leaks --------------------------
import numpy as np  # noqa: E402
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

_GFNS = [GPA + (i << 12) for i in range(4)]


class OverlapMachine(RuleBasedStateMachine):
    """Random AUG/ACCEPT/BLOCK/TRACK/REMOVE/UNBLOCK/VP.ENTER begun on 2 TDs, completed or aborted in
    random order. Checks: a failed begin holds nothing; after every step each held resource
    belongs to an acquired op; CHLDCNT equals the frames the PAMT says the TD owns; when nothing
    is in flight no lock is held."""

    def __init__(self):
        super().__init__()
        self.h = None

    @rule()
    @precondition(lambda self: self.h is None)
    def build(self):
        from tdxcore.module.td import build_td

        self.h, b0 = runnable_td(vcpus=1)
        b1 = build_td(self.h, vcpus=1)
        self.tds = [b0, b1]
        for b in self.tds:
            sept_path(self.h, b)
        self.ops = []

    def _begin(self, op):
        if op.acquired:
            self.ops.append(op)
        else:
            assert all(op not in v for v in self.h.tdx.holders.values())

    @precondition(lambda self: self.h is not None)
    @rule(td=hs.integers(0, 1), g=hs.sampled_from(_GFNS),
          leaf=hs.sampled_from([Leaf.TDH_MEM_PAGE_AUG, Leaf.TDH_MEM_RANGE_BLOCK, Leaf.TDH_MEM_PAGE_REMOVE,
                                Leaf.TDH_MEM_RANGE_UNBLOCK, Leaf.TDH_MEM_TRACK]))
    def host_leaf(self, td, g, leaf):
        b = self.tds[td]
        if leaf == Leaf.TDH_MEM_TRACK:
            op = self.h.tdx.begin(leaf, b.tdr << 12, actor=f"host{td}")
        elif leaf == Leaf.TDH_MEM_PAGE_AUG:
            op = self.h.tdx.begin(leaf, g, b.tdr << 12, self.h.alloc_frame() << 12, actor=f"host{td}")
        else:
            op = self.h.tdx.begin(leaf, g, b.tdr << 12, actor=f"host{td}")
        self._begin(op)

    @precondition(lambda self: self.h is not None)
    @rule(td=hs.integers(0, 1), g=hs.sampled_from(_GFNS))
    def guest_accept(self, td, g):
        from tdxcore.module.td import TdLifecycle

        b = self.tds[td]
        tdo = self.h.tdx.tds.get(b.tdr)
        if tdo is None or tdo.lifecycle != TdLifecycle.KEYS_CONFIGURED:
            return                        # no guest runs: a TDCALL cannot be issued
        self._begin(self.h.tdx.begin_accept(b.vcpus[0], g, 0, actor=f"guest{td}"))

    @precondition(lambda self: self.h is not None)
    @rule(td=hs.integers(0, 1), cpu=hs.integers(0, 3), which=hs.integers(0, 5), k=hs.integers(0, 40))
    def teardown_leaf(self, td, cpu, which, k):
        b = self.tds[td]
        t = self.h.tdx
        frames = [b.tdr] + b.tdcs + b.vcpus + [p for v in b.vcpus for p in b.tdcx[v]]
        if which == 0:
            op = t.begin(Leaf.TDH_VP_FLUSH, b.vcpus[0] << 12, cpu=cpu, actor=f"host{td}")
        elif which == 1:
            op = t.begin(Leaf.TDH_MNG_VPFLUSHDONE, b.tdr << 12, cpu=cpu, actor=f"host{td}")
        elif which == 2:
            op = t.begin(Leaf.TDH_PHYMEM_CACHE_WB, 0, cpu=cpu, actor=f"host{td}")
        elif which == 3:
            op = t.begin(Leaf.TDH_MNG_KEY_FREEID, b.tdr << 12, cpu=cpu, actor=f"host{td}")
        elif which == 4:
            op = t.begin(Leaf.TDH_PHYMEM_PAGE_RECLAIM, frames[k % len(frames)] << 12, cpu=cpu,
                         actor=f"host{td}")
        else:
            lo = min(x.tdr for x in self.tds)
            op = t.begin(Leaf.TDH_PHYMEM_PAGE_RECLAIM, (lo + k * 7) << 12, cpu=cpu, actor=f"host{td}")
        self._begin(op)

    @precondition(lambda self: self.h is not None)
    @rule(td=hs.integers(0, 1), cpu=hs.integers(0, 3))
    def vp_enter(self, td, cpu):
        v = self.tds[td].vcpus[0]
        op = self.h.tdx.vp_enter(v, cpu=cpu, actor=f"vcpu{td}")
        self._begin(op)
        if op.acquired:
            op.enter()

    @precondition(lambda self: self.h is not None and self.ops)
    @rule(i=hs.integers(0, 7), abort=hs.booleans())
    def finish(self, i, abort):
        op = self.ops.pop(i % len(self.ops))
        if op.in_guest:
            op.exit(48, gpa=GPA, rip=0x1000)
        elif abort:
            op.abort()
        else:
            op.complete()
        assert not op.acquired

    @invariant()
    def locks_balance(self):
        if self.h is None:
            return
        t = self.h.tdx
        for key, ops in t.holders.items():
            assert ops and all(o in self.ops for o in ops), key
        lo = min(b.tdr for b in self.tds)
        hi = lo + 1024                    # every frame this machine allocates lies in here
        types = self.h.pamt.types(lo, hi)
        used = [lo + int(i) for i in np.nonzero((types != 0) & (types != 4))[0]]
        for b in self.tds:
            if b.tdr not in t.tds:
                assert self.h.pamt.page_type(b.tdr) == 0
                continue
            owned = sum(1 for p in used if self.h.pamt.owner(p) == b.tdr)
            assert self.h.pamt.child_count(b.tdr) == owned
            td = t.td(b.tdr)
            assert td.refcount[0] >= 0 and td.refcount[1] >= 0
            assert sum(td.refcount) == sum(1 for v in td.vcpus.values() if v.in_guest)
        if not self.ops:
            assert t.holders == {} and t.inflight == {}
            for b in self.tds:
                for key in (b.tdr,):
                    assert self.h.pamt.try_lock(key, True, 0) == 0
                    self.h.pamt.unlock(key, True)
                if b.tdr not in t.tds:
                    continue
                td = t.td(b.tdr)
                for lk in (td.sept_lock, td.epoch_lock, td.op_state_lock):
                    assert not lk.is_locked


TestOverlapMachine = OverlapMachine.TestCase
TestOverlapMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_threads_share_one_td_consistently():
    """Two OS threads AUG/ACCEPT/BLOCK/TRACK/REMOVE disjoint GPAs of one TD; every call is atomic
    under ``tdx.lock`` and the end state is what a serial run gives (BUSY only from overlap)."""
    import threading

    h, b = runnable_td()
    t = h.tdx
    sept_path(h, b)
    pages = {k: [h.alloc_frame() for _ in range(16)] for k in range(2)}
    errors = []

    def worker(k):
        try:
            for i, p in enumerate(pages[k]):
                g = GPA + ((2 * i + k) << 12)
                while t.tdh_mem_page_aug(b.tdr, g, 0, p, actor=f"t{k}").status != S:
                    pass
                while t.tdg_mem_page_accept(b.vcpus[0], g, 0, actor=f"g{k}").status != S:
                    pass
                while t.tdh_mem_range_block(b.tdr, g, 0, actor=f"t{k}").status != S:
                    pass
                while t.tdh_mem_track(b.tdr, actor=f"t{k}").status != S:
                    pass
                r = t.tdh_mem_page_remove(b.tdr, g, 0, actor=f"t{k}")
                while r.status != S:
                    t.tdh_mem_track(b.tdr)
                    r = t.tdh_mem_page_remove(b.tdr, g, 0, actor=f"t{k}")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    th = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for x in th:
        x.start()
    for x in th:
        x.join()
    assert not errors
    assert all(h.pamt.page_type(p) == PageType.PT_NDA for ps in pages.values() for p in ps)
    assert t.holders == {} and t.inflight == {}


def test_accept_takes_a_vcpu_handle():
    h, b = runnable_td()
    aug(h, b)
    assert h.tdx.tdg_mem_page_accept(h.tdx.vcpu(b.vcpus[0]), GPA, 0).status == S
