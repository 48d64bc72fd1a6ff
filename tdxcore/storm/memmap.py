"""The storm's memory map: attribute and S-EPT state of every gfn as a PNG (tools layer; SPEC §8).

:func:`gfn_states` classifies every gfn of every memslot of a VM into one of :data:`CATEGORIES`
from the VM's state at the time of the call:

* the gfn's attribute (``KVM_MEMORY_ATTRIBUTE_PRIVATE`` or shared);
* for a private gfn, the mirror leaf SPTE (``vm.mmu.leaf(gfn)``): none → "private, no mapping";
  FROZEN → "private, mirror frozen" (a hook call in flight); PRESENT → the S-EPT entry's public
  state, ``host.tdx.td(vm.tdr).sept.walk(gpa)[2] >> 8`` (the architectural state the module
  reports in RDX bits 15:8, :data:`tdxcore.status.SEPT_PUBLIC_STATE`);
* for a shared gfn, the direct (shared) root: ``vm.direct.get(gfn)`` none / a frame / MMIO;
* a private mapping under a shared attribute (or a shared one under a private attribute, or a
  present mirror leaf whose S-EPT entry is not a mapped leaf) is "inconsistent" — black, so it
  stands out; after a clean storm there is none.

:func:`render_map` draws one row per 2 MiB (512 gfns, aligned) of each slot's gfn range, one
column per 4 KiB gfn, slots stacked top to bottom with their GPA on the left, and a legend with
the count of each category. Cost is O(slot pages): per gfn, dictionary look-ups and, only for a
present mirror leaf, one S-EPT walk. matplotlib is imported lazily (the optional ``plot`` extra).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from tdxcore.constants import PAGE_SHIFT, MemAttr
from tdxcore.status import SEPT_PUBLIC_STATE, SeptState

__all__ = ["CATEGORIES", "gfn_states", "render_map", "ROW_PAGES"]

#: gfns per row (2 MiB of 4 KiB pages).
ROW_PAGES = 512

#: (label, colour) per category index; index 0 pads rows outside any slot.
CATEGORIES: Tuple[Tuple[str, str], ...] = (
    ("not in a memslot", "#ffffff"),
    ("shared, no mapping", "#c6dbef"),
    ("shared, mapped", "#2171b5"),
    ("shared, MMIO", "#6a51a3"),
    ("private, no mapping", "#e0e0e0"),
    ("private, S-EPT PENDING", "#fdae6b"),
    ("private, S-EPT MAPPED", "#31a354"),
    ("private, S-EPT BLOCKED", "#de2d26"),
    ("private, S-EPT PENDING_BLOCKED", "#a50f15"),
    ("private, other S-EPT state", "#8c6d31"),
    ("private, mirror frozen", "#ffd92f"),
    ("inconsistent", "#000000"),
)
(_PAD, _SH_NONE, _SH_MAPPED, _SH_MMIO, _PR_NONE, _PR_PENDING, _PR_MAPPED, _PR_BLOCKED,
 _PR_PENDING_BLOCKED, _PR_OTHER, _PR_FROZEN, _BAD) = range(len(CATEGORIES))

_PUBLIC_TO_CAT: Dict[int, int] = {
    SEPT_PUBLIC_STATE[int(SeptState["PENDING"])]: _PR_PENDING,
    SEPT_PUBLIC_STATE[int(SeptState["MAPPED"])]: _PR_MAPPED,
    SEPT_PUBLIC_STATE[int(SeptState["BLOCKED"])]: _PR_BLOCKED,
    SEPT_PUBLIC_STATE[int(SeptState["PENDING_BLOCKED"])]: _PR_PENDING_BLOCKED,
}
#: public states of entries that are no leaf mapping at all (a present mirror leaf over them is wrong)
_PUBLIC_UNMAPPED = frozenset({SEPT_PUBLIC_STATE[int(SeptState["FREE"])],
                              SEPT_PUBLIC_STATE[int(SeptState["REMOVED"])]})
_PRIVATE = int(MemAttr.PRIVATE)
_MMIO_SPTE = -1          # kvm.fault.MMIO_SPTE: the direct root's value for an MMIO gfn


def _sept_of(vm: Any) -> Any:
    tdr = getattr(vm, "tdr", None)
    if tdr is None:
        return None
    try:
        return vm.kvm.host.tdx.td(tdr).sept
    except Exception:       # a torn-down TD has no S-EPT to show: private gfns then show the mirror only
        return None


def gfn_states(vm: Any) -> List[Tuple[Any, np.ndarray]]:
    """Return ``[(memslot, categories)]``: one ``uint8`` array of :data:`CATEGORIES` indices per slot.

    ``categories[k]`` is the state of gfn ``slot.base_gfn + k``. Reads the VM's state only.
    """
    mmu = getattr(vm, "mmu", None)
    direct = getattr(vm, "direct", None)
    sept = _sept_of(vm)
    out: List[Tuple[Any, np.ndarray]] = []
    for slot in vm.memslots:
        cats = np.empty(slot.npages, dtype=np.uint8)
        for k in range(slot.npages):
            gfn = slot.base_gfn + k
            private = bool(vm.get_memory_attributes(gfn) & _PRIVATE)
            leaf = mmu.leaf(gfn) if mmu is not None else None
            shared_pfn = direct.get(gfn) if direct is not None else None
            if private:
                if shared_pfn is not None:
                    cats[k] = _BAD
                elif leaf is None:
                    cats[k] = _PR_NONE
                elif int(leaf[1]) != 1:                  # SpteState.PRESENT is 1; else FROZEN
                    cats[k] = _PR_FROZEN
                elif sept is None:
                    cats[k] = _PR_OTHER
                else:
                    st, _, level_state = sept.walk(gfn << PAGE_SHIFT)
                    public = level_state >> 8
                    if st != 0 or public in _PUBLIC_UNMAPPED:
                        cats[k] = _BAD
                    else:
                        cats[k] = _PUBLIC_TO_CAT.get(public, _PR_OTHER)
            else:
                if leaf is not None:
                    cats[k] = _BAD
                elif shared_pfn is None:
                    cats[k] = _SH_NONE
                elif shared_pfn == _MMIO_SPTE:
                    cats[k] = _SH_MMIO
                else:
                    cats[k] = _SH_MAPPED
        out.append((slot, cats))
    return out


def _grid(states: List[Tuple[Any, np.ndarray]]) -> Tuple[np.ndarray, List[Tuple[int, str]], List[int]]:
    """Stack the slots into rows of 512 aligned gfns: (grid, y tick labels, slot boundary rows)."""
    rows: List[np.ndarray] = []
    ticks: List[Tuple[int, str]] = []
    bounds: List[int] = []
    for slot, cats in states:
        first = slot.base_gfn - slot.base_gfn % ROW_PAGES
        nrows = -(-(slot.base_gfn + slot.npages - first) // ROW_PAGES)
        block = np.full(nrows * ROW_PAGES, _PAD, dtype=np.uint8)
        off = slot.base_gfn - first
        block[off:off + slot.npages] = cats
        if rows:
            bounds.append(sum(len(r) for r in rows))
        step = max(1, nrows // 16)
        base_row = sum(len(r) for r in rows)
        for r in range(0, nrows, step):
            label = f"{(first + r * ROW_PAGES) << PAGE_SHIFT:#x}"
            ticks.append((base_row + r, f"slot {slot.id}: {label}" if r == 0 else label))
        rows.append(block.reshape(nrows, ROW_PAGES))
    grid = np.concatenate(rows) if rows else np.zeros((0, ROW_PAGES), dtype=np.uint8)
    return grid, ticks, bounds


def render_map(vm: Any, path: Union[str, "os.PathLike[str]"], *,
               title: Optional[str] = None) -> Dict[str, int]:
    """Draw the VM's memory map (one row per 2 MiB, one column per gfn) as a PNG at ``path``.

    Parameters
    ----------
    vm : Vm or TdxVm
        The VM whose memslots are drawn (a TD's private gfns show their S-EPT state).
    path : str or path-like
        Output PNG file.
    title : str, optional
        Figure title (default ``"vm<N> memory map"``).

    Returns
    -------
    dict
        ``{category label: gfn count}`` for the categories present (what the legend shows).

    Raises
    ------
    ImportError
        matplotlib is missing: install the ``plot`` extra (``pip install 'tdxcore[plot]'``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        msg = "render_map needs matplotlib, from the optional 'plot' extra: pip install 'tdxcore[plot]'"
        raise ImportError(msg) from None

    states = gfn_states(vm)
    grid, ticks, bounds = _grid(states)
    counts = np.bincount(np.concatenate([c for _, c in states]) if states else np.zeros(0, np.uint8),
                         minlength=len(CATEGORIES))
    present = {CATEGORIES[i][0]: int(counts[i]) for i in range(1, len(CATEGORIES)) if counts[i]}

    nrows = max(1, grid.shape[0])
    height = min(40.0, 2.5 + 0.12 * nrows)
    # Figure/canvas directly (no pyplot): no global backend or figure registry is touched.
    fig = Figure(figsize=(12, height), dpi=100)
    FigureCanvasAgg(fig)
    bottom, top = 0.7 / height, 1 - 0.5 / height          # fixed margins in inches for the labels
    ax = fig.add_axes((0.16, bottom, 0.56, top - bottom))
    cmap = ListedColormap([c for _, c in CATEGORIES])
    norm = BoundaryNorm(np.arange(len(CATEGORIES) + 1) - 0.5, cmap.N)
    if grid.shape[0]:
        ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for b in bounds:
        ax.axhline(b - 0.5, color="#444444", linewidth=1.0)
    ax.set_yticks([t for t, _ in ticks], [s for _, s in ticks], fontsize=7)
    ax.set_xticks([0, 128, 256, 384, 511], ["+0", "+512K", "+1M", "+1.5M", "+2M-4K"], fontsize=7)
    ax.set_xlabel("gfn within the 2 MiB row")
    ax.set_ylabel("GPA of the row")
    vm_id = getattr(vm, "id", "?")
    ax.set_title(title if title is not None else f"vm{vm_id} memory map (attribute / S-EPT state)")
    handles = [Patch(facecolor=CATEGORIES[i][1], edgecolor="#666666",
                     label=f"{CATEGORIES[i][0]} ({int(counts[i])})")
               for i in range(1, len(CATEGORIES)) if counts[i]]
    if handles:
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.74, top), fontsize=8,
                   frameon=False, title="gfns")
    fig.savefig(os.fspath(path), format="png")
    return present
