"""The mirror root (``kvm/mmu.py``): link missing levels then set the leaf, FROZEN during a hook,
restore on failure, zap, free external pages deepest first — against a recording fake of the hooks."""

from __future__ import annotations

import errno

from tdxcore.kvm.mmu import MirrorMmu, SpteState, gfn_round_for_level
from tdxcore.sched import run_to_completion


class FakeOps:
    def __init__(self, mmu_ref, fail=None):
        self.calls = []
        self.fail = fail or {}
        self.next = 100
        self.freed = []
        self.mmu_ref = mmu_ref

    def _ret(self, name):
        return self.fail.pop(name, 0) if name in self.fail else 0

    def link_external_spt(self, gfn, pg_level, spt, actor="host"):
        yield from ()
        self.calls.append(("link", gfn, pg_level, spt, self.mmu_ref[0]._nonleaf[(pg_level, gfn)][1]))
        return self._ret("link")

    def set_external_spte(self, gfn, pg_level, pfn, actor="host"):
        yield from ()
        self.calls.append(("set", gfn, pg_level, pfn, self.mmu_ref[0].leaf(gfn)[1]))
        return self._ret("set")

    def remove_external_spte(self, gfn, pg_level, pfn):
        yield from ()
        self.calls.append(("remove", gfn, pg_level, pfn, self.mmu_ref[0].leaf(gfn)[1]))
        return self._ret("remove")

    def free_external_spt(self, gfn, pg_level, spt):
        self.calls.append(("free", gfn, pg_level, spt))
        return 0

    def alloc_spt(self):
        self.next += 1
        return self.next

    def free_spt(self, spt):
        self.freed.append(spt)


def mk(fail=None, root=4):
    ref = []
    ops = FakeOps(ref, fail)
    m = MirrorMmu(root, ops)
    ref.append(m)
    return m, ops


def test_round_for_level():
    assert gfn_round_for_level(0x12345, 1) == 0x12345
    assert gfn_round_for_level(0x12345, 2) == 0x12200
    assert gfn_round_for_level(0x12345, 3) == 0


def test_map_links_missing_levels_top_down_then_sets_leaf_frozen():
    m, ops = mk()
    gfn = 1 << 20
    assert run_to_completion(m.map_private(gfn, 7)) == 0
    assert ops.calls == [("link", 0, 4, 101, SpteState.FROZEN), ("link", gfn, 3, 102, SpteState.FROZEN),
                         ("link", gfn, 2, 103, SpteState.FROZEN), ("set", gfn, 1, 7, SpteState.FROZEN)]
    assert m.leaves == ((gfn, 7),) and m.nonleaf == ((4, 0, 101), (3, gfn, 102), (2, gfn, 103))
    ops.calls.clear()
    assert run_to_completion(m.map_private(gfn + 1, 8)) == 0      # same 2M table: leaf only
    assert [c[0] for c in ops.calls] == ["set"]
    assert run_to_completion(m.map_private(gfn + 1, 8)) == 0      # spurious: no hook
    assert run_to_completion(m.map_private(gfn + 1, 9)) == -errno.EEXIST
    assert [c[0] for c in ops.calls] == ["set"]


def test_five_level_root():
    m, ops = mk(root=5)
    run_to_completion(m.map_private(3, 1))
    assert [c[2] for c in ops.calls] == [5, 4, 3, 2, 1]


def test_hook_failure_restores_and_frees():
    m, ops = mk({"link": -errno.EBUSY})
    assert run_to_completion(m.map_private(5, 7)) == -errno.EBUSY
    assert m.nonleaf == () and m.leaves == () and ops.freed == [101]
    m, ops = mk({"set": -errno.EIO})
    assert run_to_completion(m.map_private(5, 7)) == -errno.EIO
    assert m.leaves == () and len(m.nonleaf) == 3 and m.leaf(5) is None


def test_frozen_spte_gives_ebusy():
    m, ops = mk()
    m._leaves[5] = (7, SpteState.FROZEN)
    assert run_to_completion(m.map_private(5, 7)) == -errno.EBUSY
    m._nonleaf[(4, 0)] = (1, SpteState.FROZEN)
    assert run_to_completion(m.map_private(6, 7)) == -errno.EBUSY


def test_zap_clears_whatever_the_hook_says_and_free_is_deepest_first():
    m, ops = mk({"remove": -errno.EIO})
    for g in (1, 2):
        run_to_completion(m.map_private(g, 10 + g))
    ops.calls.clear()
    assert run_to_completion(m.zap_all_private_leaves()) == [-errno.EIO, 0]
    assert ops.calls == [("remove", 1, 1, 11, SpteState.FROZEN), ("remove", 2, 1, 12, SpteState.FROZEN)]
    assert m.leaves == ()
    assert run_to_completion(m.zap_private_leaf(1)) == 0             # non-present: nothing
    ops.calls.clear()
    m.free_all_spt()
    assert [c[2] for c in ops.calls] == [2, 3, 4] and m.nonleaf == ()
    assert not m.mmu_lock.holders()


def test_state_bytes_deterministic():
    a, _ = mk()
    b, _ = mk()
    for m in (a, b):
        run_to_completion(m.map_private(9, 3))
    assert a.state_bytes() == b.state_bytes()
    run_to_completion(b.zap_private_leaf(9))
    assert a.state_bytes() != b.state_bytes()
    assert a.gfn_of_pfn(3) == 9 and a.gfn_of_pfn(4) is None
