"""TDH.VP.* leaves and the VP.ENTER guest phase / zero-step (tdx-facts §2.3, §3.4, §3.8; SPEC §4.4)."""

from __future__ import annotations

import pytest

from tdxcore import status as st
from tdxcore.constants import (
    EXIT_REASON_EPT_VIOLATION,
    EXIT_REASON_TDCALL,
    TDVPS_NR_PAGES,
    ZERO_STEP_THRESHOLD,
    PageType,
)
from tdxcore.errors import TdxValueError
from tdxcore.module.td import TdParams, build_td
from tdxcore.status import Leaf
from tests.scenarios import GPA, conflicts, new_host, runnable_td

S = st.TDX_SUCCESS


def _initialized_td(h, max_vcpus=2):
    return build_td(h, vcpus=0, params=TdParams(max_vcpus=max_vcpus), finalize=False)


def test_vp_create_failures():
    h = new_host()
    b = build_td(h, vcpus=0, params=TdParams(max_vcpus=1), finalize=False)
    t = h.tdx
    v = h.alloc_frame()
    assert t.tdh_vp_create(b.tdr, b.tdcs[0]).status == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RCX
    assert t.tdh_vp_create(b.tdcs[0], v).status == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RDX
    assert t.tdh_vp_create(b.tdr, v).status == S
    assert h.pamt.page_type(v) == PageType.PT_TDVPR and h.pamt.owner(v) == b.tdr
    assert t.tdh_vp_create(b.tdr, h.alloc_frame()).status == st.TDX_MAX_VCPUS_EXCEEDED


def test_vp_create_needs_initialized_td():
    h = new_host()
    hk = h.keyids.alloc()
    tdr = h.alloc_frame()
    t = h.tdx
    t.tdh_mng_create(tdr, hk)
    for pkg in range(h.nr_packages):
        t.tdh_mng_key_config(tdr, cpu=h.first_online_cpu(pkg))
    assert t.tdh_vp_create(tdr, h.alloc_frame()).status == st.TDX_TDCS_NOT_ALLOCATED


def test_vp_addcx_and_init_failures():
    h = new_host()
    b = _initialized_td(h)
    t = h.tdx
    v = h.alloc_frame()
    assert t.tdh_vp_create(b.tdr, v).status == S
    assert t.tdh_vp_addcx(b.tdr, h.alloc_frame()).status == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RDX
    assert t.tdh_vp_init(v, 0, 0).status == st.TDX_TDCX_NUM_INCORRECT
    for _ in range(TDVPS_NR_PAGES - 1):
        assert t.tdh_vp_addcx(v, h.alloc_frame()).status == S
    assert t.tdh_vp_addcx(v, h.alloc_frame()).status == st.TDX_TDCX_NUM_INCORRECT
    assert t.tdh_vp_addcx(v, b.tdcs[0]).status == st.TDX_TDCX_NUM_INCORRECT     # count checked first
    assert t.tdh_vp_init(v, 0x1234, 7).status == S
    v2 = t.vcpu(v)
    assert v2.initialized and v2.x2apic_id == 7 and v2.initial_rcx == 0x1234
    assert t.tdh_vp_init(v, 0, 8).status == st.TDX_VCPU_STATE_INCORRECT
    assert t.tdh_vp_addcx(v, h.alloc_frame()).status == st.TDX_VCPU_STATE_INCORRECT


def test_vp_init_x2apic_not_unique():
    h = new_host()
    b = _initialized_td(h)
    t = h.tdx
    vs = []
    for _ in range(2):
        v = h.alloc_frame()
        t.tdh_vp_create(b.tdr, v)
        for _ in range(TDVPS_NR_PAGES - 1):
            t.tdh_vp_addcx(v, h.alloc_frame())
        vs.append(v)
    assert t.tdh_vp_init(vs[0], 0, 3).status == S
    assert t.tdh_vp_init(vs[1], 0, 3).status == st.TDX_X2APIC_ID_NOT_UNIQUE
    assert t.tdh_vp_init(vs[1], 0, 4).status == S


def test_vp_init_after_finalize_op_state():
    h = new_host()
    b = _initialized_td(h)
    t = h.tdx
    v = h.alloc_frame()
    t.tdh_vp_create(b.tdr, v)
    for _ in range(TDVPS_NR_PAGES - 1):
        t.tdh_vp_addcx(v, h.alloc_frame())
    assert t.tdh_mr_finalize(b.tdr).status == S
    assert t.tdh_vp_init(v, 0, 0).status == st.TDX_OP_STATE_INCORRECT


def test_vp_enter_failures():
    h, b = runnable_td(finalize=False)
    t = h.tdx
    assert t.tdh_vp_enter(b.vcpus[0]).status == st.TDX_OP_STATE_INCORRECT
    assert t.tdh_mr_finalize(b.tdr).status == S
    assert t.tdh_vp_enter(b.tdr).status == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RCX
    assert t.tdh_vp_enter(b.vcpus[0], cpu=1).status == EXIT_REASON_TDCALL
    assert t.tdh_vp_enter(b.vcpus[0], cpu=2).status == st.TDX_VCPU_ASSOCIATED


def test_vp_enter_uninitialized_vcpu():
    h = new_host()
    b = _initialized_td(h)
    t = h.tdx
    v = h.alloc_frame()
    t.tdh_vp_create(b.tdr, v)
    t.tdh_mr_finalize(b.tdr)
    assert t.tdh_vp_enter(v).status == st.TDX_VCPU_STATE_INCORRECT


def test_vp_enter_phases_epoch_reference_and_exit_layout():
    h, b = runnable_td()
    t = h.tdx
    td = t.td(b.tdr)
    op = t.vp_enter(b.vcpus[0], cpu=1, actor="vcpu0")
    assert op.acquired and not op.in_guest and td.refcount == [0, 0]
    op.enter()
    v = t.vcpu(b.vcpus[0])
    assert op.in_guest and v.in_guest and v.epoch == td.epoch == 1 and td.refcount == [0, 1]
    assert v.associated_cpu == 1 and td.num_assoc == 1
    assert set(t.holders) == {("pamt", b.vcpus[0])}               # only the TDVPR stays held
    r = op.exit(EXIT_REASON_EPT_VIOLATION, gpa=GPA, rip=0x1234, level=0, qualification=0x2)
    assert r.status == EXIT_REASON_EPT_VIOLATION and (r.rcx, r.rdx, r.r8, r.r9) == (0x2, 0, GPA, 0x1234)
    assert td.refcount == [0, 0] and not v.in_guest and t.holders == {}
    assert [e[2] for _, e in h.events.filter(kind="td_enter")] == [int(Leaf.TDH_VP_ENTER)]
    assert op.complete() is r


def test_vp_enter_misuse_raises():
    h, b = runnable_td()
    op = h.tdx.vp_enter(b.vcpus[0])
    with pytest.raises(TdxValueError, match="in the guest"):
        op.exit(12)
    op.enter()
    with pytest.raises(TdxValueError, match="enter"):
        op.enter()
    with pytest.raises(TdxValueError, match="exit"):
        op.abort()
    op.exit(12)


def test_vp_enter_abort_before_entry_has_no_effect():
    h, b = runnable_td()
    before = h.tdx.state_bytes()
    op = h.tdx.vp_enter(b.vcpus[0])
    assert op.abort() is None and not op.acquired
    assert h.tdx.state_bytes() == before and h.tdx.holders == {}
    assert len(h.events.filter(kind="seamcall_abort")) == 1


def test_vp_flush_rules():
    h, b = runnable_td()
    t = h.tdx
    assert t.tdh_vp_flush(b.vcpus[0]).status == st.TDX_VCPU_NOT_ASSOCIATED
    op = t.vp_enter(b.vcpus[0], cpu=0, actor="vcpu0")
    op.enter()
    r = t.tdh_vp_flush(b.vcpus[0], cpu=0, actor="teardown")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX        # TDVPR held in the guest
    assert conflicts(h)[-1]["holder"] == "vcpu0"
    op.exit(12)
    assert t.tdh_vp_flush(b.vcpus[0], cpu=1).status == st.TDX_VCPU_NOT_ASSOCIATED   # other LP
    assert t.tdh_vp_flush(b.vcpus[0], cpu=0).status == S
    assert t.vcpu(b.vcpus[0]).associated_cpu is None and t.td(b.tdr).num_assoc == 0


def _ept_exits(t, v, n, rip, **kw):
    for _ in range(n):
        op = t.vp_enter(v, cpu=0)
        op.enter()
        op.exit(EXIT_REASON_EPT_VIOLATION, gpa=GPA, rip=rip, **kw)


def test_zero_step_threshold_exactly_six():
    h, b = runnable_td()
    t = h.tdx
    v = b.vcpus[0]
    _ept_exits(t, v, ZERO_STEP_THRESHOLD - 1, 0x100)
    assert not t.vcpu(v).zero_step
    _ept_exits(t, v, 1, 0x100)
    assert t.vcpu(v).zero_step
    ent = t.vp_enter(v, cpu=0)
    assert ("sept_tree", b.tdr) in t.holders
    ent.enter()
    assert ("sept_tree", b.tdr) not in t.holders
    assert [e[6] for _, e in h.events.filter(kind="td_enter")][-1] == 1
    ent.exit(12)                                          # guest progress resets
    assert not t.vcpu(v).zero_step and t.vcpu(v).ept_count == 0


@pytest.mark.parametrize("reset", ["rip", "event"])
def test_zero_step_count_resets(reset):
    h, b = runnable_td()
    t = h.tdx
    v = b.vcpus[0]
    _ept_exits(t, v, 5, 0x100)
    if reset == "rip":
        _ept_exits(t, v, 1, 0x200)
        assert t.vcpu(v).ept_count == 1
    else:
        _ept_exits(t, v, 1, 0x100, injected_event=True)
        assert t.vcpu(v).ept_count == 0
    _ept_exits(t, v, 4, 0x100)
    assert not t.vcpu(v).zero_step


def test_zero_step_enter_busy_sept_tree_when_tree_held():
    h, b = runnable_td()
    t = h.tdx
    v = b.vcpus[0]
    _ept_exits(t, v, 6, 0x100)
    blk = t.begin(Leaf.TDH_MEM_RANGE_BLOCK, GPA | 1, b.tdr << 12, actor="zapper")
    assert not blk.acquired                               # no parent: walk failure, nothing held
    from tests.scenarios import mapped
    mapped(h, b)
    blk = t.begin(Leaf.TDH_MEM_RANGE_BLOCK, GPA, b.tdr << 12, actor="zapper")
    assert blk.acquired
    r = t.tdh_vp_enter(v, cpu=0, actor="vcpu0")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_SEPT_TREE
    assert t.td(b.tdr).refcount == [0, 0] and t.holders.keys() == blk_keys(t, blk)
    blk.complete()


def blk_keys(t, op):
    return {k for k, ops in t.holders.items() if op in ops}


def test_vp_addcx_page_not_free_and_create_after_finalize():
    h = new_host()
    b = _initialized_td(h)
    t = h.tdx
    v = h.alloc_frame()
    t.tdh_vp_create(b.tdr, v)
    assert t.tdh_vp_addcx(v, b.tdcs[0]).status == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RCX
    t.tdh_mr_finalize(b.tdr)
    assert t.tdh_vp_create(b.tdr, h.alloc_frame()).status == st.TDX_OP_STATE_INCORRECT
    assert t.tdh_vp_addcx(v, h.alloc_frame()).status == st.TDX_OP_STATE_INCORRECT
