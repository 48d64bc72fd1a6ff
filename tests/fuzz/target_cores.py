"""Target ``cores``: random calls on the Cython cores, each checked against its Python twin.

Every call runs on the core and on ``tdxcore.reference``'s twin with the same arguments: results
must be equal (statuses to the bit, arrays to the element), failures must be of the same family
(``TypeError``/``ValueError``), and the state hashes must agree after every call. So besides
crashes and foreign exceptions this target finds *silent* wrong state. The twin is plain Python,
which is what gives atheris its coverage feedback (the compiled core is not instrumented).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, List, Tuple

import numpy as np

import tdxcore._busylock as c_busy
import tdxcore._invalidate as c_inv
import tdxcore._pamt as c_pamt
import tdxcore._sept as c_sept
import tdxcore._xarray as c_xa
import tdxcore.reference.busylock as r_busy
import tdxcore.reference.invalidate as r_inv
import tdxcore.reference.pamt as r_pamt
import tdxcore.reference.sept as r_sept
import tdxcore.reference.xarray as r_xa
from tdxcore.errors import InvariantViolation

from .common import ALLOWED, Finding, call
from .fdp import Fdp

M2 = 1 << 21
NR_FRAMES = 1 << 12
GPAS = (0, 0x1000, 0x2000, M2, M2 + 0x1000, 2 * M2, 1 << 30, (1 << 30) + M2, 1 << 39, 1 << 47,
        (1 << 47) + 0x1000, 1 << 51, 0x800, 0x1FF000)
GFNS = (0, 1, 2, 511, 512, 513, 1024, 0x100000, 0x100200, (1 << 40), (1 << 52) - 1, 1 << 52)
MAX_OPS = 48
STORE_SPAN = 1 << 16
SEPT_SPAN = 1 << 20


def _gpa(f: Fdp) -> Any:
    k = f.u8() % 4
    g = f.pick(GPAS) + (f.int_in(0, 7) << 12 if k == 1 else 0)
    return f.value(g if k < 3 else f.big())


def _level(f: Fdp) -> Any:
    return f.value(f.pick((0, 0, 0, 1, 1, 2, 3, 4, 5, -1)))


def _page(f: Fdp) -> Any:
    return f.value(f.pick((10, 11, 12, 13, 14, 20, 30, 100, 1, 0, NR_FRAMES - 1, NR_FRAMES)) + 0)


def _gfn(f: Fdp) -> Any:
    return f.value(f.pick(GFNS) + f.int_in(0, 3) if f.bool() else f.pick(GFNS))


def _epoch(f: Fdp) -> Any:
    return f.value(f.int_in(0, 4))


def _bool(f: Fdp) -> Any:
    return f.value(f.bool())


def _attrs(f: Fdp) -> Any:
    return f.value(f.pick((0, 8, 8, 1, 1 << 63, (1 << 64) - 1)))


# (method, argument generators): arguments are drawn once and passed to both core and twin.
SEPT_OPS: Tuple[Tuple[str, Tuple[Callable[[Fdp], Any], ...]], ...] = (
    ("walk", (_gpa, _level)),
    ("sept_add", (_gpa, _level, _page, _bool)),
    ("page_add", (_gpa, _level, _page)),
    ("page_aug", (_gpa, _level, _page)),
    ("page_accept", (_gpa, _level)),
    ("range_block", (_gpa, _level, _epoch, _epoch, _bool)),
    ("range_unblock", (_gpa, _level, _epoch, _epoch, _bool)),
    ("page_remove", (_gpa, _level, _epoch, _epoch, _bool)),
    ("sept_remove", (_gpa, _level, _epoch, _epoch, _bool)),
    ("entry_try_lock", (_gpa, _level, _bool)),
    ("entry_unlock", (_gpa, _level)),
    ("entries", (_level,)),
    ("nr_tables", ()),
)
PAMT_OPS: Tuple[Tuple[str, Tuple[Callable[[Fdp], Any], ...]], ...] = (
    ("page_type", (_page,)),
    ("owner", (_page,)),
    ("bepoch", (_page,)),
    ("set_bepoch", (_page, _epoch)),
    ("child_count", (_page,)),
    ("assign", (_page, lambda f: f.value(f.int_in(0, 9)), _page, lambda f: f.value(f.int_in(0, 0x20)))),
    ("release", (_page, lambda f: f.value(f.int_in(0, 0x20)))),
    ("reserve", (_page,)),
    ("try_lock", (_page, _bool, lambda f: f.value(f.int_in(0, 0x20)), _bool)),
    ("unlock", (_page, _bool)),
    ("nr_assigned", (lambda f: f.value(f.int_in(0, 9)),)),
    ("types", (_page, _page)),
)
STORE_OPS: Tuple[Tuple[str, Tuple[Callable[[Fdp], Any], ...]], ...] = (
    ("get", (_gfn,)),
    ("__getitem__", (_gfn,)),
    ("set_range", (_gfn, _gfn, _attrs)),
    ("reserve", (_gfn, _gfn)),
    ("has_range", (_gfn, _gfn, _attrs, _attrs)),
    ("runs", ()),
    ("runs_array", ()),
    ("clear", ()),
)
INV_OPS: Tuple[Tuple[str, Tuple[Callable[[Fdp], Any], ...]], ...] = (
    ("begin", (_gfn, _gfn)),
    ("range_add", (_gfn, _gfn)),
    ("end", (_gfn, _gfn)),
    ("retry", (lambda f: f.value(f.int_in(0, 6)),)),
    ("retry_gfn", (lambda f: f.value(f.int_in(0, 6)), _gfn)),
    ("retry_gfn_unsafe", (lambda f: f.value(f.int_in(0, 6)), _gfn)),
    ("range", ()),
    ("in_progress", ()),
    ("seq", ()),
    ("nr_warnings", ()),
)
LOCK_OPS: Tuple[Tuple[str, Tuple[Callable[[Fdp], Any], ...]], ...] = (
    ("try_shared", (_bool,)),
    ("try_exclusive", (_bool,)),
    ("unlock_shared", ()),
    ("unlock_exclusive", ()),
    ("clear_host_priority", ()),
    ("word", ()),
    ("host_priority", ()),
)


class _Pairs:
    """The core objects and their twins, built from the first bytes of the input."""

    def __init__(self, f: Fdp) -> None:
        levels = 5 if f.u8() % 4 == 0 else 4
        cp, rp = c_pamt.Pamt(NR_FRAMES), r_pamt.Pamt(NR_FRAMES)
        self.sept = (c_sept.SeptTree(levels, cp, tdr=1), r_sept.SeptTree(levels, rp, tdr=1))
        if f.bool():
            # Tables over the first 4 MiB, so leaf operations succeed from the first call.
            for tree in self.sept:
                tree.sept_add_range(0, 1024, np.arange(10, 20))
        self.pamt = (cp, rp)
        backend = f.pick(("ranges", "xarray"))
        self.store = (c_xa.AttributeStore(backend), r_xa.AttributeStore(backend))
        self.inv = (c_inv.InvalidateTracker(), r_inv.InvalidateTracker())
        operand = f.value(f.pick((0x92, 0x80, 1)))
        self.lock = self._make_lock(operand)

    @staticmethod
    def _make_lock(operand: Any) -> Tuple[Any, Any]:
        pair = [call(mod, "BusyLock", (operand,)) for mod in (c_busy, r_busy)]
        if pair[0][0] != pair[1][0]:
            msg = f"BusyLock({operand!r}): core {pair[0]} vs twin {pair[1]}"
            raise Finding(msg)
        if pair[0][0] == "err":
            return (c_busy.BusyLock(0x92), r_busy.BusyLock(0x92))
        return (c_busy.BusyLock(operand), r_busy.BusyLock(operand))


def _compare(what: str, name: str, args: Tuple[Any, ...], a: Any, b: Any) -> None:
    if a != b:
        msg = f"{what}.{name}{args!r}: core {a!r} != twin {b!r}"
        raise Finding(msg)


def _run_pair(what: str, pair: Tuple[Any, Any], name: str, args: Tuple[Any, ...],
              allowed: Tuple[type, ...] = ALLOWED) -> None:
    hashed = hasattr(pair[0], "state_hash")
    before = pair[0].state_hash() if hashed else None
    core = call(pair[0], name, args, allowed)
    twin = call(pair[1], name, args, allowed)
    _compare(what, name, args, core, twin)
    if hashed:
        after = pair[0].state_hash()
        _compare(what, "state_hash after " + name, args, after, pair[1].state_hash())
        if core[0] == "err" and after != before:
            # SPEC §7: a refused call raises before any state changes.
            msg = f"{what}.{name}{args!r} raised {core[1]} after changing the core's state"
            raise Finding(msg)


def _batch(f: Fdp, p: _Pairs) -> None:
    """One batch call with a drawn array: wrong dtypes, shapes and values included."""
    k = f.u8() % 7
    gfns = f.array(24, lambda: f.pick(GFNS[:6]) + f.int_in(0, 3) if f.u8() < 230 else f.big())
    if k == 0:
        pages = f.array(24, lambda: f.int_in(10, 60) if f.u8() < 230 else f.big())
        _run_pair("sept", p.sept, "page_aug_batch", (gfns, pages))
    elif k == 1:
        _run_pair("sept", p.sept, "page_accept_batch", (gfns,))
    elif k == 2:
        _run_pair("sept", p.sept, "range_block_batch", (gfns, _epoch(f)))
    elif k == 3:
        _run_pair("sept", p.sept, "page_remove_batch", (gfns, _epoch(f), _epoch(f), _bool(f)))
    elif k == 4:
        pages = f.array(6, lambda: f.int_in(10, 60) if f.u8() < 230 else f.big())
        # The twin lists every table slot of the range before it counts the pages (O(span)):
        # bound the span so a legal but huge range does not time the twin out.
        _run_pair("sept", p.sept, "sept_add_range", _span_bound((_gfn(f), _gfn(f), pages), SEPT_SPAN))
    elif k == 5:
        _run_pair("store", p.store, "get_many", (gfns,))
    else:
        _run_pair("inv", p.inv, "retry_gfn_many", (f.value(f.int_in(0, 6)), gfns))


def _ctor(f: Fdp) -> None:
    """Constructors with drawn arguments: both raise the same family or both succeed."""
    k = f.u8() % 4
    if k == 0:
        n = f.value(f.pick((1, 2, NR_FRAMES, 1 << 33)))
        if isinstance(n, int) and 1 << 20 < n <= 1 << 32:
            n = 1 << 20     # a legal but huge PAMT: real memory, not a finding (the limit is 2^32 frames)
        arg: Tuple[Any, ...] = (n,)
        a, b = call(c_pamt, "Pamt", arg), call(r_pamt, "Pamt", arg)
        _compare("Pamt", "__init__", arg, a[0], b[0])
    elif k == 1:
        arg = (f.value(f.pick((4, 5, 3, 6))), None, f.value(f.pick((0, 1, 2))))
        a, b = call(c_sept, "SeptTree", arg), call(r_sept, "SeptTree", arg)
        _compare("SeptTree", "__init__", arg, a[0], b[0])
    elif k == 2:
        arg = (f.value(f.pick(("ranges", "xarray", "xa", ""))),)
        a, b = call(c_xa, "AttributeStore", arg), call(r_xa, "AttributeStore", arg)
        _compare("AttributeStore", "__init__", arg, a[0], b[0])
    else:
        arg = (f.big(), f.big(), f.big())
        _compare("is_tlb_tracked", "", arg, call(c_pamt, "is_tlb_tracked", arg),
                 call(r_pamt, "is_tlb_tracked", arg))


def _span_bound(args: Tuple[Any, ...], span: int = 0) -> Tuple[Any, ...]:
    """Cap the span of a legal gfn range (the attribute stores, SEPT.ADD ranges).

    The store twin keeps one dict entry per gfn, and the core's ``"xarray"`` backend models
    upstream's per-gfn cost (≈ 9 B a gfn): a
    legal 2^40-gfn range really wants terabytes — ENOMEM, not a bug (and under overcommit the OOM
    killer, which would take the fuzzer down). Huge spans on the ``"ranges"`` core alone are
    covered by the ``kvm`` target's set_memory_attributes.
    """
    if len(args) < 2:
        return args
    try:        # numpy integers are accepted as gfns too (both sides): bound them as well
        lo, hi = operator.index(args[0]), operator.index(args[1])
    except TypeError:
        return args
    span = span or STORE_SPAN
    if 0 <= lo < hi and hi - lo > span:
        return (args[0], lo + span) + args[2:]
    return args


def target(data: bytes) -> None:
    """Fuzz target ``cores`` (see the module docstring)."""
    f = Fdp(data)
    p = _Pairs(f)
    groups: List[Tuple[str, Tuple[Any, Any], Any, Tuple[type, ...]]] = [
        ("sept", p.sept, SEPT_OPS, ALLOWED),
        ("pamt", p.pamt, PAMT_OPS, ALLOWED),
        ("store", p.store, STORE_OPS, ALLOWED),
        # SPEC §3.4: the tracker's count going below zero raises InvariantViolation, by contract.
        ("inv", p.inv, INV_OPS, ALLOWED + (InvariantViolation,)),
        ("lock", p.lock, LOCK_OPS, ALLOWED),
    ]
    for _ in range(MAX_OPS):
        if f.remaining == 0:
            break
        g = f.u8() % (len(groups) + 2)
        if g == len(groups):
            _batch(f, p)
            continue
        if g == len(groups) + 1:
            _ctor(f)
            continue
        what, pair, ops, allowed = groups[g]
        name, gens = f.pick(ops)
        args = tuple(gen(f) for gen in gens)
        if what == "store":
            args = _span_bound(args)
        _run_pair(what, pair, name, args, allowed)
