"""Target ``seamcall``: SEAMCALL leaves with random registers against a module hosting real TDs.

Two TDs are built through the module API (one RUNNABLE, one still before MR.FINALIZE); then the
input drives synchronous SEAMCALLs, overlapping ``begin``/``complete``/``abort`` pairs, guest
``TDG.MEM.PAGE.ACCEPT``s, injections and frame allocations, with registers drawn from the TDs'
own frames, GPAs with level bits, edge integers and wrong types. The module must answer with a
status (data) or refuse a Python-level misuse with ``TdxTypeError``/``TdxValueError``; every
invariant must hold afterwards — a rogue host cannot break the module's guarantees.
"""

from __future__ import annotations

from typing import Any, List

from tdxcore.constants import PAGE_SHIFT
from tdxcore.errors import HostError
from tdxcore.invariants import check_invariants
from tdxcore.module.td import BuildError, TdParams, add_sept_path, build_td
from tdxcore.status import OPERAND_IDS, STATUS_CODES, Leaf, TdcallLeaf  # type: ignore[attr-defined]
from tests.scenarios import GPA, new_host

from .common import ALLOWED, Finding
from .fdp import Fdp

M2 = 1 << 21
GPAS = (GPA, GPA + 0x1000, GPA + 0x2000, GPA + M2, GPA + M2 + 0x1000, 0, 1 << 47, GPA | (1 << 47),
        GPA + 0x800)
LEAVES = tuple(Leaf)
STATUSES = tuple(STATUS_CODES.values())
OPERANDS = tuple(OPERAND_IDS.values())
MAX_OPS = 40
CHECK_EVERY = 8


class _World:
    def __init__(self, f: Fdp) -> None:
        self.h = new_host(memory=16 << 20)     # 4x fewer TDMR.INIT chunks than the default: faster
        self.frames: List[int] = []
        self.vcpus: List[int] = []
        self.tdrs: List[int] = []
        self.ops: List[Any] = []
        self._build(2, True)
        self._build(1, False)
        if f.bool():
            for tdr in self.tdrs:
                try:
                    self.frames += add_sept_path(self.h, tdr, GPA, 1)
                except BuildError:
                    pass

    def _build(self, vcpus: int, finalize: bool) -> None:
        try:
            b = build_td(self.h, vcpus=vcpus, params=TdParams(max_vcpus=vcpus), finalize=finalize)
        except (HostError, BuildError):
            return
        self.tdrs.append(b.tdr)
        self.vcpus += b.vcpus
        self.frames += [b.tdr, *b.tdcs, *b.vcpus] + [p for v in b.vcpus for p in b.tdcx[v]]

    def reg(self, f: Fdp) -> Any:
        """One register value: a frame's PA, a GPA with level bits, an edge integer, or junk."""
        k = f.u8() % 10
        if k < 3 and self.frames:
            v = f.pick(self.frames + self.tdrs) << PAGE_SHIFT
        elif k < 5:
            v = f.pick(GPAS) | f.int_in(0, 4)
        elif k == 5:
            v = f.int_in(0, 64)
        elif k == 6:
            v = f.pick(self.vcpus or [1]) << PAGE_SHIFT
        else:
            v = f.big() & ((1 << 64) - 1) if f.u8() < 224 else f.big()
        return f.value(v) if f.u8() < 16 else v     # one register in 16 is junk or out of range

    def leaf(self, f: Fdp) -> Any:
        k = f.u8()
        if k < 240:
            return f.pick(LEAVES)
        if k < 248:
            return f.pick(tuple(TdcallLeaf))      # the wrong enum: TdxTypeError
        return f.value(f.int_in(0, 60))           # a bare int: TdxTypeError


def _cpu(f: Fdp) -> Any:
    return None if f.u8() < 200 else f.value(f.int_in(-1, 5))


def _step(f: Fdp, w: _World) -> None:
    t = w.h.tdx
    k = f.u8() % 10
    if k < 4:
        t.seamcall(w.leaf(f), *(w.reg(f) for _ in range(f.int_in(0, 6))), cpu=_cpu(f),
                   actor=f.pick(("host", "kvm", "h1")))
    elif k < 6:
        if len(w.ops) < 4:
            w.ops.append(t.begin(w.leaf(f), *(w.reg(f) for _ in range(f.int_in(0, 6))), cpu=_cpu(f),
                                 actor=f.pick(("host", "h1"))))
    elif k == 6:
        if w.ops:
            op = w.ops.pop(f.int_in(0, len(w.ops) - 1))
            if f.u8() < 200 or not op.acquired:
                op.complete()
            else:
                op.abort()
    elif k == 7:
        t.inject(w.leaf(f), f.value(f.pick(STATUSES) | (f.pick(OPERANDS) if f.bool() else 0)),
                 count=f.value(f.int_in(0, 3)), probability=f.value(f.pick((None, 0.5, 1.0, 0.0, 2.0))))
    elif k == 8:
        if w.vcpus:
            t.tdg_mem_page_accept(f.value(f.pick(w.vcpus) << PAGE_SHIFT), w.reg(f), f.value(f.int_in(0, 3)),
                                  cpu=_cpu(f))
    else:
        try:
            w.frames.append(w.h.alloc_frame())
        except HostError:
            pass


def target(data: bytes) -> None:
    """Fuzz target ``seamcall`` (see the module docstring)."""
    f = Fdp(data)
    w = _World(f)
    for i in range(MAX_OPS):
        if f.remaining == 0:
            break
        try:
            _step(f, w)
        except ALLOWED:
            pass
        except Exception as e:
            msg = f"step {i}: {type(e).__name__}: {e}"
            raise Finding(msg) from e
        if i % CHECK_EVERY == CHECK_EVERY - 1:
            check_invariants(w.h)
    for op in w.ops:
        op.complete()
    check_invariants(w.h)
