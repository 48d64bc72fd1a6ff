"""Random host leaves — valid and invalid, overlapping through begin/complete/abort across several
actors — against up to three TDs on one Host that are built, run and torn down, with
``check_invariants`` after every step: zero violations (issue 4, Tests; SPEC §3.5, §5, §6).

The machine only drives the public module API; it never predicts a status (the model's own
tests do that): its oracle is the invariant checker. Actors are shared between TDs on purpose
(``kvm`` issues leaves on every TD) so the event-log pairing meets overlapping same-actor ops.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as hs
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import tdxcore as tdx
from tdxcore.constants import EXIT_REASON_EPT_VIOLATION, PAGE_SHIFT
from tdxcore.errors import HostError
from tdxcore.module.td import BuildError, TdLifecycle, TdParams, add_sept_path, build_td
from tdxcore.status import Leaf, OpState  # type: ignore[attr-defined]
from tests.scenarios import GPA, new_host

#: GPAs the machine uses: 4 pages in one 2 MiB region, and one page in the next region.
GPAS = [GPA + (i << PAGE_SHIFT) for i in range(4)] + [GPA + (1 << 21)]
ACTORS = ["kvm", "host0", "host1"]

#: How an operand is spoiled (0 = valid).
BAD = hs.sampled_from([0] * 8 + [1, 2, 3, 4])


class Td:
    """What the machine knows of one TD it built (frames for RECLAIM, pages it added)."""

    def __init__(self, b, levels_done):
        self.b = b
        self.frames = [b.tdr] + b.tdcs + b.vcpus + [p for v in b.vcpus for p in b.tdcx[v]]
        self.pages = []           # frames handed to SEPT.ADD / PAGE.ADD / AUG
        self.freed_hkid = False


class LeafMachine(RuleBasedStateMachine):
    """Leaves from three actors (+ each TD's vCPUs and guest) on ≤ 3 TDs; see the module docstring."""

    def __init__(self):
        super().__init__()
        self.h = new_host()
        self.t = self.h.tdx
        self.tds = []
        self.ops = []
        self.counts = {"steps": 0, "ok": 0, "busy": 0, "failed": 0, "inflight": 0}

    # ------------------------------------------------------------------ helpers
    def _note(self, op):
        self.counts["steps"] += 1
        if op.acquired:
            self.ops.append(op)
            self.counts["inflight"] += 1
            return
        s = op.result.status
        key = "ok" if not s.is_error else "busy" if s.base == tdx.status.TDX_OPERAND_BUSY else "failed"
        self.counts[key] += 1

    def _spoil(self, gpa, level, bad):
        """Return (rcx, level) spoiled per ``bad``: reserved bits, a level beyond the leaf, shared GPA."""
        if bad == 1:
            return gpa | 0x800 | level, level
        if bad == 2:
            return gpa | 3, 3
        if bad == 3:
            return gpa | (1 << 47) | level, level
        return gpa | level, level

    def _tdr(self, td, bad):
        return (td.b.tdcs[0] if bad == 4 else td.b.tdr) << PAGE_SHIFT

    def _live(self, i):
        return self.tds[i % len(self.tds)] if self.tds else None

    def _mapped(self, td, g):
        """Return a GPA ``td`` maps at level 0 if it has one (picked by ``g``), else ``g``."""
        m = self.t.tds.get(td.b.tdr)
        if m is None or m.sept is None or m.lifecycle == TdLifecycle.TEARDOWN:
            return g
        gpas = [x for x, _ in m.sept.entries(0)]
        return gpas[(g >> PAGE_SHIFT) % len(gpas)] if gpas else g

    def _building(self, i):
        """Prefer a TD still before MR.FINALIZE (PAGE.ADD / MR.EXTEND are legal there)."""
        for td in self.tds[i % len(self.tds):] + self.tds:
            m = self.t.tds.get(td.b.tdr)
            if m is not None and m.op_state == OpState.INITIALIZED:
                return td
        return self._live(i)

    # ------------------------------------------------------------------ build
    def _build(self, vcpus, finalize, actor):
        try:
            b = build_td(self.h, vcpus=vcpus, params=TdParams(max_vcpus=vcpus), finalize=finalize,
                         actor=actor)
        except (HostError, BuildError):     # no HKID left / a package without an online CPU
            return
        td = Td(b, 0)
        self.tds.append(td)
        for g in (GPAS[0], GPAS[-1]):
            try:
                td.pages += add_sept_path(self.h, b.tdr, g, 1, actor=actor)
            except BuildError:              # BUSY against an op in flight: the path stays partial
                pass

    @initialize()
    def two_tds(self):
        """A running TD (2 vCPUs) and one still being built (before MR.FINALIZE)."""
        self._build(2, True, "kvm")
        self._build(1, False, "kvm")

    @precondition(lambda self: len(self.tds) < 3)
    @rule(vcpus=hs.integers(1, 2), finalize=hs.booleans(), actor=hs.sampled_from(ACTORS))
    def build(self, vcpus, finalize, actor):
        self._build(vcpus, finalize, actor)

    # ------------------------------------------------------------------ S-EPT and measurement
    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2), g=hs.sampled_from(GPAS), level=hs.integers(1, 3), bad=BAD,
          actor=hs.sampled_from(ACTORS))
    def sept_add(self, i, g, level, bad, actor):
        td = self._live(i)
        page = self.h.alloc_frame() if bad != 4 else td.b.tdr
        td.pages.append(page)
        aligned = g & ~((1 << (PAGE_SHIFT + 9 * level)) - 1)
        rcx, _ = self._spoil(aligned, level, bad)
        self._note(self.t.begin(Leaf.TDH_MEM_SEPT_ADD, rcx, td.b.tdr << PAGE_SHIFT, page << PAGE_SHIFT,
                                actor=actor))

    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2), g=hs.sampled_from(GPAS), bad=BAD, actor=hs.sampled_from(ACTORS),
          extend=hs.booleans())
    def page_add(self, i, g, bad, actor, extend):
        td = self._building(i)
        if extend:
            g = self._mapped(td, g)
            self._note(self.t.begin(Leaf.TDH_MR_EXTEND, g + (0x100 if bad == 1 else 0), self._tdr(td, bad),
                                    actor=actor))
            return
        page = self.h.alloc_frame()
        td.pages.append(page)
        rcx, _ = self._spoil(g, 0, bad)
        self._note(self.t.begin(Leaf.TDH_MEM_PAGE_ADD, rcx, self._tdr(td, bad), page << PAGE_SHIFT,
                                td.b.tdcs[0] << PAGE_SHIFT, actor=actor))

    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2), actor=hs.sampled_from(ACTORS))
    def finalize(self, i, actor):
        td = self._live(i)
        self._note(self.t.begin(Leaf.TDH_MR_FINALIZE, td.b.tdr << PAGE_SHIFT, actor=actor))

    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2), g=hs.sampled_from(GPAS), bad=BAD, actor=hs.sampled_from(ACTORS),
          reuse=hs.integers(0, 8))
    def aug(self, i, g, bad, actor, reuse):
        td = self._live(i)
        if reuse == 0 and td.pages and self.h.frames.is_allocated(td.pages[-1]):
            page = td.pages[-1]                           # a page this machine already handed out
        else:
            page = self.h.alloc_frame()
            td.pages.append(page)
        rcx, _ = self._spoil(g, 0, bad)
        self._note(self.t.begin(Leaf.TDH_MEM_PAGE_AUG, rcx, self._tdr(td, bad), page << PAGE_SHIFT,
                                actor=actor))

    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2), g=hs.sampled_from(GPAS), level=hs.sampled_from([0, 0, 0, 1]), bad=BAD,
          actor=hs.sampled_from(ACTORS),
          leaf=hs.sampled_from([Leaf.TDH_MEM_RANGE_BLOCK, Leaf.TDH_MEM_RANGE_UNBLOCK,
                                Leaf.TDH_MEM_PAGE_REMOVE, Leaf.TDH_MEM_SEPT_REMOVE,
                                Leaf.TDH_MEM_PAGE_REMOVE, Leaf.TDH_MEM_RANGE_BLOCK]))
    def zap_leaf(self, i, g, level, bad, actor, leaf):
        td = self._live(i)
        if leaf == Leaf.TDH_MEM_SEPT_REMOVE:
            level = max(level, 1)
        elif level == 0 and bad != 2:
            g = self._mapped(td, g)
        aligned = g & ~((1 << (PAGE_SHIFT + 9 * level)) - 1)
        rcx, _ = self._spoil(aligned, level, bad)
        self._note(self.t.begin(leaf, rcx, self._tdr(td, bad), actor=actor))

    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2), actor=hs.sampled_from(ACTORS), bad=BAD)
    def track(self, i, actor, bad):
        td = self._live(i)
        self._note(self.t.begin(Leaf.TDH_MEM_TRACK, self._tdr(td, bad), actor=actor))

    # ------------------------------------------------------------------ vCPUs and the guest
    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2), v=hs.integers(0, 1), cpu=hs.integers(0, 3))
    def vp_enter(self, i, v, cpu):
        td = self._live(i)
        tdvpr = td.b.vcpus[v % len(td.b.vcpus)]
        if not self.h.is_cpu_online(cpu):
            return
        op = self.t.vp_enter(tdvpr, cpu=cpu, actor=f"vcpu{tdvpr:x}")
        self._note(op)
        if op.acquired:
            op.enter()

    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2), g=hs.sampled_from(GPAS), bad=hs.sampled_from([0, 0, 0, 1]))
    def guest_accept(self, i, g, bad):
        td = self._live(i)
        g = self._mapped(td, g)
        m = self.t.tds.get(td.b.tdr)
        if (m is None or m.lifecycle != TdLifecycle.KEYS_CONFIGURED or m.op_state != OpState.RUNNABLE
                or td.b.vcpus[0] not in m.vcpus):
            return                                          # no guest runs: no TDCALL
        self._note(self.t.begin_accept(td.b.vcpus[0], g, 3 if bad else 0, actor=f"guest{td.b.tdr:x}"))

    @precondition(lambda self: self.ops)
    @rule(k=hs.integers(0, 7), abort=hs.booleans(), g=hs.sampled_from(GPAS))
    def finish(self, k, abort, g):
        op = self.ops.pop(k % len(self.ops))
        if op.in_guest:
            op.exit(EXIT_REASON_EPT_VIOLATION if abort else 12, gpa=g, rip=0x1000)
        elif abort:
            op.abort()
        else:
            op.complete()
        assert not op.acquired

    # ------------------------------------------------------------------ teardown
    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2), which=hs.integers(0, 4), cpu=hs.integers(0, 3), k=hs.integers(0, 40),
          actor=hs.sampled_from(ACTORS))
    def teardown_leaf(self, i, which, cpu, k, actor):
        td = self._live(i)
        t, b = self.t, td.b
        if not self.h.is_cpu_online(cpu):
            return
        if which == 0:
            op = t.begin(Leaf.TDH_VP_FLUSH, b.vcpus[k % len(b.vcpus)] << PAGE_SHIFT, cpu=cpu, actor=actor)
        elif which == 1:
            op = t.begin(Leaf.TDH_MNG_VPFLUSHDONE, b.tdr << PAGE_SHIFT, cpu=cpu, actor=actor)
        elif which == 2:
            op = t.begin(Leaf.TDH_PHYMEM_CACHE_WB, k & 1, cpu=cpu, actor=actor)
        elif which == 3:
            op = t.begin(Leaf.TDH_MNG_KEY_FREEID, b.tdr << PAGE_SHIFT, cpu=cpu, actor=actor)
        else:
            frames = td.frames + td.pages
            p = frames[k % len(frames)]
            op = t.begin(Leaf.TDH_PHYMEM_PAGE_RECLAIM, p << PAGE_SHIFT, cpu=cpu, actor=actor)
        self._note(op)
        if op.acquired and which in (3, 4) and k & 2:
            op.complete()                                   # and do what the kernel does next
            self.ops.remove(op)
            if op.result.status == 0 and which == 3 and not td.freed_hkid:
                self.h.keyids.free(b.hkid)
                td.freed_hkid = True
            if op.result.status == 0 and which == 4:
                t.tdh_phymem_page_wbinvd(p, self.h.keyids.global_keyid if p == b.tdr else b.hkid)
                self.h.free_frame(p)                        # back to the allocator: may serve another TD

    # ------------------------------------------------------------------ KVM-like sequences (one step)
    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2), g=hs.sampled_from(GPAS))
    def kvm_fault(self, i, g):
        """AUG a fresh page, then the guest ACCEPTs it (each may fail: BUSY, state)."""
        td = self._live(i)
        page = self.h.alloc_frame()
        td.pages.append(page)
        self._note(self.t.begin(Leaf.TDH_MEM_PAGE_AUG, g, td.b.tdr << PAGE_SHIFT, page << PAGE_SHIFT,
                                actor="kvm"))
        if self.ops and self.ops[-1].leaf == Leaf.TDH_MEM_PAGE_AUG and self.ops[-1].actor == "kvm":
            self.ops.pop().complete()
        self.guest_accept(i, g, 0)
        if self.ops and self.ops[-1].leaf_space == "tdcall":
            self.ops.pop().complete()

    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2), g=hs.sampled_from(GPAS), undo=hs.sampled_from([False, False, True]))
    def kvm_zap(self, i, g, undo):
        """BLOCK, TRACK, then REMOVE (or UNBLOCK) one page, synchronously (stops at a failure)."""
        td = self._live(i)
        t, tdr = self.t, td.b.tdr
        g = self._mapped(td, g)
        last = t.tdh_mem_range_unblock if undo else t.tdh_mem_page_remove
        for call in (lambda: t.tdh_mem_range_block(tdr, g, 0, actor="kvm"),
                     lambda: t.tdh_mem_track(tdr, actor="kvm"),
                     lambda: last(tdr, g, 0, actor="kvm")):
            if call().status != 0:
                return

    @precondition(lambda self: self.tds)
    @rule(i=hs.integers(0, 2))
    def kvm_teardown(self, i):
        """VP.FLUSH, VPFLUSHDONE, CACHE.WB per package, KEY.FREEID, then RECLAIM every page, TDR last."""
        td = self._live(i)
        t, b, h = self.t, td.b, self.h
        m = t.tds.get(b.tdr)
        if m is None or m.hkid != b.hkid:
            return
        if m.lifecycle in (TdLifecycle.HKID_ASSIGNED, TdLifecycle.KEYS_CONFIGURED):
            for v in b.vcpus:
                vc = m.vcpus.get(v)
                if vc is not None and vc.associated_cpu is not None and h.is_cpu_online(vc.associated_cpu):
                    t.tdh_vp_flush(v, cpu=vc.associated_cpu, actor="kvm")
            if t.tdh_mng_vpflushdone(b.tdr, actor="kvm").status != 0:
                return
        if m.lifecycle == TdLifecycle.BLOCKED:
            for pkg in range(h.nr_packages):
                try:
                    cpu = h.first_online_cpu(pkg)
                except HostError:
                    return
                t.tdh_phymem_cache_wb(cpu=cpu, actor="kvm")
            if t.tdh_mng_key_freeid(b.tdr, actor="kvm").status != 0:
                return
            if not td.freed_hkid:
                h.keyids.free(b.hkid)
                td.freed_hkid = True
        for p in td.pages[::-1] + td.frames[:0:-1] + [b.tdr]:
            r = t.tdh_phymem_page_reclaim(p, actor="kvm")
            if r.status == 0:
                h.free_frame(p)

    @rule(cpu=hs.integers(1, 3), online=hs.booleans())
    def hotplug(self, cpu, online):
        try:
            if online:
                self.h.cpu_online(cpu)
            else:
                self.h.cpu_offline(cpu)
        except HostError:
            pass                                            # refused: last CPU of a package in use

    # ------------------------------------------------------------------ the oracle
    @invariant()
    def invariants_hold(self):
        tdx.check_invariants(self.h)

    def teardown(self):
        while self.ops:                                     # drain: still clean afterwards
            op = self.ops.pop()
            if op.in_guest:
                op.exit(12)
            else:
                op.complete()
        tdx.check_invariants(self.h)


TestLeafMachine = LeafMachine.TestCase
TestLeafMachine.settings = settings(max_examples=500, stateful_step_count=20, deadline=None)


class BatchCheckMachine(LeafMachine):
    """The same leaves, checked only once at the end: the checker folds the whole event log in one
    batch (as a storm checking every N steps does), so same-actor ops that ended between two
    checks must still pair correctly."""

    def invariants_hold(self):  # no @invariant: not checked per step
        pass


TestBatchCheckMachine = BatchCheckMachine.TestCase
TestBatchCheckMachine.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)


@pytest.mark.slow
class TestLeafMachineSlow(LeafMachine.TestCase):
    """More and longer runs (``pytest -m slow``)."""

    settings = settings(max_examples=2000, stateful_step_count=50, deadline=None)
