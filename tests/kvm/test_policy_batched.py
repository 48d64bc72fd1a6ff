"""The batched-TRACK zap policy (``kvm/policy_batched.py``), not upstream.

Anchors A24 calls batching TRACK an optimisation a policy may add: one TRACK + kick per zapped
range instead of 6.18's one per page, the same BUSY retry, and failures bugged and leaked exactly
as the per-page path does. The storm runs clean with invariants every step and different SEAMCALL counts.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE
from tdxcore.invariants import check_invariants
from tdxcore.kvm import Kvm, Policy, SpteState, helpers
from tdxcore.kvm.policy import POLICIES
from tdxcore.kvm.policy_batched import BATCHED_TRACK, BatchedTrackPolicy
from tdxcore.module.host import Host
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    OPERAND_ID_SEPT_TREE,
    OPERAND_ID_TD_EPOCH,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_INVALID,
    Leaf,
)
from tdxcore.storm import StormConfig, run_storm

N = 16
GPA = 4 << 30
B, T, R, W = (Leaf.TDH_MEM_RANGE_BLOCK, Leaf.TDH_MEM_TRACK, Leaf.TDH_MEM_PAGE_REMOVE,
              Leaf.TDH_PHYMEM_PAGE_WBINVD)
ZAP = (B, T, R, W)


def make_td(policy, n=N, terminate_vm=False):
    """Build a RUNNABLE 2-vCPU TD under ``policy`` with ``n`` private pages mapped."""
    host = Host(packages=1, cpus_per_package=2, memory=64 << 20, tdx_keyids=4, seed=7)
    kvm = Kvm(host, policy=policy, terminate_vm=terminate_vm)
    td = helpers.td_create(kvm, vcpus=2, memory=2 * n * PAGE_SIZE, gpa=GPA, initial_pages=n)
    assert len(td.vm.mmu.leaves) == n
    return host, td


def zap_leaves(host, n0):
    """Return the zap-path SEAMCALLs completed since event ``n0``, in order."""
    return [e[1][2] for e in host.events.filter(kind="seamcall_end") if e[0] >= n0 and e[1][2] in ZAP]


def kicks(host):
    """KVM_REQ_OUTSIDE_GUEST_MODE broadcasts so far."""
    return host.stats.as_dict().get("nr_kicks", 0)


def to_shared(td, n=N):
    """Convert the first ``n`` pages to shared in one KVM_SET_MEMORY_ATTRIBUTES (one zap range)."""
    td.vm.set_memory_attributes(GPA, n * PAGE_SIZE, 0)


def test_is_linux_618_but_for_the_zap_and_named_apart():
    """6.18's retry, bounds and allowlist; its own name; only it has ``zap_range``."""
    p = BATCHED_TRACK
    assert isinstance(p, BatchedTrackPolicy) and isinstance(p, type(Policy.LINUX_6_18))
    assert p.name == "BATCHED_TRACK" and p.upstream is False and p.name not in POLICIES
    assert p.bounds() == Policy.LINUX_6_18.bounds()
    assert p.busy_allowlist() == Policy.LINUX_6_18.busy_allowlist()
    assert not hasattr(Policy.LINUX_6_18, "zap_range") and not hasattr(Policy.SERIES_2023, "zap_range")


@pytest.mark.parametrize("policy", [Policy.LINUX_6_18, BATCHED_TRACK], ids=lambda p: p.name)
def test_one_range_n_tracks_versus_one(policy):
    """N pages to shared in one call: 6.18 tracks and kicks N times, the batch once."""
    host, td = make_td(policy)
    k0, n0 = kicks(host), len(host.events)
    to_shared(td)
    seq = zap_leaves(host, n0)
    if policy is BATCHED_TRACK:
        assert seq == [B] * N + [T] + [R, W] * N
        assert kicks(host) - k0 == 1 and td.vm.stats["nr_batched_tracks"] == 1
    else:
        assert seq == [B, T, R, W] * N
        assert kicks(host) - k0 == N
    assert Counter(seq) == {B: N, T: 1 if policy is BATCHED_TRACK else N, R: N, W: N}
    assert td.vm.mmu.leaves == () and not td.vm.is_bugged and td.vm.leaks == ()
    check_invariants(host)
    td.close()
    check_invariants(host)
    assert host.leaks == ()


def test_mirror_leaves_frozen_while_blocked_then_cleared():
    """Each mirror SPTE is frozen from its BLOCK until it is cleared after its WBINVD."""
    host, td = make_td(BATCHED_TRACK, n=4)
    vm = td.vm
    gfns = vm.mmu.leaves_in(GPA >> PAGE_SHIFT, (GPA >> PAGE_SHIFT) + 4)
    gen = BATCHED_TRACK.zap_range(vm, gfns)     # the test plays the caller holding mmu_lock write
    states = []
    try:
        while True:
            gen.send(None)
            states.append(tuple(vm.mmu.leaf(g)[1] if vm.mmu.leaf(g) else None for g in gfns))
    except StopIteration as e:
        assert e.value == []
    # all four frozen at once (the TRACK's window); each page goes PRESENT → FROZEN → cleared
    assert (SpteState.FROZEN,) * 4 in states
    for i in range(4):
        path = [s[i] for j, s in enumerate(states) if j == 0 or states[j - 1][i] != s[i]]
        idx = [{SpteState.PRESENT: 0, SpteState.FROZEN: 1, None: 2}[x] for x in path]
        assert idx == list(range(idx[0], idx[0] + len(idx))), path
    assert vm.mmu.leaves == () and all(vm.mmu.leaf(g) is None for g in gfns)
    assert vm.mmu.leaves == ()


def test_closed_mid_batch_leaves_nothing_frozen():
    """A zap generator closed mid-batch clears every SPTE it froze."""
    host, td = make_td(BATCHED_TRACK, n=4)
    vm = td.vm
    gen = BATCHED_TRACK.zap_range(vm, [g for g, _ in vm.mmu.leaves])
    for _ in range(3):
        gen.send(None)
    gen.close()
    assert all(vm.mmu.leaf(g) is None or vm.mmu.leaf(g)[1] == SpteState.PRESENT
               for g in range(GPA >> PAGE_SHIFT, (GPA >> PAGE_SHIFT) + 4))


def test_busy_block_retried_once_after_a_kick():
    """A BUSY BLOCK gets 6.18's one retry after a kick; the batch still tracks once."""
    host, td = make_td(BATCHED_TRACK)
    host.tdx.inject(B, TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE, count=1)
    k0, n0 = kicks(host), len(host.events)
    to_shared(td)
    assert zap_leaves(host, n0) == [B, B] + [B] * (N - 1) + [T] + [R, W] * N
    assert host.stats.as_dict()["nr_zap_busy_retries"] == 1 and kicks(host) - k0 == 2
    assert not td.vm.is_bugged and not td.vm.wait_for_sept_zap
    check_invariants(host)


def _fail_one(policy, leaf, status, count, k=5):
    """Convert N pages with one failure injected at page ``k``; return the VM's leaks."""
    host, td = make_td(policy)
    gpa = GPA + k * PAGE_SIZE
    host.tdx.inject(leaf, status, count=count, match=lambda call: call.rcx == gpa)
    to_shared(td)
    assert td.vm.is_bugged and td.vm.mmu.leaves == ()
    check_invariants(host)
    leaks = [(lk.what, lk.pfn, lk.reason) for lk in td.vm.leaks]
    td.close()
    check_invariants(host)
    return leaks


@pytest.mark.parametrize(("leaf", "status", "count"), [
    (B, TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE, 2),      # BUSY after the retry
    (B, TDX_OPERAND_INVALID | OPERAND_ID_RCX, 1),
    (R, TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE, 2),
    (R, TDX_OPERAND_INVALID | OPERAND_ID_RCX, 1),
], ids=["block-busy-twice", "block-error", "remove-busy-twice", "remove-error"])
def test_a_failed_page_is_bugged_and_leaked_as_per_page(leaf, status, count):
    """A BLOCK or REMOVE failure bugs the VM and leaks that page, as the per-page path."""
    batched = _fail_one(BATCHED_TRACK, leaf, status, count)
    per_page = _fail_one(Policy.LINUX_6_18, leaf, status, count)
    assert len(batched) == 1 and batched[0][0] == "private"
    assert batched == per_page


def test_failed_track_bugs_and_leaks_the_whole_batch():
    """A failed TRACK bugs the VM; every page of the batch fails REMOVE and is leaked."""
    host, td = make_td(BATCHED_TRACK, n=4)
    host.tdx.inject(T, TDX_OPERAND_BUSY | OPERAND_ID_TD_EPOCH, count=2)    # BUSY after the retry
    to_shared(td, 4)
    vm = td.vm
    assert vm.is_bugged and "TDH.MEM.TRACK" in vm.bug_reason and vm.mmu.leaves == ()
    priv = [lk for lk in vm.leaks if lk.what == "private"]
    assert len(priv) == 4 and all("TLB_TRACKING_NOT_DONE" in lk.reason for lk in priv)
    check_invariants(host)


def test_terminated_td_reclaims_page_by_page_without_track():
    """After KVM_TDX_TERMINATE_VM the page-by-page RECLAIM path runs (A24 path b)."""
    host, td = make_td(BATCHED_TRACK, terminate_vm=True)
    td.vm.terminate_vm()
    n0 = len(host.events)
    td.gmem.close()
    leaves = [e[1][2] for e in host.events.filter(kind="seamcall_end") if e[0] >= n0]
    assert leaves.count(Leaf.TDH_PHYMEM_PAGE_RECLAIM) == N and not set(leaves) & set(ZAP)
    td.close()
    assert host.leaks == ()


def _storm(monkeypatch, policy):
    """Run a small seeded storm under ``policy`` (registered for the test only)."""
    monkeypatch.setitem(POLICIES, BATCHED_TRACK.name, BATCHED_TRACK)   # test-only registration
    at_teardown = {}

    def snap(vm):
        """Record TRACKs so far and the private leaves left before teardown."""
        at_teardown["track"] = vm.kvm.host.stats.nr_seamcalls.get(int(T), 0)
        at_teardown["private"] = len(vm.mmu.leaves)

    rep = run_storm(StormConfig(vcpus=4, steps=800, seed=1, mix="convert", busy=0.05, policy=policy,
                                area_pages=64, check_every=1), before_teardown=snap)
    return rep, at_teardown


def test_storm_clean_with_invariants_every_step_and_counts_differ(monkeypatch):
    """Both storms clean with invariants every step; TRACK counts differ."""
    base, base_td = _storm(monkeypatch, "LINUX_6_18")
    bat, bat_td = _storm(monkeypatch, "BATCHED_TRACK")
    for rep in (base, bat):
        assert rep.clean, (rep.violation, rep.leaks)
        assert rep.invariants_checked >= rep.steps + rep.drain_steps
    assert bat.vm_counters.get("nr_batched_tracks", 0) > 0
    assert bat.seamcalls != base.seamcalls
    # teardown closes the guest_memfd: 6.18 tracks once per private page still mapped, the
    # batched policy once for the one bound range (+1 if an injected BUSY made it retry)
    assert base_td["private"] > 8 and bat_td["private"] > 8
    assert base.seamcalls["TDH_MEM_TRACK"] - base_td["track"] >= base_td["private"]
    assert 1 <= bat.seamcalls["TDH_MEM_TRACK"] - bat_td["track"] <= 2
    assert bat.seamcalls["TDH_MEM_TRACK"] < base.seamcalls["TDH_MEM_TRACK"]
