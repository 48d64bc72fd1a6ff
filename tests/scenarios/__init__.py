"""Acceptance scenarios (anchors §2.4) and the small TD fixtures the module tests share.

The helpers drive only the public module API (``host.tdx.*``, :func:`tdxcore.module.td.build_td`).
"""

from __future__ import annotations

from typing import Tuple

from tdxcore.module import Host
from tdxcore.module.td import BuiltTd, add_sept_path, build_td

#: One 1 GiB TDMR; small enough to bring up in a few ms.
MEM = 64 << 20
#: A 2 MiB-aligned private GPA used by most tests.
GPA = 0x4000_0000


def new_host(**kw: object) -> Host:
    """A 2-package, 2-CPU-per-package host with the module enabled."""
    h = Host(**{"memory": MEM, **kw})  # type: ignore[arg-type]
    h.tdx.enable()
    return h


def runnable_td(vcpus: int = 1, finalize: bool = True, **kw: object) -> Tuple[Host, BuiltTd]:
    """A host with one TD built through the module API (RUNNABLE unless ``finalize`` is False)."""
    h = new_host(**kw)
    return h, build_td(h, vcpus=vcpus, finalize=finalize)


def sept_path(h: Host, b: BuiltTd, gpa: int = GPA) -> None:
    """Link the S-EPT pages above ``gpa`` down to level 1."""
    add_sept_path(h, b.tdr, gpa, 1)


def aug(h: Host, b: BuiltTd, gpa: int = GPA) -> int:
    """SEPT path + PAGE.AUG of a fresh frame at ``gpa``; returns the frame."""
    sept_path(h, b, gpa)
    p = h.alloc_frame()
    r = h.tdx.tdh_mem_page_aug(b.tdr, gpa, 0, p)
    assert r.status == 0, r
    return p


def mapped(h: Host, b: BuiltTd, gpa: int = GPA) -> int:
    """AUG + guest ACCEPT: the entry at ``gpa`` is MAPPED; returns the frame."""
    p = aug(h, b, gpa)
    r = h.tdx.tdg_mem_page_accept(b.vcpus[0], gpa, 0)
    assert r.status == 0, r
    return p


def conflicts(h: Host):
    """Every lock_conflict event as a dict of its fields."""
    names = h.events.kinds["lock_conflict"][0]
    evs = h.events.filter(kind="lock_conflict")
    return [dict(zip(("kind", "actor") + names, e, strict=True)) for _, e in evs]
