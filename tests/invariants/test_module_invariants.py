"""``check_invariants`` / ``register_invariant`` (SPEC §3.5, §6): the API, and a model that is
clean at every step of a full TD build → run → teardown (issue 4 item 7)."""

from __future__ import annotations

import pytest

import tdxcore as tdx
from tdxcore import status as st
from tdxcore.constants import EXIT_REASON_EPT_VIOLATION, PAGE_SHIFT, PageType
from tdxcore.errors import InvariantViolation, TdxTypeError, TdxValueError
from tdxcore.invariants import BUILTIN_IDS, invariant_ids, unregister_invariant
from tdxcore.invariants.temporal import scanner
from tdxcore.module.td import TdParams, add_sept_path, build_td
from tests.scenarios import GPA, mapped, new_host, runnable_td

S = st.TDX_SUCCESS


def test_builtin_ids_registered_in_order():
    assert invariant_ids("module")[:len(BUILTIN_IDS)] == BUILTIN_IDS
    assert tdx.check_invariants is tdx.invariants.check_invariants
    assert "check_invariants" in tdx.__all__ and "register_invariant" in tdx.__all__


def test_fresh_and_enabled_hosts_are_clean():
    h = tdx.Host(memory=8 << 20)
    tdx.check_invariants(h)
    h.tdx.enable()
    tdx.check_invariants(h)


def test_register_runs_and_ids_select():
    h = new_host()
    calls = []

    def fn(host):
        calls.append(host)
        inv, msg = "X99", "always broken"
        raise InvariantViolation(inv, msg, pfn=1, event_index=0)

    tdx.register_invariant("X99", fn)
    try:
        with pytest.raises(InvariantViolation) as ei:
            tdx.check_invariants(h)
        assert ei.value.invariant == "X99" and calls == [h]
        tdx.check_invariants(h, ids=[i for i in BUILTIN_IDS])      # subset: X99 not run
        assert calls == [h]
        with pytest.raises(TdxValueError, match="already registered"):
            tdx.register_invariant("X99", fn)
    finally:
        unregister_invariant("X99")
    tdx.check_invariants(h)


def test_register_and_select_reject_bad_input():
    with pytest.raises(TdxValueError, match="already registered"):
        tdx.register_invariant("I01", lambda h: None)
    with pytest.raises(TdxTypeError, match="callable"):
        tdx.register_invariant("X98", 3)
    with pytest.raises(TdxTypeError, match="must be a str"):
        tdx.register_invariant(7, lambda h: None)
    with pytest.raises(TdxValueError, match="non-empty"):
        tdx.register_invariant("", lambda h: None)
    with pytest.raises(TdxValueError, match="layer"):
        tdx.register_invariant("X98", lambda h: None, layer="tools")
    h = new_host()
    with pytest.raises(TdxValueError, match="'X97'.*not a registered"):
        tdx.check_invariants(h, ids=["I01", "X97"])
    with pytest.raises(TdxTypeError, match="ids"):
        tdx.check_invariants(h, ids="I01")
    with pytest.raises(TdxTypeError, match="host"):
        tdx.check_invariants(object())
    with pytest.raises(TdxValueError, match="not a registered"):
        unregister_invariant("X98")


def test_scanner_is_incremental():
    h, b = runnable_td()
    tdx.check_invariants(h)
    s = scanner(h)
    assert s.cursor == len(h.events)
    mapped(h, b)
    n = len(h.events)
    tdx.check_invariants(h)
    assert s.cursor == n and scanner(h) is s
    assert s.tds[b.tdr].children == h.pamt.child_count(b.tdr)


def test_violation_carries_id_frame_event_and_replay():
    h, b = runnable_td()
    p = h.tdx.td(b.tdr).tdcs[0]
    h.pamt.release(p, 0)
    h.pamt.assign(p, PageType.PT_EPT, b.tdr, 0)
    with pytest.raises(InvariantViolation) as ei:
        tdx.check_invariants(h)
    e = ei.value
    assert (e.invariant, e.pfn) == ("I01", p)
    assert 0 <= e.event_index < len(h.events) and h.events.field(h.events[e.event_index], "pfn") == p
    assert e.replay.startswith(f"Host(seed={h.seed}, ") and "digest=0x" in e.replay
    assert "I01:" in str(e) and f"pfn={p:#x}" in str(e)


def test_full_build_run_teardown_clean_at_every_step():
    h = new_host()
    t = h.tdx
    steps = [0]

    def ok(res=None):
        if res is not None:
            assert res.status.base == 0 or res.status == S, res
        tdx.check_invariants(h)
        steps[0] += 1

    b = build_td(h, vcpus=2, params=TdParams(max_vcpus=2), finalize=False)
    b2 = build_td(h, vcpus=1)                                       # a second, running TD beside it
    ok()
    septs = add_sept_path(h, b.tdr, GPA, 1)
    ok()
    src = h.alloc_frame()
    h.frame_write(src, 0, b"\x5A" * 4096, 0)
    added = h.alloc_frame()
    ok(t.tdh_mem_page_add(b.tdr, GPA, added, src))
    for off in range(0, 4096, 1024):
        ok(t.tdh_mr_extend(b.tdr, GPA + off))
    ok(t.tdh_mr_finalize(b.tdr))
    p2 = mapped(h, b2)
    ok()
    g = GPA + 0x1000
    op = t.vp_enter(b.vcpus[0], cpu=0, actor="vcpu0")
    ok()
    op.enter()
    ok()
    assert op.exit(EXIT_REASON_EPT_VIOLATION, gpa=g, rip=0x1000).status == EXIT_REASON_EPT_VIOLATION
    ok()
    augd = h.alloc_frame()
    ok(t.tdh_mem_page_aug(b.tdr, g, 0, augd))
    op = t.vp_enter(b.vcpus[0], cpu=0, actor="vcpu0")
    op.enter()
    ok(t.tdg_mem_page_accept(b.vcpus[0], g, 0))
    op.exit(12)
    ok()
    t.vp_enter(b.vcpus[1], cpu=2, actor="vcpu1").complete()
    ok()
    ok(t.tdh_mem_range_block(b.tdr, g, 0))
    ok(t.tdh_mem_track(b.tdr))
    ok(t.tdh_mem_page_remove(b.tdr, g, 0))
    ok(t.tdh_phymem_page_wbinvd(augd, b.hkid))
    h.free_frame(augd)
    ok()
    ok(t.tdh_vp_flush(b.vcpus[0], cpu=0))
    ok(t.tdh_vp_flush(b.vcpus[1], cpu=2))
    ok(t.tdh_mng_vpflushdone(b.tdr))
    t.pending_interrupt(0, 1)
    assert t.tdh_phymem_cache_wb(cpu=0).status == st.TDX_INTERRUPTED_RESUMABLE
    ok()
    ok(t.tdh_phymem_cache_wb(resume=True, cpu=1))
    ok(t.tdh_phymem_cache_wb(cpu=3))
    ok(t.tdh_mng_key_freeid(b.tdr))
    h.keyids.free(b.hkid)
    ok()
    # TDVPRs before their TDCX pages: the TEARDOWN records shrink, CHLDCNT still matches the log
    children = [added] + septs[::-1] + b.vcpus + [p for v in b.vcpus for p in b.tdcx[v]] + b.tdcs
    for p in children:
        r = t.tdh_phymem_page_reclaim(p)
        assert r.status == S and r.rdx == b.tdr, (p, r)
        h.free_frame(p)
        ok()
    ok(t.tdh_phymem_page_reclaim(b.tdr))
    h.free_frame(b.tdr)
    ok()
    assert b.tdr not in t.tds and h.pamt.page_type(p2) == PageType.PT_REG
    # the freed frames can serve a new TD at once
    b3 = build_td(h, vcpus=1)
    mapped(h, b3, GPA + 0x2000)
    ok()
    assert steps[0] > 40


def test_rejected_and_busy_leaves_leave_invariants_intact():
    h, b = runnable_td()
    t = h.tdx
    add_sept_path(h, b.tdr, GPA, 1)
    a = t.begin(st.Leaf.TDH_MEM_PAGE_AUG, GPA, b.tdr << PAGE_SHIFT, h.alloc_frame() << PAGE_SHIFT, actor="a")
    tdx.check_invariants(h)
    c = t.begin(st.Leaf.TDH_MEM_RANGE_BLOCK, GPA, b.tdr << PAGE_SHIFT, actor="c")
    assert c.result.status.base == st.TDX_OPERAND_BUSY
    tdx.check_invariants(h)
    assert t.tdh_mem_page_remove(b.tdr, GPA + 0x1000, 0).status != S
    tdx.check_invariants(h)
    a.abort()
    tdx.check_invariants(h)


def test_same_actor_ops_ending_between_checks_pair_correctly():
    """Two AUGs by one actor at one GPA on two TDs, and one BUSY copy, end in another order than
    they began; one check afterwards folds them in one batch and stays exact."""
    h, b0 = runnable_td()
    b1 = build_td(h, vcpus=1)
    for b in (b0, b1):
        add_sept_path(h, b.tdr, GPA, 1)
    tdx.check_invariants(h)
    t = h.tdx
    p0, p1 = h.alloc_frame(), h.alloc_frame()
    a0 = t.begin(st.Leaf.TDH_MEM_PAGE_AUG, GPA, b0.tdr << PAGE_SHIFT, p0 << PAGE_SHIFT, actor="kvm")
    a1 = t.begin(st.Leaf.TDH_MEM_PAGE_AUG, GPA, b1.tdr << PAGE_SHIFT, p1 << PAGE_SHIFT, actor="kvm")
    busy = t.begin(st.Leaf.TDH_MEM_PAGE_AUG, GPA, b0.tdr << PAGE_SHIFT, h.alloc_frame() << PAGE_SHIFT,
                   actor="kvm")
    assert a0.acquired and a1.acquired and not busy.acquired
    g0 = t.begin_accept(b0.vcpus[0], GPA + 0x1000, 0, actor="guest")
    g1 = t.begin_accept(b0.vcpus[0], GPA + 0x1000, 0, actor="guest")       # BUSY on the entry
    assert a1.complete().status == S and a0.complete().status == S
    g0.abort()
    tdx.check_invariants(h)
    assert g1.result is not None
    s = scanner(h)
    assert s.tds[b0.tdr].children == h.pamt.child_count(b0.tdr)
    assert s.tds[b1.tdr].children == h.pamt.child_count(b1.tdr)


def test_checking_changes_no_model_state():
    """A check reads only: same state hash, same event log, same counters (replays stay exact)."""
    h, b = runnable_td(vcpus=2)
    mapped(h, b)
    op = h.tdx.vp_enter(b.vcpus[0], cpu=0, actor="vcpu0")
    op.enter()                                             # something in flight too
    before, n, stats = h.state_hash(), len(h.events), h.stats.as_dict()
    assert tdx.check_invariants(h) is None
    tdx.check_invariants(h, ids=["I03", "S6c"])
    assert (h.state_hash(), len(h.events), h.stats.as_dict()) == (before, n, stats)
    op.exit(12)
    tdx.check_invariants(h)
