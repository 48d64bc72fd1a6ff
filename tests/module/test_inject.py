"""Status injection (SPEC §3.1; issue 4 item 6).

Validation, the per-leaf table, count, probability, match, determinism under a seeded stream.
"""

from __future__ import annotations

import math
import random

import pytest

from tdxcore import status as st
from tdxcore.constants import ACCEPT_EPT_VIOLATION, MAX_TDMRS
from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.module import Host
from tdxcore.module.inject import LEAF_STATUSES, InjectCall, Injection, Injector
from tdxcore.status import Leaf, TdcallLeaf, TdxStatus

AUG, ACCEPT = Leaf.TDH_MEM_PAGE_AUG, TdcallLeaf.TDG_MEM_PAGE_ACCEPT
BUSY_SEPT = st.TDX_OPERAND_BUSY | st.OPERAND_ID_SEPT_TREE


def _inj(seed: int = 0, **kw) -> Injector:
    return Injector(random.Random(seed), **kw)


def _call(leaf=AUG, gpa: int = 0x1000, level: int = 0, **kw) -> InjectCall:
    return InjectCall(leaf, gpa | level, **kw)


# ------------------------------------------------------------------ validation
def test_constructor_validation():
    with pytest.raises(TdxTypeError, match="rng="):
        Injector(7)  # type: ignore[arg-type]
    with pytest.raises(TdxTypeError, match="on_inject="):
        Injector(random.Random(0), on_inject=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("leaf", [6, True, "TDH.MEM.PAGE.AUG", None])
def test_leaf_must_be_an_enum_member(leaf):
    inj = _inj()
    with pytest.raises(TdxTypeError, match=r"leaf=.* must be a tdx.Leaf or tdx.TdcallLeaf"):
        inj.add(leaf, BUSY_SEPT)
    assert inj.armed == ()


def test_leaf_without_a_table_is_refused():
    with pytest.raises(TdxValueError, match=r"leaf=TDH.SERVTD.BIND has no status table"):
        _inj().add(Leaf.TDH_SERVTD_BIND, st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX)
    with pytest.raises(TdxValueError, match=r"leaf=TDG.VP.VMCALL has no status table"):
        _inj().add(TdcallLeaf.TDG_VP_VMCALL, st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX)


@pytest.mark.parametrize("status", [1.0, "0x8000020000000092", True, None])
def test_status_type(status):
    with pytest.raises(TdxTypeError, match="status="):
        _inj().add(AUG, status)


@pytest.mark.parametrize("status", [-1, 1 << 64])
def test_status_range(status):
    with pytest.raises(TdxValueError, match="status=.* is out of range"):
        _inj().add(AUG, status)


def test_success_is_refused():
    with pytest.raises(TdxValueError, match=r"status=0x0 \(TDX_SUCCESS\) cannot be injected into TDH.MEM"):
        _inj().add(AUG, st.TDX_SUCCESS)


def test_status_the_leaf_cannot_return_names_leaf_and_status():
    inj = _inj()
    with pytest.raises(TdxValueError, match=r"status=TDX_OPERAND_BUSY\|KOT \(0x80000200000000BA\) cannot be "
                                            r"returned by TDH.MEM.PAGE.AUG") as ei:
        inj.add(AUG, st.TDX_OPERAND_BUSY | st.OPERAND_ID_KOT)
    assert ei.value.name == "status" and ei.value.value == st.TDX_OPERAND_BUSY | st.OPERAND_ID_KOT
    assert inj.armed == ()


@pytest.mark.parametrize("count,exc,msg", [(0, TdxValueError, "count=0x0 is out of range"),
                                           (-2, TdxValueError, "count=-0x2 is out of range"),
                                           (1.5, TdxTypeError, "count=1.5 must be an int"),
                                           (True, TdxTypeError, "count=True must be an int, not bool")])
def test_count_validation(count, exc, msg):
    with pytest.raises(exc, match=msg):
        _inj().add(AUG, BUSY_SEPT, count=count)


@pytest.mark.parametrize("p,exc,msg", [(-0.1, TdxValueError, r"probability=-0.1 must be in \[0, 1\]"),
                                       (1.5, TdxValueError, r"probability=1.5 must be in \[0, 1\]"),
                                       (math.nan, TdxValueError, r"probability=nan must be in \[0, 1\]"),
                                       ("0.5", TdxTypeError, "probability='0.5' must be a float"),
                                       (True, TdxTypeError, "probability=True must be a float")])
def test_probability_validation(p, exc, msg):
    with pytest.raises(exc, match=msg):
        _inj().add(AUG, BUSY_SEPT, probability=p)


def test_match_must_be_callable():
    with pytest.raises(TdxTypeError, match="match=3 must be callable"):
        _inj().add(AUG, BUSY_SEPT, match=3)  # type: ignore[arg-type]


def test_precedence_leaf_then_status_then_count_then_probability_then_match():
    inj = _inj()
    with pytest.raises(TdxTypeError, match="leaf="):
        inj.add(6, 0, count=0, probability=2, match=3)  # type: ignore[arg-type]
    with pytest.raises(TdxValueError, match="status="):
        inj.add(AUG, 0, count=0, probability=2, match=3)  # type: ignore[arg-type]
    with pytest.raises(TdxValueError, match="count="):
        inj.add(AUG, BUSY_SEPT, count=0, probability=2, match=3)  # type: ignore[arg-type]
    with pytest.raises(TdxValueError, match="probability="):
        inj.add(AUG, BUSY_SEPT, probability=2, match=3)  # type: ignore[arg-type]
    assert inj.armed == ()


def test_accepted_edge_values():
    inj = _inj()
    for kw in ({"count": None}, {"probability": 0}, {"probability": 1}, {"probability": 0.0},
               {"count": 1 << 40}, {"match": lambda c: True}):
        inj.add(AUG, TdxStatus(BUSY_SEPT), **kw)
    assert len(inj.armed) == 6 and [i.seq for i in inj.armed] == list(range(6))


# ------------------------------------------------------------------ the table
@pytest.mark.parametrize("leaf,status", [
    (AUG, BUSY_SEPT),
    (AUG, st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX),
    (AUG, st.TDX_OPERAND_BUSY | st.OPERAND_ID_R8),
    (AUG, st.TDX_OPERAND_BUSY | st.OPERAND_ID_RDX),
    (AUG, st.TDX_EPT_WALK_FAILED | st.OPERAND_ID_RCX),
    (AUG, st.TDX_EPT_ENTRY_STATE_INCORRECT | st.OPERAND_ID_RCX),
    (AUG, st.TDX_PAGE_METADATA_INCORRECT | st.OPERAND_ID_R8),
    (AUG, st.TDX_OP_STATE_INCORRECT),
    (Leaf.TDH_MEM_SEPT_ADD, BUSY_SEPT),
    (Leaf.TDH_MEM_RANGE_BLOCK, st.TDX_GPA_RANGE_ALREADY_BLOCKED | st.OPERAND_ID_RCX),
    (Leaf.TDH_MEM_TRACK, st.TDX_PREVIOUS_TLB_EPOCH_BUSY),
    (Leaf.TDH_MEM_TRACK, st.TDX_OPERAND_BUSY | st.OPERAND_ID_TD_EPOCH),
    (Leaf.TDH_MEM_PAGE_REMOVE, st.TDX_TLB_TRACKING_NOT_DONE | st.OPERAND_ID_RCX),
    (Leaf.TDH_MEM_PAGE_REMOVE, st.TDX_GPA_RANGE_NOT_BLOCKED | st.OPERAND_ID_RCX),
    (Leaf.TDH_VP_ENTER, BUSY_SEPT),
    (Leaf.TDH_VP_ENTER, st.TDX_OPERAND_BUSY | st.OPERAND_ID_TD_EPOCH),
    (Leaf.TDH_MNG_KEY_CONFIG, st.TDX_KEY_CONFIGURED),
    (Leaf.TDH_MNG_KEY_CONFIG, st.TDX_KEY_GENERATION_FAILED),
    (Leaf.TDH_MNG_CREATE, st.TDX_RND_NO_ENTROPY),
    (Leaf.TDH_MNG_CREATE, st.TDX_OPERAND_BUSY | st.OPERAND_ID_KOT),
    (Leaf.TDH_MNG_ADDCX, st.TDX_RND_NO_ENTROPY),
    (Leaf.TDH_MNG_KEY_FREEID, st.TDX_WBCACHE_NOT_COMPLETE),
    (Leaf.TDH_MNG_VPFLUSHDONE, st.TDX_FLUSHVP_NOT_DONE),
    (Leaf.TDH_PHYMEM_CACHE_WB, st.TDX_INTERRUPTED_RESUMABLE),
    (Leaf.TDH_PHYMEM_PAGE_RECLAIM, st.TDX_TD_ASSOCIATED_PAGES_EXIST),
    (Leaf.TDH_PHYMEM_PAGE_RECLAIM, st.TDX_OPERAND_BUSY | st.OPERAND_ID_TDR),
    (Leaf.TDH_SYS_KEY_CONFIG, st.TDX_KEY_CONFIGURED),
    (Leaf.TDH_SYS_CONFIG, st.TDX_INVALID_TDMR | 3),
    (ACCEPT, st.TDX_OPERAND_BUSY_HOST_PRIORITY | st.OPERAND_ID_RCX),
    (ACCEPT, st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX),
    (ACCEPT, st.TDX_PAGE_ALREADY_ACCEPTED),
    (ACCEPT, st.TDX_PAGE_SIZE_MISMATCH | 1),
    (ACCEPT, ACCEPT_EPT_VIOLATION),                            # the model's EPT-violation exit
])
def test_table_allows(leaf, status):
    assert status in LEAF_STATUSES[leaf]
    assert _inj().add(leaf, status).status == status


@pytest.mark.parametrize("leaf,status", [
    (AUG, st.TDX_OPERAND_BUSY | st.OPERAND_ID_KOT),
    (AUG, st.TDX_OPERAND_BUSY),                                # the operand matters
    (AUG, st.TDX_OPERAND_BUSY_HOST_PRIORITY | st.OPERAND_ID_RCX),
    (AUG, st.TDX_PREVIOUS_TLB_EPOCH_BUSY),
    (AUG, ACCEPT_EPT_VIOLATION),
    (Leaf.TDH_MEM_PAGE_REMOVE, st.TDX_KEY_CONFIGURED),
    (Leaf.TDH_MEM_TRACK, BUSY_SEPT),
    (Leaf.TDH_MEM_RANGE_BLOCK, st.TDX_TLB_TRACKING_NOT_DONE | st.OPERAND_ID_RCX),
    (Leaf.TDH_MNG_KEY_CONFIG, st.TDX_RND_NO_ENTROPY),
    (Leaf.TDH_SYS_CONFIG, st.TDX_INVALID_TDMR | MAX_TDMRS),
    (ACCEPT, BUSY_SEPT),
    (ACCEPT, st.TDX_EPT_ENTRY_STATE_INCORRECT | st.OPERAND_ID_RCX),
])
def test_table_refuses(leaf, status):
    assert status not in LEAF_STATUSES[leaf]
    with pytest.raises(TdxValueError, match=f"cannot be returned by {leaf}"):
        _inj().add(leaf, status)


def test_table_shape():
    # PAGE.AUG and ACCEPT are both 6: separate rows, and a bare int is no key.
    assert LEAF_STATUSES[AUG] != LEAF_STATUSES[ACCEPT]
    assert 6 not in LEAF_STATUSES and AUG in LEAF_STATUSES and ACCEPT in LEAF_STATUSES
    with pytest.raises(KeyError):
        LEAF_STATUSES[6]  # type: ignore[index]
    issue4 = {Leaf[n] for n in (
        "TDH_MNG_CREATE TDH_MNG_KEY_CONFIG TDH_MNG_ADDCX TDH_MNG_INIT TDH_MNG_RD TDH_VP_CREATE "
        "TDH_VP_ADDCX TDH_VP_INIT TDH_VP_ENTER TDH_VP_FLUSH TDH_MEM_SEPT_ADD TDH_MEM_PAGE_ADD "
        "TDH_MR_EXTEND TDH_MR_FINALIZE TDH_MEM_PAGE_AUG TDH_MEM_RANGE_BLOCK TDH_MEM_RANGE_UNBLOCK "
        "TDH_MEM_TRACK TDH_MEM_PAGE_REMOVE TDH_MEM_SEPT_REMOVE TDH_MNG_VPFLUSHDONE TDH_PHYMEM_CACHE_WB "
        "TDH_MNG_KEY_FREEID TDH_PHYMEM_PAGE_RECLAIM TDH_PHYMEM_PAGE_WBINVD TDH_SYS_INIT TDH_SYS_LP_INIT "
        "TDH_SYS_CONFIG TDH_SYS_KEY_CONFIG TDH_SYS_TDMR_INIT").split()}
    assert issue4 <= set(k for k in LEAF_STATUSES if isinstance(k, Leaf))
    bases = set(st.STATUS_CODES.values())
    for leaf, statuses in LEAF_STATUSES.items():
        assert statuses and st.TDX_SUCCESS not in statuses, leaf
        for s in statuses:
            assert s & st.TDX_SEAMCALL_STATUS_MASK in bases, (leaf, hex(s))
    assert list(LEAF_STATUSES) == sorted(LEAF_STATUSES, key=lambda k: (isinstance(k, TdcallLeaf), int(k)))


# ------------------------------------------------------------------ consult: count, order, leaf
def test_count_semantics_and_disarming():
    inj = _inj()
    h = inj.add(AUG, BUSY_SEPT, count=2)
    assert h.armed and h.remaining == 2 and h.count == 2
    assert inj.consult(_call()) == BUSY_SEPT and h.remaining == 1
    assert isinstance(inj.consult(_call()), TdxStatus) and h.remaining == 0
    assert not h.armed and inj.armed == () and inj.consult(_call()) is None
    assert h.nr_fired == 2 and inj.nr_injected == 2


def test_unlimited_count():
    inj = _inj()
    h = inj.add(AUG, BUSY_SEPT, count=None)
    assert all(inj.consult(_call()) == BUSY_SEPT for _ in range(100))
    assert h.armed and h.remaining is None and h.nr_fired == 100


def test_first_armed_in_add_order_wins():
    inj = _inj()
    rcx = st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX
    inj.add(AUG, BUSY_SEPT, count=1)
    inj.add(AUG, rcx, count=2)
    assert [inj.consult(_call()) for _ in range(4)] == [BUSY_SEPT, rcx, rcx, None]


def test_leaf_spaces_are_kept_apart():
    inj = _inj()
    inj.add(AUG, BUSY_SEPT, count=None)
    assert inj.consult(_call(ACCEPT)) is None
    hp = st.TDX_OPERAND_BUSY_HOST_PRIORITY | st.OPERAND_ID_RCX
    inj.add(ACCEPT, hp, count=None)
    assert inj.consult(_call(ACCEPT)) == hp and inj.consult(_call(AUG)) == BUSY_SEPT
    assert inj.consult(_call(Leaf.TDH_MEM_RANGE_BLOCK)) is None
    assert inj.nr_injected_by_leaf() == ((AUG, 1), (ACCEPT, 1))
    assert isinstance(inj.nr_injected_by_leaf()[1][0], TdcallLeaf)


def test_consult_refuses_a_non_call():
    with pytest.raises(TdxTypeError, match="call="):
        _inj().consult(AUG)  # type: ignore[arg-type]


# ------------------------------------------------------------------ probability and the RNG
def test_probability_zero_never_one_always():
    inj = _inj()
    never = inj.add(AUG, BUSY_SEPT, count=None, probability=0.0)
    always = inj.add(AUG, st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX, count=None, probability=1)
    out = [inj.consult(_call()) for _ in range(500)]
    assert set(out) == {st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX}
    assert never.nr_fired == 0 and never.nr_candidates == 500 and always.nr_fired == 500


def test_one_draw_per_candidate_and_none_without_probability():
    rng, twin = random.Random(5), random.Random(5)
    inj = Injector(rng)
    inj.add(AUG, BUSY_SEPT, count=None)                      # no probability: no draw
    for _ in range(10):
        inj.consult(_call())
    assert rng.getstate() == twin.getstate()
    inj.clear()
    inj.add(AUG, BUSY_SEPT, count=None, probability=0.3)
    inj.add(AUG, st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX, count=None, probability=0.3)
    fired = []
    for _ in range(200):
        s = inj.consult(_call())
        # mirror: first draw decides the first injection; only on a miss is a second drawn
        r1 = twin.random()
        expect = BUSY_SEPT if r1 < 0.3 else (st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX
                                             if twin.random() < 0.3 else None)
        assert s == expect
        fired.append(s)
    assert rng.getstate() == twin.getstate() and 0 < fired.count(None) < 200


def _sequence(rng: random.Random, p: float = 0.4, n: int = 300):
    inj = Injector(rng)
    inj.add(AUG, BUSY_SEPT, count=None, probability=p)
    return [inj.consult(_call()) is not None for _ in range(n)]


def test_same_seed_same_sequence_across_injectors():
    assert _sequence(random.Random(9)) == _sequence(random.Random(9))
    assert _sequence(random.Random(9)) != _sequence(random.Random(10))
    a = _sequence(Host(packages=1, cpus_per_package=1, memory=4 << 20, seed=3).rng("inject"))
    b = _sequence(Host(packages=1, cpus_per_package=1, memory=4 << 20, seed=3).rng("inject"))
    c = _sequence(Host(packages=1, cpus_per_package=1, memory=4 << 20, seed=4).rng("inject"))
    assert a == b and a != c and 0 < sum(a) < len(a)


# ------------------------------------------------------------------ match
def test_match_filters_without_consuming_count_or_draws():
    rng, twin = random.Random(1), random.Random(1)
    inj = Injector(rng)
    seen = []

    def only_gfn_5(call: InjectCall) -> bool:
        seen.append(call)
        return call.gpa == 5 << 12

    h = inj.add(AUG, BUSY_SEPT, count=1, probability=1.0, match=only_gfn_5)
    assert inj.consult(_call(gpa=4 << 12)) is None and h.remaining == 1 and rng.getstate() == twin.getstate()
    assert inj.consult(_call(ACCEPT, gpa=5 << 12)) is None and len(seen) == 1   # other leaf: not asked
    c = InjectCall(AUG, (5 << 12) | 1, rdx=0x10000, r8=0x20000, r9=0, cpu=3, actor="vcpu1")
    assert inj.consult(c) == BUSY_SEPT and seen[-1] is c
    assert (c.gpa, c.level, c.cpu, c.actor, c.rdx, c.r8) == (5 << 12, 1, 3, "vcpu1", 0x10000, 0x20000)
    assert h.nr_candidates == 1 and not h.armed


def test_match_exception_propagates():
    inj = _inj()

    def bad(call):
        raise RuntimeError("nope")  # noqa: EM101

    h = inj.add(AUG, BUSY_SEPT, match=bad)
    with pytest.raises(RuntimeError):
        inj.consult(_call())
    assert h.armed and h.nr_fired == 0


def test_inject_call_is_frozen():
    c = _call()
    with pytest.raises(AttributeError):
        c.rcx = 5  # type: ignore[misc]


# ------------------------------------------------------------------ callback, remove, clear, hash
def test_on_inject_callback():
    got = []
    inj = _inj(on_inject=lambda call, injection: got.append((call.leaf, injection.status)))
    inj.add(AUG, BUSY_SEPT, count=2)
    inj.consult(_call())
    inj.consult(_call(ACCEPT))
    inj.consult(_call())
    inj.consult(_call())
    assert got == [(AUG, BUSY_SEPT), (AUG, BUSY_SEPT)]


def test_remove_and_clear():
    inj = _inj()
    a = inj.add(AUG, BUSY_SEPT, count=None)
    b = inj.add(Leaf.TDH_MEM_TRACK, st.TDX_PREVIOUS_TLB_EPOCH_BUSY)
    inj.remove(a)
    assert not a.armed and inj.armed == (b,) and inj.consult(_call()) is None
    with pytest.raises(TdxValueError, match="is not armed in this injector"):
        inj.remove(a)
    with pytest.raises(TdxValueError, match="is not armed in this injector"):
        _inj().remove(b)
    with pytest.raises(TdxTypeError, match="must be an Injection handle"):
        inj.remove("b")  # type: ignore[arg-type]
    inj.clear()
    assert inj.armed == () and not b.armed
    assert inj.consult(_call(Leaf.TDH_MEM_TRACK)) is None


def test_handle_is_read_only():
    h = _inj().add(AUG, BUSY_SEPT)
    assert isinstance(h, Injection) and "TDX_OPERAND_BUSY|SEPT_TREE" in repr(h)
    with pytest.raises(AttributeError):
        h.status = 0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        h.remaining = 5  # type: ignore[misc]


def test_state_bytes_is_canonical():
    def build(seed):
        inj = _inj(seed)
        inj.add(AUG, BUSY_SEPT, count=3, probability=0.5)
        inj.add(ACCEPT, st.TDX_OPERAND_BUSY | st.OPERAND_ID_RCX, match=lambda c: True)
        return inj

    x, y = build(2), build(2)
    assert x.state_bytes() == y.state_bytes()
    for _ in range(6):
        x.consult(_call())
        y.consult(_call())
    assert x.state_bytes() == y.state_bytes()
    before = x.state_bytes()
    x.consult(_call(ACCEPT))
    assert x.state_bytes() != before


def test_is_armed_and_only_the_enum_member_matches():
    inj = _inj()
    assert not inj.is_armed
    h = inj.add(AUG, BUSY_SEPT, count=1)
    assert inj.is_armed
    assert inj.consult(InjectCall(6)) is None  # type: ignore[arg-type]  # a bare int is no leaf
    assert inj.consult(_call()) == BUSY_SEPT and not inj.is_armed and not h.armed


# ---------------------------------------------------------------------------------------------
# Wired into the module: host.tdx.inject() replaces a leaf's effect (SPEC §3.1)
# ---------------------------------------------------------------------------------------------


def _running_td():
    from tdxcore.module.host import Host
    from tdxcore.module.td import add_sept_path, build_td

    host = Host(seed=7)
    host.tdx.enable()
    built = build_td(host)
    add_sept_path(host, built.tdr, 4 << 30)
    return host, built


def test_module_inject_replaces_the_effect_and_counts():
    from tdxcore.status import OPERAND_ID_SEPT_TREE, TDX_OPERAND_BUSY, TDX_SUCCESS, Leaf

    host, built = _running_td()
    gpa, page = 4 << 30, host.alloc_frame()
    before = host.tdx.td(built.tdr).sept.state_hash()
    host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE, count=1,
                    match=lambda call: call.gpa == gpa)
    res = host.tdx.tdh_mem_page_aug(built.tdr, gpa, 0, page)
    assert res.status == TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE
    assert host.tdx.td(built.tdr).sept.state_hash() == before        # no effect
    assert host.stats.nr_injected == 1
    assert host.tdx.tdh_mem_page_aug(built.tdr, gpa, 0, page).status == TDX_SUCCESS  # count spent


def test_module_inject_refuses_a_status_the_leaf_cannot_return():
    from tdxcore.errors import TdxTypeError, TdxValueError
    from tdxcore.status import TDX_KEY_CONFIGURED, Leaf

    host, _ = _running_td()
    with pytest.raises(TdxValueError, match="status"):
        host.tdx.inject(Leaf.TDH_MEM_PAGE_REMOVE, TDX_KEY_CONFIGURED)
    with pytest.raises(TdxTypeError, match="leaf"):
        host.tdx.inject(6, TDX_KEY_CONFIGURED)


def test_module_inject_is_deterministic_under_the_host_seed():
    from tdxcore.status import OPERAND_ID_SEPT_TREE, TDX_OPERAND_BUSY, Leaf

    def run():
        host, built = _running_td()
        host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE, count=None,
                        probability=0.5)
        out = []
        for i in range(32):
            out.append(int(host.tdx.tdh_mem_page_aug(built.tdr, (4 << 30) + (i << 12), 0,
                                                      host.alloc_frame()).status))
        return out, host.state_hash()

    a, b = run(), run()
    assert a == b and 0 < sum(1 for s in a[0] if s) < 32
