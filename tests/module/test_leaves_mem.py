"""TDH.MEM.* and TDH.MR.* leaves: failures, precedence, effects (tdx-facts §2.3, §3; SPEC §4.2)."""

from __future__ import annotations

import pytest

from tdxcore import status as st
from tdxcore.constants import PAGE_SHIFT, PageType
from tdxcore.errors import TdxValueError
from tdxcore.module.leaves.mem import entry_state
from tdxcore.status import Leaf, SeptState
from tests.scenarios import GPA, aug, mapped, runnable_td, sept_path

S = st.TDX_SUCCESS


def _state(h, b, gpa, level=0):
    return entry_state(h.tdx.td(b.tdr).sept.walk(gpa, level)[1])


# --- GPA|level operand and the explicit TDR --------------------------------------------------
@pytest.mark.parametrize("rcx", [GPA | 5, GPA | 0x8, GPA | (1 << 60), GPA + 0x800])
def test_bad_gpa_level_operand(rcx):
    h, b = runnable_td()
    r = h.tdx.seamcall(Leaf.TDH_MEM_PAGE_AUG, rcx, b.tdr << PAGE_SHIFT, h.alloc_frame() << PAGE_SHIFT)
    assert r.status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX


def test_shared_gpa_and_misaligned_level_operand_invalid():
    h, b = runnable_td()
    t = h.tdx
    assert (t.tdh_mem_page_aug(b.tdr, 1 << 47, 0, h.alloc_frame()).status
            == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX)
    assert t.tdh_mem_range_block(b.tdr, GPA + 0x1000, 1).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX


def test_typed_methods_reject_bad_python_input():
    h, b = runnable_td()
    with pytest.raises(TdxValueError, match="4 KiB aligned"):
        h.tdx.tdh_mem_page_aug(b.tdr, GPA + 1, 0, 1)
    with pytest.raises(TdxValueError, match="level"):
        h.tdx.tdh_mem_page_aug(b.tdr, GPA, 5, 1)
    with pytest.raises(TdxValueError, match="gpa"):
        h.tdx.tdh_mem_range_block(b.tdr, 1 << 52, 0)


def test_explicit_tdr_check_and_precedence():
    h, b = runnable_td()
    t = h.tdx
    r = t.tdh_mem_page_aug(b.tdcs[0], GPA, 0, h.alloc_frame())
    assert r.status == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RDX
    # a bad GPA|level operand wins over a bad TDR
    r = t.seamcall(Leaf.TDH_MEM_PAGE_AUG, GPA | 7, b.tdcs[0] << PAGE_SHIFT, 0)
    assert r.status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX


# --- SEPT.ADD ---------------------------------------------------------------------------------
def test_sept_add_failures():
    h, b = runnable_td()
    t = h.tdx
    assert (t.tdh_mem_sept_add(b.tdr, GPA, 0, h.alloc_frame()).status
            == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX)
    r = t.tdh_mem_sept_add(b.tdr, GPA, 1, h.alloc_frame())
    assert r.status == st.TDX_EPT_WALK_FAILED | st.OPERAND_ID_RCX and r.rdx & 7 == 3   # failed at level 3
    sept_path(h, b)
    assert (t.tdh_mem_sept_add(b.tdr, GPA, 1, h.alloc_frame()).status
            == st.TDX_EPT_ENTRY_STATE_INCORRECT | st.OPERAND_ID_RCX)
    # a non-free page for a FREE slot
    g2 = GPA + (2 << 20)
    r = t.tdh_mem_sept_add(b.tdr, g2, 1, b.tdcs[0])
    assert r.status == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_R8
    assert _state(h, b, g2, 1) == SeptState.FREE


def test_sept_add_effects():
    h, b = runnable_td()
    n = h.pamt.child_count(b.tdr)
    sept_path(h, b)
    _, e, _ = h.tdx.td(b.tdr).sept.walk(GPA, 1)
    p = (e & ((1 << 52) - 1)) >> 12
    assert h.pamt.page_type(p) == PageType.PT_EPT and h.pamt.owner(p) == b.tdr
    assert h.pamt.child_count(b.tdr) == n + 3 and h.frame_keyid(p) == b.hkid


# --- PAGE.ADD / MR.EXTEND / MR.FINALIZE --------------------------------------------------------
def test_page_add_copies_and_measures():
    h, b = runnable_td(finalize=False)
    t = h.tdx
    sept_path(h, b)
    src, dst = h.alloc_frame(), h.alloc_frame()
    h.frame_write(src, 0, b"\xAB" * 4096, 0)
    m0 = t.td(b.tdr).mrtd_now()
    assert t.tdh_mem_page_add(b.tdr, GPA, dst, src).status == S
    assert h.frame_read(dst, 0, 16, b.hkid) == b"\xAB" * 16
    assert h.frame_read(dst, 0, 16, 0) != b"\xAB" * 16            # ciphertext to the host
    m1 = t.td(b.tdr).mrtd_now()
    assert m1 != m0 and _state(h, b, GPA) == SeptState.MAPPED
    assert t.tdh_mr_extend(b.tdr, GPA + 256).status == S
    assert t.td(b.tdr).mrtd_now() != m1
    assert t.tdh_mem_page_add(b.tdr, GPA, h.alloc_frame(), src).status == \
        st.TDX_EPT_ENTRY_STATE_INCORRECT | st.OPERAND_ID_RCX
    assert t.tdh_mr_finalize(b.tdr).status == S
    frozen = t.td(b.tdr).mrtd
    assert t.tdh_mem_page_add(b.tdr, GPA + 0x1000, h.alloc_frame(), src).status == st.TDX_OP_STATE_INCORRECT
    assert t.tdh_mr_extend(b.tdr, GPA).status == st.TDX_OP_STATE_INCORRECT
    assert t.tdh_mr_finalize(b.tdr).status == st.TDX_OP_STATE_INCORRECT
    assert t.td(b.tdr).mrtd_now() == frozen


def test_page_add_level_and_mr_extend_failures():
    h, b = runnable_td(finalize=False)
    t = h.tdx
    r = t.seamcall(Leaf.TDH_MEM_PAGE_ADD, GPA | 1, b.tdr << 12, h.alloc_frame() << 12, h.alloc_frame() << 12)
    assert r.status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX
    assert t.tdh_mr_extend(b.tdr, GPA + 8).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX
    assert t.tdh_mr_extend(b.tdr, GPA).status == st.TDX_EPT_WALK_FAILED | st.OPERAND_ID_RCX
    sept_path(h, b)
    assert t.tdh_mr_extend(b.tdr, GPA).status == st.TDX_EPT_ENTRY_STATE_INCORRECT | st.OPERAND_ID_RCX


def test_measurement_is_deterministic():
    digests = []
    for _ in range(2):
        h, b = runnable_td(finalize=False)
        sept_path(h, b)
        src = h.alloc_frame()
        h.frame_write(src, 0, bytes(range(256)) * 16, 0)
        h.tdx.tdh_mem_page_add(b.tdr, GPA, h.alloc_frame(), src)
        h.tdx.tdh_mr_extend(b.tdr, GPA)
        h.tdx.tdh_mr_finalize(b.tdr)
        digests.append(h.tdx.td(b.tdr).mrtd)
    assert digests[0] == digests[1] and len(digests[0]) == 48


# --- AUG / BLOCK / UNBLOCK / TRACK / REMOVE ------------------------------------------------------
def test_aug_effects_and_page_not_free():
    h, b = runnable_td()
    t = h.tdx
    n = h.pamt.child_count(b.tdr)
    p = aug(h, b)
    assert h.pamt.page_type(p) == PageType.PT_REG and h.pamt.owner(p) == b.tdr
    assert h.pamt.child_count(b.tdr) == n + 3 + 1 and _state(h, b, GPA) == SeptState.PENDING
    r = t.tdh_mem_page_aug(b.tdr, GPA + 0x1000, 0, p)
    assert r.status == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_R8
    # entry state is checked before the page: a PENDING entry and a used page -> state wins
    assert t.tdh_mem_page_aug(b.tdr, GPA, 0, p).status == st.TDX_EPT_ENTRY_STATE_INCORRECT | st.OPERAND_ID_RCX


def test_aug_allowed_before_finalize_by_op_state_table():
    h, b = runnable_td(finalize=False)
    sept_path(h, b)
    assert h.tdx.tdh_mem_page_aug(b.tdr, GPA, 0, h.alloc_frame()).status == S     # INITIALIZED is legal


def test_block_states_and_bepoch():
    h, b = runnable_td()
    t = h.tdx
    p = mapped(h, b)
    t.tdh_mem_track(b.tdr)
    assert t.tdh_mem_range_block(b.tdr, GPA, 0).status == S
    assert h.pamt.bepoch(p) == t.td(b.tdr).epoch == 2
    assert t.tdh_mem_range_block(b.tdr, GPA, 0).status == st.TDX_GPA_RANGE_ALREADY_BLOCKED | st.OPERAND_ID_RCX
    assert (t.tdh_mem_range_block(b.tdr, GPA + 0x1000, 0).status
            == st.TDX_EPT_ENTRY_STATE_INCORRECT | st.OPERAND_ID_RCX)


def test_unblock_needs_tracking():
    h, b = runnable_td()
    t = h.tdx
    mapped(h, b)
    assert (t.tdh_mem_range_unblock(b.tdr, GPA, 0).status
            == st.TDX_EPT_ENTRY_STATE_INCORRECT | st.OPERAND_ID_RCX)
    t.tdh_mem_range_block(b.tdr, GPA, 0)
    assert (t.tdh_mem_range_unblock(b.tdr, GPA, 0).status
            == st.TDX_TLB_TRACKING_NOT_DONE | st.OPERAND_ID_SEPT_TREE)
    t.tdh_mem_track(b.tdr)
    assert t.tdh_mem_range_unblock(b.tdr, GPA, 0).status == S
    assert _state(h, b, GPA) == SeptState.MAPPED


def test_track_waits_for_vcpus_of_previous_epoch():
    h, b = runnable_td(vcpus=2)
    t = h.tdx
    p = mapped(h, b)
    op = t.vp_enter(b.vcpus[1], cpu=1)
    op.enter()                                            # entered in epoch 1
    t.tdh_mem_range_block(b.tdr, GPA, 0)                  # BEPOCH 1
    assert t.tdh_mem_track(b.tdr).status == S             # epoch 2; REFCOUNT[1] = 1
    assert t.tdh_mem_page_remove(b.tdr, GPA, 0).status == st.TDX_TLB_TRACKING_NOT_DONE | st.OPERAND_ID_RCX
    assert t.tdh_mem_track(b.tdr).status == st.TDX_PREVIOUS_TLB_EPOCH_BUSY
    op.exit(12)
    assert t.tdh_mem_page_remove(b.tdr, GPA, 0).status == S
    assert h.pamt.page_type(p) == PageType.PT_NDA


def test_remove_before_finalize_needs_no_tracking():
    h, b = runnable_td(finalize=False)
    t = h.tdx
    sept_path(h, b)
    src, p = h.alloc_frame(), h.alloc_frame()
    t.tdh_mem_page_add(b.tdr, GPA, p, src)
    r = t.tdh_mem_page_remove(b.tdr, GPA, 0)
    assert r.status == S and h.pamt.page_type(p) == PageType.PT_NDA


def test_remove_free_entry_and_sept_remove_leaf():
    h, b = runnable_td()
    t = h.tdx
    sept_path(h, b)
    assert t.tdh_mem_page_remove(b.tdr, GPA, 0).status == st.TDX_EPT_ENTRY_STATE_INCORRECT | st.OPERAND_ID_RCX
    assert t.tdh_mem_sept_remove(b.tdr, GPA, 1).status == st.TDX_GPA_RANGE_NOT_BLOCKED | st.OPERAND_ID_RCX


def test_track_not_a_tdr_and_op_state():
    h, b = runnable_td(finalize=False)
    t = h.tdx
    assert t.tdh_mem_track(b.tdcs[1]).status == st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_RCX
    assert t.tdh_mem_track(b.tdr).status == S               # INITIALIZED allows TRACK


def test_remove_busy_on_the_mapped_page_lock():
    h, b = runnable_td()
    t = h.tdx
    p = mapped(h, b)
    t.tdh_mem_range_block(b.tdr, GPA, 0)
    t.tdh_mem_track(b.tdr)
    wb = t.begin(Leaf.TDH_PHYMEM_PAGE_WBINVD, (p << PAGE_SHIFT) | (b.hkid << 46), actor="wb")
    r = t.tdh_mem_page_remove(b.tdr, GPA, 0, actor="zap")
    assert r.status == st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX
    wb.complete()
    assert t.tdh_mem_page_remove(b.tdr, GPA, 0).status == S


def test_mng_rd_before_init_tdcs_not_allocated():
    from tests.scenarios import new_host

    h = new_host()
    hk, tdr = h.keyids.alloc(), h.alloc_frame()
    h.tdx.tdh_mng_create(tdr, hk)
    for pkg in range(h.nr_packages):
        h.tdx.tdh_mng_key_config(tdr, cpu=h.first_online_cpu(pkg))
    assert h.tdx.tdh_mng_rd(tdr, 0).status == st.TDX_TDCS_NOT_ALLOCATED


@pytest.mark.parametrize("leaf,level", [(Leaf.TDH_MEM_PAGE_AUG, 2), (Leaf.TDH_MEM_PAGE_REMOVE, 3),
                                        (Leaf.TDH_MEM_SEPT_REMOVE, 0), (Leaf.TDH_MEM_PAGE_ADD, 1)])
def test_leaf_level_range_is_an_operand_check_before_any_lock(leaf, level):
    h, b = runnable_td(finalize=leaf != Leaf.TDH_MEM_PAGE_ADD)
    n = len(h.events.filter(kind="lock_conflict"))
    g = 0 if level else GPA
    r = h.tdx.seamcall(leaf, g | level, b.tdr << 12, h.alloc_frame() << 12, h.alloc_frame() << 12)
    assert r.status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX
    assert len(h.events.filter(kind="lock_conflict")) == n and h.tdx.holders == {}
