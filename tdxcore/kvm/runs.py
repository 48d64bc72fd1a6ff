"""Run-length page maps shared by the mirror MMU and guest_memfd (bulk mappings, kvm/tdx_batch.py).

A run is ``[start, end, first_pfn]``: index ``i`` in ``[start, end)`` maps frame
``first_pfn + i - start``. Run lists are kept ascending and disjoint, so a 16 M-page TD is a few
runs instead of 16 M dict entries.
"""

from __future__ import annotations

import bisect
from typing import Iterable, List, Optional, Sequence

__all__ = ["merge_runs", "find_run", "pfn_in_runs"]


def merge_runs(existing: List[List[int]], runs: Iterable[Sequence[int]]) -> List[List[int]]:
    """Return ``existing`` plus ``runs`` (empty ones dropped), ascending, contiguous runs joined.

    Two runs are joined only when both their indices and their frames continue each other; the
    caller guarantees the new runs do not overlap the existing ones.
    """
    merged = sorted([list(r) for r in runs if r[1] > r[0]] + existing)
    out: List[List[int]] = []
    for r in merged:
        if out and out[-1][1] == r[0] and out[-1][2] + (r[0] - out[-1][0]) == r[2]:
            out[-1][1] = r[1]
        else:
            out.append(r)
    return out


def find_run(runs: List[List[int]], index: int) -> int:
    """Return the position in ``runs`` of the run holding ``index``, or -1."""
    i = bisect.bisect_right(runs, [index, 1 << 64]) - 1
    return i if i >= 0 and runs[i][0] <= index < runs[i][1] else -1


def pfn_in_runs(runs: List[List[int]], index: int) -> Optional[int]:
    """Return the frame ``runs`` map ``index`` to, or None."""
    i = find_run(runs, index)
    return None if i < 0 else runs[i][2] + index - runs[i][0]
