"""A short, seeded tour of the five cores: the main job until the storm lands.

It converts a 2 MiB private region to shared the way KVM does (attribute store, mmu_invalidate
window, S-EPT zap per 4K page: BLOCK → TRACK → REMOVE) and runs an S-EPT map/unmap cycle
(AUG → ACCEPT → BLOCK → TRACK → REMOVE) through the core batch API, then reports what it did
and how fast. Everything here drives the Cython cores directly; the KVM and module layers that
sequence them for real arrive with later issues.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from tdxcore._busylock import BusyLock
from tdxcore._invalidate import InvalidateTracker
from tdxcore._pamt import Pamt
from tdxcore._sept import SeptTree
from tdxcore._xarray import AttributeStore
from tdxcore.constants import PAMT_NO_OWNER, MemAttr, PageType
from tdxcore.errors import InvariantViolation
from tdxcore.status import OPERAND_ID_SEPT_TREE, TDX_SUCCESS, TdxStatus  # type: ignore[attr-defined]

GPA_BASE = 4 << 30  # the selftests' private region starts at 4 GiB
NR_2M = 512
#: The invariant id the demo's own sanity checks raise under.
_DEMO = "DEMO"


@dataclass
class DemoReport:
    """What the demo did: named figures (counts and rates) in print order."""

    figures: List[Tuple[str, str]] = field(default_factory=list)
    statuses: Dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: str) -> None:
        """Append one figure."""
        self.figures.append((name, value))


def _check_all(what: str, statuses: np.ndarray, expected: int = TDX_SUCCESS) -> None:
    bad = np.flatnonzero(statuses != expected)
    if bad.size:
        msg = f"{what}: {bad.size} pages returned {TdxStatus(int(statuses[bad[0]]))}"
        raise InvariantViolation(_DEMO, msg)


def run_demo(seed: int = 0, nr_pages: int = 1 << 16) -> DemoReport:
    """Run the demo and return its report.

    Parameters
    ----------
    seed : int
        Seeds the page-frame shuffle (which host frames back which GPAs).
    nr_pages : int
        4K pages in the S-EPT map/unmap cycle (default 2^16 = 256 MiB of guest memory).

    Returns
    -------
    DemoReport
        The figures the command line prints.

    Raises
    ------
    InvariantViolation
        A core returned an unexpected status (never, unless the model is broken).
    """
    rep = DemoReport()
    rng = np.random.default_rng(seed)
    nr_frames = 1 << 22
    pamt = Pamt(nr_frames)
    tdr = 1
    pamt.assign(tdr, PageType.PT_TDR, PAMT_NO_OWNER, 1)
    tree = SeptTree(levels=4, pamt=pamt, tdr=tdr)
    attrs = AttributeStore("ranges")
    inval = InvalidateTracker()
    sept_lock = BusyLock(OPERAND_ID_SEPT_TREE)

    # -- the private region: tables, then AUG + ACCEPT for one 2 MiB block ------------------
    gfn0 = GPA_BASE >> 12
    table_frames = np.arange(16, 16 + nr_pages // 512 + 16, dtype=np.uint64)
    used = tree.sept_add_range(gfn0, gfn0 + nr_pages, table_frames)
    data_frames = (1 << 20) + rng.permutation(nr_pages).astype(np.uint64)
    attrs.set_range(gfn0, gfn0 + nr_pages, int(MemAttr.PRIVATE))
    gfns_2m = np.arange(gfn0, gfn0 + NR_2M, dtype=np.uint64)
    _check_all("AUG", tree.page_aug_batch(gfns_2m, data_frames[:NR_2M]))
    _check_all("ACCEPT", tree.page_accept_batch(gfns_2m))
    rep.add("S-EPT table pages added", str(used))

    # -- a 2 MiB private→shared conversion, as KVM_SET_MEMORY_ATTRIBUTES does it -------------
    epoch = 1
    t0 = time.perf_counter()
    # The no-op check KVM makes first: this range is private, so there is work to do.
    if attrs.has_range(gfn0, gfn0 + NR_2M, ~0 & ((1 << 64) - 1), 0):
        msg = "the private region already reads as shared"
        raise InvariantViolation(_DEMO, msg)
    attrs.reserve(gfn0, gfn0 + NR_2M)
    inval.begin(gfn0, gfn0 + NR_2M)
    inval.range_add(gfn0, gfn0 + NR_2M)
    seq_before = inval.seq
    # The zap: mmu_lock held for write; one BLOCK → TRACK → REMOVE per 4K page (6.18).
    if sept_lock.try_exclusive() != TDX_SUCCESS:
        msg = "S-EPT tree lock unexpectedly busy"
        raise InvariantViolation(_DEMO, msg)
    nr_seamcalls = 0
    for i in range(NR_2M):
        g = gfns_2m[i : i + 1]
        _check_all("BLOCK", tree.range_block_batch(g, epoch))
        epoch += 1  # TRACK; every vCPU kicked out, so the previous epoch's refcount is 0
        _check_all("REMOVE", tree.page_remove_batch(g, epoch, 0, True))
        nr_seamcalls += 3
    sept_lock.unlock_exclusive()
    attrs.set_range(gfn0, gfn0 + NR_2M, 0)
    inval.end(gfn0, gfn0 + NR_2M)
    conv_s = time.perf_counter() - t0
    retry = inval.retry_gfn(seq_before, gfn0)
    rep.add("2 MiB conversion to shared", f"{NR_2M} pages, {nr_seamcalls} SEAMCALLs, {conv_s * 1e3:.2f} ms")
    rep.add("fault that raced the conversion retries", str(bool(retry)))
    rep.add("mmu_invalidate seq / in_progress", f"{inval.seq} / {inval.in_progress}")
    runs = ", ".join(f"[{a:#x}, {b:#x}) attrs={v:#x}" for a, b, v in list(attrs.runs())[:2])
    rep.add("private gfn runs after conversion", runs)
    rep.add("attribute store bytes", str(attrs.nbytes))

    # -- an S-EPT map/unmap cycle over nr_pages pages through the core batch API ------------
    gfns = np.arange(gfn0, gfn0 + nr_pages, dtype=np.uint64)
    t0 = time.perf_counter()
    _check_all("AUG", tree.page_aug_batch(gfns, data_frames))
    _check_all("ACCEPT", tree.page_accept_batch(gfns))
    _check_all("BLOCK", tree.range_block_batch(gfns, epoch))
    epoch += 1
    _check_all("REMOVE", tree.page_remove_batch(gfns, epoch, 0, True))
    cycle_s = time.perf_counter() - t0
    rep.add("leaf cycle AUG→ACCEPT→BLOCK→TRACK→REMOVE",
            f"{nr_pages} pages in {cycle_s * 1e3:.1f} ms = {nr_pages / cycle_s / 1e6:.2f} M pages/s")
    rep.add("frames owned by the TD after the cycle", str(pamt.child_count(tdr)))
    rep.add("S-EPT tree state hash", f"{tree.state_hash():#018x}")
    return rep
