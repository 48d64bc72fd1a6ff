"""TDH.MNG.* leaves: each documented failure, precedence, effects (tdx-facts §2.3, §5.2–§5.3)."""

from __future__ import annotations

import pytest

from tdxcore import status as st
from tdxcore.constants import (
    MNG_RD_FIELD_MAX_VCPUS,
    MNG_RD_FIELD_OP_STATE,
    MNG_RD_FIELD_TD_EPOCH,
    MNG_RD_FIELD_TSC_MULTIPLIER,
    PAGE_SHIFT,
    TDCS_NR_PAGES,
    PageType,
)
from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.module.kot import KotState
from tdxcore.module.td import TdLifecycle, TdParams
from tdxcore.status import Leaf, OpState
from tests.scenarios import GPA, new_host, runnable_td

S = st.TDX_SUCCESS


def _created(h):
    hkid = h.keyids.alloc()
    tdr = h.alloc_frame()
    assert h.tdx.tdh_mng_create(tdr, hkid).status == S
    return tdr, hkid


def _keyed(h):
    tdr, hkid = _created(h)
    for pkg in range(h.nr_packages):
        assert h.tdx.tdh_mng_key_config(tdr, cpu=h.first_online_cpu(pkg)).status == S
    return tdr, hkid


def _with_tdcs(h):
    tdr, hkid = _keyed(h)
    for _ in range(TDCS_NR_PAGES):
        assert h.tdx.tdh_mng_addcx(tdr, h.alloc_frame()).status == S
    return tdr, hkid


def _params(h, **kw):
    pa = h.alloc_frame() << PAGE_SHIFT
    h.tdx.write_td_params(pa, TdParams(**kw))
    return pa


# --- MNG.CREATE -----------------------------------------------------------------------------
def test_create_success_effects():
    h = new_host()
    tdr, hkid = _created(h)
    assert h.pamt.page_type(tdr) == PageType.PT_TDR
    assert h.tdx.kot.state[hkid] == KotState.ASSIGNED
    assert h.tdx.td(tdr).lifecycle == TdLifecycle.HKID_ASSIGNED


@pytest.mark.parametrize("which", ["global", "mktme", "beyond"])
def test_create_bad_hkid_operand_invalid_rdx(which):
    h = new_host()
    k = h.keyids
    hkid = {"global": k.global_keyid, "mktme": 1, "beyond": k.nr_keyids}[which]
    r = h.tdx.seamcall(Leaf.TDH_MNG_CREATE, h.alloc_frame() << PAGE_SHIFT, hkid)
    assert r.status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RDX


def test_create_bad_pa():
    h = new_host()
    hk = h.keyids.alloc()
    assert (h.tdx.seamcall(Leaf.TDH_MNG_CREATE, 0x1234_0008, hk).status
            == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX)
    r = h.tdx.seamcall(Leaf.TDH_MNG_CREATE, h.nr_frames << PAGE_SHIFT, hk)
    assert r.status == st.TDX_OPERAND_ADDR_RANGE_ERROR | st.OPERAND_ID_RCX
    r = h.tdx.seamcall(Leaf.TDH_MNG_CREATE, (1 << 46) | 0x100000, hk)      # KeyID bits in the PA
    assert r.status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX


def test_create_page_not_free_and_precedence():
    h = new_host()
    tdr, hkid = _created(h)
    assert (h.tdx.tdh_mng_create(tdr, h.keyids.alloc()).status
            == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RCX)
    # bad HKID wins over a bad page (RDX is checked first)
    assert (h.tdx.tdh_mng_create(tdr, h.keyids.global_keyid).status
            == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RDX)


def test_create_hkid_not_free():
    h = new_host()
    _, hkid = _created(h)
    assert h.tdx.tdh_mng_create(h.alloc_frame(), hkid).status == st.TDX_HKID_NOT_FREE


# --- MNG.KEY.CONFIG -------------------------------------------------------------------------
def test_key_config_per_package_then_keys_configured():
    h = new_host()
    tdr, hkid = _created(h)
    t = h.tdx
    assert t.tdh_mng_key_config(tdr, cpu=0).status == S
    assert t.tdh_mng_key_config(tdr, cpu=1).status == st.TDX_KEY_CONFIGURED     # same package
    assert t.td(tdr).lifecycle == TdLifecycle.HKID_ASSIGNED and h.keyids.nr_configured == 0
    assert t.tdh_mng_key_config(tdr, cpu=2).status == S
    assert t.td(tdr).lifecycle == TdLifecycle.KEYS_CONFIGURED and h.keyids.nr_configured == 1
    assert t.tdh_mng_key_config(tdr, cpu=3).status == st.TDX_LIFECYCLE_STATE_INCORRECT


def test_key_config_not_a_tdr_and_fatal():
    h = new_host()
    tdr, _ = _created(h)
    assert (h.tdx.tdh_mng_key_config(h.alloc_frame()).status
            == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RCX)
    h.tdx.td(tdr).fatal = True
    assert h.tdx.tdh_mng_key_config(tdr).status == st.TDX_TD_FATAL


# --- MNG.ADDCX ------------------------------------------------------------------------------
def test_addcx_failures_in_order():
    h = new_host()
    tdr, _ = _created(h)
    t = h.tdx
    assert t.tdh_mng_addcx(tdr, h.alloc_frame()).status == st.TDX_TD_KEYS_NOT_CONFIGURED
    for pkg in range(h.nr_packages):
        t.tdh_mng_key_config(tdr, cpu=h.first_online_cpu(pkg))
    assert t.tdh_mng_addcx(tdr, tdr).status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX   # TDR held X
    p = h.alloc_frame()
    assert t.tdh_mng_addcx(tdr, p).status == S
    assert t.tdh_mng_addcx(tdr, p).status == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RCX
    assert t.tdh_mng_addcx(h.alloc_frame(), h.alloc_frame()).status == \
        st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RDX
    for _ in range(TDCS_NR_PAGES - 1):
        assert t.tdh_mng_addcx(tdr, h.alloc_frame()).status == S
    assert t.tdh_mng_addcx(tdr, h.alloc_frame()).status == st.TDX_TDCX_NUM_INCORRECT
    assert h.pamt.child_count(tdr) == TDCS_NR_PAGES
    assert t.tdh_mng_init(tdr, _params(h)).status == S
    assert t.tdh_mng_addcx(tdr, h.alloc_frame()).status == st.TDX_OP_STATE_INCORRECT


# --- MNG.INIT -------------------------------------------------------------------------------
def test_init_tdcs_not_allocated_and_keys():
    h = new_host()
    tdr, _ = _created(h)
    assert h.tdx.tdh_mng_init(tdr, _params(h)).status == st.TDX_TD_KEYS_NOT_CONFIGURED
    tdr2, _ = _keyed(h)
    assert h.tdx.tdh_mng_init(tdr2, _params(h)).status == st.TDX_TDCS_NOT_ALLOCATED


@pytest.mark.parametrize("field,value,operand", [
    ("attributes", 1 << 5, st.OPERAND_ID_ATTRIBUTES),
    ("xfam", 0x1, st.OPERAND_ID_XFAM),
    ("xfam", 0x3 | (1 << 40), st.OPERAND_ID_XFAM),
    ("max_vcpus", 0, st.OPERAND_ID_MAX_VCPUS),
    ("eptp_levels", 3, st.OPERAND_ID_EPTP_CONTROLS),
    ("tsc_frequency", 1, st.OPERAND_ID_TSC_FREQUENCY),
])
def test_init_bad_td_params_field(field, value, operand):
    h = new_host()
    tdr, _ = _with_tdcs(h)
    r = h.tdx.tdh_mng_init(tdr, _params(h, **{field: value}))
    assert r.status == st.TDX_OPERAND_INVALID | operand
    assert h.tdx.td(tdr).op_state == OpState.UNINITIALIZED


def test_init_params_precedence_and_pa():
    h = new_host()
    tdr, _ = _with_tdcs(h)
    t = h.tdx
    assert (t.tdh_mng_init(tdr, h.alloc_frame() << PAGE_SHIFT).status
            == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RDX)
    assert t.tdh_mng_init(tdr, _params(h) + 512).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RDX
    both = _params(h, attributes=1 << 5, max_vcpus=0)
    assert t.tdh_mng_init(tdr, both).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_ATTRIBUTES
    assert t.tdh_mng_init(tdr, _params(h, eptp_levels=5)).status == S
    assert t.td(tdr).sept.levels == 5 and t.td(tdr).epoch == 1
    assert t.tdh_mng_init(tdr, _params(h)).status == st.TDX_OP_STATE_INCORRECT


def test_write_td_params_rejects_bad_input():
    h = new_host()
    with pytest.raises(TdxTypeError, match="params"):
        h.tdx.write_td_params(0x1000, {"max_vcpus": 1})
    with pytest.raises(TdxValueError, match="pa"):
        h.tdx.write_td_params(-1, TdParams())


# --- MNG.RD ---------------------------------------------------------------------------------
def test_rd_fields_and_unknown():
    h, b = runnable_td()
    t = h.tdx
    assert t.tdh_mng_rd(b.tdr, MNG_RD_FIELD_OP_STATE).r8 == OpState.RUNNABLE
    assert t.tdh_mng_rd(b.tdr, MNG_RD_FIELD_MAX_VCPUS).r8 == 1
    assert t.tdh_mng_rd(b.tdr, MNG_RD_FIELD_TD_EPOCH).r8 == 1
    assert t.tdh_mng_rd(b.tdr, MNG_RD_FIELD_TSC_MULTIPLIER).r8 == 1 << 48
    assert t.tdh_mng_rd(b.tdr, 999).status == st.TDX_METADATA_FIELD_ID_INCORRECT


# --- VPFLUSHDONE / FREEID -------------------------------------------------------------------
def test_vpflushdone_flushvp_not_done_then_blocked():
    h, b = runnable_td()
    t = h.tdx
    op = t.vp_enter(b.vcpus[0], cpu=0)
    op.complete()                                              # associates the vCPU with CPU 0
    assert t.tdh_mng_vpflushdone(b.tdr).status == st.TDX_FLUSHVP_NOT_DONE
    assert t.tdh_vp_flush(b.vcpus[0], cpu=0).status == S
    assert t.tdh_mng_vpflushdone(b.tdr).status == S
    assert t.td(b.tdr).lifecycle == TdLifecycle.BLOCKED
    assert t.kot.state[b.hkid] == KotState.FLUSHED and t.kot.wbinvd_bitmap[b.hkid] == 0b11
    assert t.tdh_mng_vpflushdone(b.tdr).status == st.TDX_LIFECYCLE_STATE_INCORRECT
    # TD-scope runtime leaves fail once the TD is not KEYS_CONFIGURED
    assert t.tdh_mem_track(b.tdr).status == st.TDX_LIFECYCLE_STATE_INCORRECT


def test_vpflushdone_before_init_ignores_vcpus():
    h = new_host()
    tdr, _ = _created(h)
    assert h.tdx.tdh_mng_vpflushdone(tdr).status == S


def test_freeid_order_of_failures():
    h, b = runnable_td()
    t = h.tdx
    assert t.tdh_mng_key_freeid(b.tdr).status == st.TDX_LIFECYCLE_STATE_INCORRECT
    assert t.tdh_mng_vpflushdone(b.tdr).status == S
    assert t.tdh_mng_key_freeid(b.tdr).status == st.TDX_WBCACHE_NOT_COMPLETE
    assert t.tdh_phymem_cache_wb(cpu=0).status == S
    assert t.tdh_mng_key_freeid(b.tdr).status == st.TDX_WBCACHE_NOT_COMPLETE
    assert t.tdh_phymem_cache_wb(cpu=2).status == S
    assert t.tdh_mng_key_freeid(b.tdr).status == S
    assert t.kot.state[b.hkid] == KotState.FREE and t.td(b.tdr).lifecycle == TdLifecycle.TEARDOWN
    assert h.keyids.nr_configured == 0
    h.keyids.free(b.hkid)
    # TD-scope calls after TEARDOWN fail
    assert t.tdh_mem_page_aug(b.tdr, GPA, 0, h.alloc_frame()).status == st.TDX_LIFECYCLE_STATE_INCORRECT
    assert t.tdh_mng_key_freeid(b.tdr).status == st.TDX_LIFECYCLE_STATE_INCORRECT
