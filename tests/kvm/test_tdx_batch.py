"""Batch map and batch terminate-first reclaim (kvm/tdx_batch.py, module/batch.py) vs the per-page paths.

The contract: a batch leaves exactly the model state the per-page path leaves — PAMT, frame
allocator, frame contents, module (TDs, S-EPT), KeyIDs, the mirror and the guest_memfd — only
the event log and the counters differ (one summary event per batch). Seeded small TDs (64–4096
pages), invariants checked after each phase. The 64 GiB run is ``slow`` (opt-in).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxcore import guest
from tdxcore.constants import FallocFlag, PageType
from tdxcore.errors import KvmError, TdxTypeError, TdxValueError
from tdxcore.invariants import check_invariants
from tdxcore.kvm import Kvm, tdx_batch
from tdxcore.kvm.helpers import td_create, vcpu_run_until_hlt
from tdxcore.module import batch as mbatch
from tdxcore.module.host import Host
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_RCX,
    OPERAND_ID_TD_EPOCH,
    TDX_LIFECYCLE_STATE_INCORRECT,
    TDX_OPERAND_BUSY,
    TDX_PAGE_METADATA_INCORRECT,
    TDX_SUCCESS,
    Leaf,
)

GPA = 4 << 30


def _td(n, seed, *, initial=1, terminate=True, erratum=False):
    host = Host(packages=2, cpus_per_package=2, memory=(n << 12) + (32 << 20), seed=seed,
                **({"cpu_erratum_pw_mce": True} if erratum else {}))
    kvm = Kvm(host, terminate_vm=terminate)
    td = td_create(kvm, vcpus=1, memory=n << 12, initial_pages=initial, measure=False)
    return host, td


def _model(host, td):
    """Everything but the event log, the counters and the leak records' event indices."""
    out = [host.pamt.state_hash(), host.frames.state_bytes(), host._contents.digest(),
           host.tdx.state_bytes(), host.keyids.state_bytes(), host.free_frames,
           tuple((lk.pfn, lk.page_type, lk.what, lk.reason) for lk in host.leaks)]
    vm = td.vm
    if not vm.is_destroyed:
        out += [vm.mmu.state_bytes(), vm.td_state, tuple(vm.mmu.nonleaf)]
    if not td.gmem.is_closed:
        out.append(td.gmem.state_bytes())
    return out


def _teardown(td, terminate=True):
    if terminate:
        td.vm.terminate_vm()
    td.close()


def _ranges(n, rng):
    """Return a few seeded sub-ranges (page offsets) of a TD of n pages; page 0 holds the image."""
    cuts = sorted(rng.sample(range(1, n), k=min(3, n - 2)))
    return [(a, b) for a, b in zip([1] + cuts, cuts + [n], strict=True) if b > a]


@pytest.mark.parametrize("n,seed", [(64, 1), (600, 2), (1024, 3), (4096, 4)])
@pytest.mark.parametrize("accept", [True, False])
def test_batch_map_and_terminate_reclaim_match_per_page(n, seed, accept):
    """Seeded sub-ranges mapped in batch / per page, then torn down terminate-first: same states."""
    rng = random.Random(seed)
    parts = _ranges(n, rng)
    if n >= 4096:
        parts = parts[:2]           # keep the default run short: the per-page path is slow
    ends = {}
    for batch in (False, True):
        host, td = _td(n, seed)
        mapper = tdx_batch.map_private_range if batch else tdx_batch.map_private_range_per_page
        tdx_batch.set_batch_reclaim(td.vm, batch)
        for a, b in parts:
            mapper(td.vm, GPA + (a << 12), (b - a) << 12, accept=accept)
        if not batch:
            assert not getattr(td.vm, "_batch_reclaim", False)
        check_invariants(host)
        mapped = _model(host, td)
        _teardown(td)
        check_invariants(host)
        ends[batch] = (mapped, _model(host, td), host.leaks, host.free_frames)
    assert ends[True][0] == ends[False][0]
    assert ends[True][1] == ends[False][1]
    assert ends[True][2] == () and ends[False][2] == ()


@settings(max_examples=12)
@given(ranges=st.lists(st.tuples(st.integers(1, 199), st.integers(1, 64), st.booleans()), min_size=1,
                       max_size=4),
       punch=st.one_of(st.none(), st.tuples(st.integers(1, 199), st.integers(1, 32))),
       seed=st.integers(0, 3), terminate=st.booleans())
def test_batch_vs_per_page_random_ranges(ranges, punch, seed, terminate):
    """Hypothesis: random (overlapping) ranges, accept flags, a punch, either teardown: same ends."""
    ends = []
    for batch in (False, True):
        host, td = _td(200, seed, terminate=terminate)
        tdx_batch.set_batch_reclaim(td.vm, batch)
        mapper = tdx_batch.map_private_range if batch else tdx_batch.map_private_range_per_page
        for a, n, acc in ranges:
            b = min(200, a + n)
            mapper(td.vm, GPA + (a << 12), (b - a) << 12, accept=acc)
        if punch is not None:
            a, b = punch[0], min(200, punch[0] + punch[1])
            td.vm.set_memory_attributes(GPA + (a << 12), (b - a) << 12, 0)
            td.gmem.fallocate(FallocFlag.PUNCH_HOLE | FallocFlag.KEEP_SIZE, a << 12, (b - a) << 12)
        check_invariants(host)
        ends.append(_model(host, td))
        _teardown(td, terminate)
        check_invariants(host)
        ends.append(_model(host, td))
        assert host.leaks == ()
    assert ends[0] == ends[2] and ends[1] == ends[3]


def test_batch_map_then_dynamic_teardown_matches_per_page():
    """A bulk-mapped TD torn down the 6.18 way (BLOCK/TRACK/REMOVE per page) ends as per-page does."""
    ends = []
    for batch in (False, True):
        host, td = _td(300, 9, terminate=False)
        (tdx_batch.map_private_range if batch else tdx_batch.map_private_range_per_page)(
            td.vm, GPA + 4096, 299 << 12)
        _teardown(td, terminate=False)
        check_invariants(host)
        ends.append(_model(host, td))
    assert ends[0] == ends[1]


def test_partial_punch_of_bulk_pages_and_remap():
    """Punching a hole in bulk-backed pages frees exactly those frames; remapping restores the rest."""
    ends = []
    for batch in (False, True):
        host, td = _td(512, 5)
        m = tdx_batch.map_private_range if batch else tdx_batch.map_private_range_per_page
        m(td.vm, GPA + 4096, 511 << 12)
        td.vm.set_memory_attributes(GPA + (100 << 12), 50 << 12, 0)      # to shared: zaps them
        td.gmem.fallocate(FallocFlag.PUNCH_HOLE | FallocFlag.KEEP_SIZE, 100 << 12, 50 << 12)
        if batch:                       # only the converted pages left their runs
            assert td.vm.mmu.bulk_runs() and td.gmem.bulk_runs()
        check_invariants(host)
        ends.append(_model(host, td))
        _teardown(td)
        ends.append(_model(host, td))
    assert ends[0] == ends[2] and ends[1] == ends[3]


def test_per_page_map_with_batch_reclaim_matches():
    """Batch reclaim of a TD mapped page by page (dict leaves, not runs) ends as per-page reclaim."""
    ends = []
    for batch in (False, True):
        host, td = _td(200, 15)
        tdx_batch.map_private_range_per_page(td.vm, GPA + 4096, 199 << 12)
        tdx_batch.set_batch_reclaim(td.vm, batch)
        _teardown(td)
        check_invariants(host)
        ends.append(_model(host, td))
    assert ends[0] == ends[1]


def test_guest_runs_on_bulk_mapped_pages_like_per_page():
    """A vCPU accepting and writing PENDING bulk pages, and faulting in unmapped ones, ends as per page.

    Pages [1, 128) are mapped up front; 200 and 255 go through the fault path (AUG per page)
    while the bulk runs stay runs.
    """
    ends = []
    for batch in (False, True):
        host, td = _td(256, 16)
        (tdx_batch.map_private_range if batch else tdx_batch.map_private_range_per_page)(
            td.vm, GPA + 4096, 127 << 12, accept=False)
        ops = []
        for k in (3, 200, 255):
            ops += [guest.accept(GPA + (k << 12)), guest.write(GPA + (k << 12), 0x5A + k)]
        vcpu_run_until_hlt(td.vcpus[0], ops + [guest.hlt()])
        if batch:
            assert td.vm.mmu.bulk_runs()                # the fault path did not expand the runs
        check_invariants(host)
        ends.append(_model(host, td)[:4])               # vCPU state is in the module bytes too
        _teardown(td)
        ends.append(_model(host, td))
    assert ends[0] == ends[2] and ends[1] == ends[3]


def test_erratum_host_clears_reclaimed_frames():
    """On an erratum host both paths clear the reclaimed frames alike."""
    ends = []
    for batch in (False, True):
        host, td = _td(128, 6, erratum=True)
        (tdx_batch.map_private_range if batch else tdx_batch.map_private_range_per_page)(
            td.vm, GPA + 4096, 127 << 12)
        _teardown(td)
        ends.append(_model(host, td))
    assert ends[0] == ends[1]


def test_batch_reclaim_failure_is_a_leak_with_the_per_page_reason():
    """A frame whose PAMT entry is locked fails RECLAIM with BUSY|RCX: leaked, as the per-page path."""
    host, td = _td(64, 7)
    tdx_batch.map_private_range(td.vm, GPA + 4096, 63 << 12)
    pfn = td.vm.mmu.leaf((GPA >> 12) + 5)[0]
    td.vm.terminate_vm()
    assert host.pamt.try_lock(pfn, True, 0) == TDX_SUCCESS
    for v in td.vcpus:
        v.close()
    td.gmem.close()
    host.pamt.unlock(pfn, True)
    leaks = [lk for lk in td.vm.leaks if lk.what == "private"]
    assert [lk.pfn for lk in leaks] == [pfn]
    assert leaks[0].reason == "TDH.PHYMEM.PAGE.RECLAIM: TDX_OPERAND_BUSY|RCX"
    td.vm.close()
    assert not host.frames.is_allocated(pfn + 1) and host.frames.is_allocated(pfn)


def test_one_summary_event_per_batch():
    """The event log holds one event per batch, the counters one SEAMCALL per page."""
    host, td = _td(2048, 8)
    e0 = len(host.events)
    tdx_batch.map_private_range(td.vm, GPA + 4096, 2047 << 12, accept=False)
    kinds = [e[0] for e in list(host.events)[e0:]]
    assert kinds.count("seamcall_batch") == 2 and "seamcall_begin" not in kinds
    assert host.stats.nr_seamcalls[Leaf.TDH_MEM_PAGE_AUG] == 2047
    td.vm.terminate_vm()
    e1 = len(host.events)
    for v in td.vcpus:
        v.close()
    td.gmem.close()
    ev = [e for e in list(host.events)[e1:] if e[0] == "seamcall_batch"]
    assert len(ev) == 1 and ev[0][2] == Leaf.TDH_PHYMEM_PAGE_RECLAIM and ev[0][3] == ev[0][4] == 2048
    assert not [e for e in list(host.events)[e1:] if e[0] == "seamcall_begin"
                and e[2] == Leaf.TDH_PHYMEM_PAGE_RECLAIM]
    td.vm.close()
    assert host.leaks == ()


def test_injection_falls_back_to_the_per_page_path():
    """With an injection armed the batch map takes the per-page leaves."""
    host, td = _td(64, 10)
    host.tdx.inject(Leaf.TDH_MEM_TRACK, TDX_OPERAND_BUSY | OPERAND_ID_TD_EPOCH, count=1)
    e0 = len(host.events)
    tdx_batch.map_private_range(td.vm, GPA + 4096, 63 << 12)
    kinds = [e[0] for e in list(host.events)[e0:]]
    assert "seamcall_batch" not in kinds and "seamcall_begin" in kinds


@pytest.mark.parametrize("gpa,size,exc", [(GPA + 1, 4096, TdxValueError), (GPA, 0, TdxValueError),
                                          ("x", 4096, TdxTypeError)])
def test_bad_arguments_raise_before_any_change(gpa, size, exc):
    """Python misuse raises before any state change (SPEC §7)."""
    host, td = _td(64, 11)
    h0 = _model(host, td)
    with pytest.raises(exc):
        tdx_batch.map_private_range(td.vm, gpa, size)
    assert _model(host, td) == h0


def test_kernel_level_errors():
    """Kernel-level bad input gets the errno, with no state change."""
    host, td = _td(64, 12)
    h0 = _model(host, td)
    with pytest.raises(KvmError) as e:                      # past the memslot
        tdx_batch.map_private_range(td.vm, GPA, 65 << 12)
    assert e.value.errno == 22
    td.vm.set_memory_attributes(GPA + (8 << 12), 4096, 0)
    h0 = _model(host, td)
    with pytest.raises(KvmError) as e:                      # not all PRIVATE
        tdx_batch.map_private_range(td.vm, GPA, 64 << 12)
    assert e.value.errno == 22 and _model(host, td) == h0


def test_module_batch_checks():
    """Module batch: the TD-level check once, per-element statuses after it."""
    host, td = _td(64, 13)
    tdx, tdr = host.tdx, td.vm.tdr
    r = mbatch.page_reclaim_batch(tdx, tdr, np.array([1], dtype=np.uint64))
    assert r.status == TDX_LIFECYCLE_STATE_INCORRECT and r.statuses.size == 0
    tdx_batch.map_private_range(td.vm, GPA + 4096, 4096)
    pfn = td.vm.mmu.leaf((GPA >> 12) + 1)[0]
    td.vm.terminate_vm()
    r = mbatch.page_reclaim_batch(tdx, tdr, np.array([pfn, pfn, tdr], dtype=np.uint64))
    assert r.status == TDX_SUCCESS
    assert r.statuses.tolist() == [TDX_SUCCESS, TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX,
                                   TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX]
    assert host.pamt.page_type(pfn) == PageType.PT_NDA


def test_frame_allocator_runs_match_single_frees():
    """free_range/alloc_runs give the frames, order and state bytes of per-frame free/alloc."""
    rng = random.Random(14)
    a, b = Host(memory=16 << 20, seed=0).frames, Host(memory=16 << 20, seed=0).frames
    got = [a.alloc() for _ in range(600)]
    assert [p for p, k in b.alloc_runs(600) for p in range(p, p + k)] == got
    for lo, n in [(got[300], 50), (got[100], 3), (got[351], 100), (got[-1], 1), (got[350], 1)]:
        for p in range(lo, lo + n):
            a.free(p)
        b.free_range(lo, n)
        assert a.state_bytes() == b.state_bytes() and a.nr_free == b.nr_free
    with pytest.raises(TdxValueError):
        b.free_range(got[310], 5)                           # double free
    k = rng.randrange(1, 200)
    assert [a.alloc() for _ in range(k)] == [p for p, c in b.alloc_runs(k) for p in range(p, p + c)]
    assert a.state_bytes() == b.state_bytes()


@pytest.mark.slow
def test_64gib_td_terminate_first_batch():
    """16 M private pages mapped (PENDING) and torn down on the terminate-first path, no leak."""
    n = 1 << 24
    host = Host(packages=2, cpus_per_package=2, memory=(n << 12) + (n << 12) // 256 + (256 << 20), seed=0)
    kvm = Kvm(host, terminate_vm=True)
    host.tdx.enable()
    free0 = host.free_frames
    td = td_create(kvm, vcpus=2, memory=n << 12, initial_pages=0, measure=False)
    tdx_batch.map_private_range(td.vm, GPA, n << 12, accept=False)
    assert td.vm.mmu.nr_leaves == n and host.pamt.nr_assigned(PageType.PT_REG) == n
    _teardown(td)
    assert host.leaks == () and host.free_frames == free0 and host.pamt.nr_assigned(PageType.PT_REG) == 0
