"""One deliberately broken model per invariant (SPEC §6; issue 4 item 7): each test breaks one
rule — a monkeypatched leaf handler, a PAMT/S-EPT poke through the cores' public or test-only
APIs, a host knob — and asserts that ``check_invariants`` reports exactly that id, with the
frame/gfn and an event index, while every *other* built-in invariant still passes on that host.
"""

from __future__ import annotations

import pytest

import tdxcore as tdx
from tdxcore import _sept
from tdxcore import status as st
from tdxcore.constants import PAGE_SHIFT, PageType
from tdxcore.errors import InvariantViolation
from tdxcore.invariants import BUILTIN_IDS
from tdxcore.module import leaves
from tdxcore.module.leaves import mem
from tdxcore.module.tdx_module import result
from tdxcore.status import OPERAND_ID_RCX, Leaf, OpState, SeptState  # type: ignore[attr-defined]
from tests.scenarios import GPA, MEM, mapped, runnable_td, sept_path

S = st.TDX_SUCCESS
GFN = GPA >> PAGE_SHIFT


def only(h, inv, *, pfn=None, gfn=None, index=None):
    """``inv`` (and only it) is reported, naming ``pfn``/``gfn`` and an event index."""
    with pytest.raises(InvariantViolation) as ei:
        tdx.check_invariants(h)
    e = ei.value
    assert e.invariant == inv, str(e)
    if pfn is not None:
        assert e.pfn == pfn, str(e)
    if gfn is not None:
        assert e.gfn == gfn, str(e)
    assert e.event_index is not None and 0 <= e.event_index < len(h.events), str(e)
    if index is not None:
        assert e.event_index == index, str(e)
    assert e.replay and f"seed={h.seed}" in e.replay
    tdx.check_invariants(h, ids=[i for i in BUILTIN_IDS if i != inv])
    with pytest.raises(InvariantViolation):                       # sticky: still broken
        tdx.check_invariants(h, ids=[inv])
    return e


def last_end(h, leaf):
    return h.events.filter(kind="seamcall_end", leaf=leaf)[-1][0]


def wrap(monkeypatch, leaf, around):
    """Replace ``leaf``'s begin handler by ``around(orig, tdx, op)``."""
    orig = leaves._all[leaf]
    monkeypatch.setitem(leaves._all, leaf, lambda t, op: around(orig, t, op))


def test_i01_pamt_type_of_a_tdcs_page(monkeypatch):
    h, b = runnable_td()
    tdx.check_invariants(h)
    p = b.tdcs[1]
    assert h.pamt.release(p, 0) == S and h.pamt.assign(p, PageType.PT_EPT, b.tdr, 0) == S
    only(h, "I01", pfn=p)


def test_i02_frame_assigned_to_a_td_behind_the_modules_back():
    h, b = runnable_td()
    p = h.alloc_frame()
    assert h.pamt.assign(p, PageType.PT_REG, b.tdr, 0) == S      # CHLDCNT + 1, no record
    only(h, "I02", pfn=b.tdr)


def test_i03_lock_taken_outside_the_ops_bookkeeping(monkeypatch):
    h, b = runnable_td()

    def leaky(orig, t, op):
        eff = orig(t, op)
        td = t.tds[op.rcx >> PAGE_SHIFT]

        def effect():
            res = eff()
            td.op_state_lock.try_shared()                        # never released, no holder
            return res
        return effect
    wrap(monkeypatch, Leaf.TDH_MEM_TRACK, leaky)
    assert h.tdx.tdh_mem_track(b.tdr).status == S
    only(h, "I03", pfn=b.tdr)


def test_i03_busy_decided_after_the_op_began(monkeypatch):
    h, b = runnable_td()

    def late_busy(orig, t, op):
        orig(t, op)
        return lambda: result(st.TDX_OPERAND_BUSY | st.OPERAND_ID_TD_EPOCH)   # BUSY from the effect
    wrap(monkeypatch, Leaf.TDH_MEM_TRACK, late_busy)
    op = h.tdx.begin(Leaf.TDH_MEM_TRACK, b.tdr << PAGE_SHIFT, actor="kvm")
    assert op.acquired
    h.tdx.tdh_mng_rd(b.tdr, 0, actor="other")                                # another op meanwhile
    assert op.complete().status.base == st.TDX_OPERAND_BUSY
    only(h, "I03", index=last_end(h, Leaf.TDH_MEM_TRACK))


def test_i03_an_end_event_dropped(monkeypatch):
    h, b = runnable_td()
    emit = h.tdx._emit_end_op

    def drop_track(op, res):
        return None if op.leaf == Leaf.TDH_MEM_TRACK else emit(op, res)
    monkeypatch.setattr(h.tdx, "_emit_end_op", drop_track)
    n = len(h.events)
    assert h.tdx.tdh_mem_track(b.tdr).status == S
    only(h, "I03", index=n)                                  # the TRACK's begin, never ended


def test_i04_mapped_frame_with_the_wrong_page_type():
    h, b = runnable_td()
    p = mapped(h, b)
    assert h.pamt.release(p, 0) == S and h.pamt.assign(p, PageType.PT_TDCX, b.tdr, 0) == S
    only(h, "I04", pfn=p, gfn=GFN)


def test_i05_page_add_after_finalize(monkeypatch):
    h, b = runnable_td()
    sept_path(h, b)

    def as_if_initialized(orig, t, op):
        td = t.tds[op.rdx >> PAGE_SHIFT]
        saved, td.op_state = td.op_state, OpState.INITIALIZED
        try:
            return orig(t, op)
        finally:
            td.op_state = saved
    wrap(monkeypatch, Leaf.TDH_MEM_PAGE_ADD, as_if_initialized)
    p, src = h.alloc_frame(), h.alloc_frame()
    assert h.tdx.tdh_mem_page_add(b.tdr, GPA, p, src).status == S
    only(h, "I05", gfn=GFN, pfn=p, index=last_end(h, Leaf.TDH_MEM_PAGE_ADD))


def test_aug_before_finalize_is_not_a_module_violation():
    """The module allows AUG in INITIALIZED (op_state_legality.csv); "AUG only after" is KVM's."""
    h, b = runnable_td(finalize=False)
    sept_path(h, b)
    assert h.tdx.tdh_mem_page_aug(b.tdr, GPA, 0, h.alloc_frame()).status == S
    tdx.check_invariants(h)


def test_i07_remove_without_track(monkeypatch):
    h, b = runnable_td()
    p = mapped(h, b)

    def untracked(t, op):
        td, gpa, level = mem._prologue(op, False, False, hi=2)
        pfn = mem._mapped_pfn(td, gpa, level, "leaf")
        if pfn >= 0:
            op.pfn = pfn
            op.lock_pamt(pfn, True, OPERAND_ID_RCX)
        return lambda: mem._sept(td.sept.page_remove(gpa, level, td.epoch, td.refcount_prev, False))
    monkeypatch.setitem(leaves._all, Leaf.TDH_MEM_PAGE_REMOVE, untracked)
    assert h.tdx.tdh_mem_range_block(b.tdr, GPA, 0).status == S
    assert h.tdx.tdh_mem_page_remove(b.tdr, GPA, 0).status == S           # no TRACK in between
    only(h, "I07", gfn=GFN, pfn=p, index=last_end(h, Leaf.TDH_MEM_PAGE_REMOVE))


def _flushdone(h, b):
    for v in b.vcpus:
        h.tdx.tdh_vp_flush(v)
    assert h.tdx.tdh_mng_vpflushdone(b.tdr).status == S


def test_i15_freeid_without_cache_wb(monkeypatch):
    h, b = runnable_td()
    _flushdone(h, b)

    def blind(orig, t, op):
        saved = dict(t.kot.wbinvd_bitmap)
        t.kot.wbinvd_bitmap.update({k: 0 for k in saved})
        try:
            return orig(t, op)
        finally:
            t.kot.wbinvd_bitmap.update(saved)
    wrap(monkeypatch, Leaf.TDH_MNG_KEY_FREEID, blind)
    assert h.tdx.tdh_mng_key_freeid(b.tdr).status == S
    only(h, "I15", pfn=b.tdr, index=last_end(h, Leaf.TDH_MNG_KEY_FREEID))


def test_i18_vpflushdone_with_an_associated_vcpu(monkeypatch):
    h, b = runnable_td()
    h.tdx.vp_enter(b.vcpus[0], cpu=1, actor="vcpu0").complete()

    def blind(orig, t, op):
        td = t.tds[op.rcx >> PAGE_SHIFT]
        saved, td.num_assoc = td.num_assoc, 0
        try:
            return orig(t, op)
        finally:
            td.num_assoc = saved
    wrap(monkeypatch, Leaf.TDH_MNG_VPFLUSHDONE, blind)
    assert h.tdx.tdh_mng_vpflushdone(b.tdr).status == S
    only(h, "I18", pfn=b.vcpus[0], index=last_end(h, Leaf.TDH_MNG_VPFLUSHDONE))


def test_i19_one_hkid_given_to_two_tds(monkeypatch):
    h, b = runnable_td()

    def blind(orig, t, op):
        saved = t.kot.state[op.rdx]
        t.kot.state[op.rdx] = type(saved).FREE
        try:
            return orig(t, op)
        finally:
            t.kot.state[op.rdx] = saved
    wrap(monkeypatch, Leaf.TDH_MNG_CREATE, blind)
    tdr2 = h.alloc_frame()
    assert h.tdx.tdh_mng_create(tdr2, b.hkid).status == S
    only(h, "I19", pfn=tdr2)


def test_i20_last_cpu_of_a_package_offlined_while_hkids_configured(monkeypatch):
    h, b = runnable_td()
    monkeypatch.setattr(type(h.keyids), "nr_configured", property(lambda self: 0))   # offline's guard blind
    h.cpu_offline(2)
    h.cpu_offline(3)
    idx = h.events.filter(kind="cpu")[-1][0]
    only(h, "I20", index=idx)


def test_i22_config_before_lp_init_on_every_cpu(monkeypatch):
    h = tdx.Host(memory=MEM)
    h.cpu_offline(3)                         # booted, offline at enable(): no LP.INIT for it

    def blind(orig, t, op):
        fake = [c for c in range(t.host.nr_cpus) if c not in t.lp_initialized]
        for c in fake:
            t.lp_initialized[c] = None
        try:
            return orig(t, op)
        finally:
            for c in fake:
                del t.lp_initialized[c]
    wrap(monkeypatch, Leaf.TDH_SYS_CONFIG, blind)
    assert h.tdx.enable() == 0
    only(h, "I22", index=last_end(h, Leaf.TDH_SYS_CONFIG))


def test_s6b_one_frame_mapped_at_two_gpas():
    h, b = runnable_td()
    p = mapped(h, b)
    tree = h.tdx.td(b.tdr).sept
    assert h.pamt.release(p, 0) == S
    _sept._testing_force_state(tree, GPA + 0x1000, 0, SeptState["MAPPED"].value, pfn=p)
    only(h, "S6b", pfn=p, gfn=GFN + 1)


def test_s6c_td_frame_returned_to_the_allocator():
    h, b = runnable_td()
    p = mapped(h, b)
    h.free_frame(p)                          # the host frees a frame the TD still maps
    only(h, "S6c", pfn=p, gfn=GFN)


def test_s6c_leaked_frame_returned_to_the_allocator():
    h, b = runnable_td()
    p = h.alloc_frame()
    h.record_leak(p, None, "page", None, "reclaim failed")
    h.free_frame(p)
    only(h, "S6c", pfn=p)


def test_each_builtin_id_has_a_mutation_test():
    names = " ".join(n for n in globals() if n.startswith("test_"))
    for i in BUILTIN_IDS:
        assert f"test_{i.lower()}_" in names, i
