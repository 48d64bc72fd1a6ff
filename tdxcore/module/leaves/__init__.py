"""SEAMCALL leaf handlers, one module per family (STYLE §2.1): sys, mng, vp, mem, phymem.

:data:`HANDLERS` maps each modelled :class:`~tdxcore.status.Leaf` to its *begin handler*
``handler(tdx, op) -> SeamcallResult | effect`` (see :mod:`tdxcore.module.inflight`), called by
``TdxModule.begin`` with ``tdx.lock`` held. The SYS handlers keep their original shape
``handler(tdx, cpu, rcx, rdx, r8, r9, r10, r11)`` (they take no try-locks and finish at once)
and are wrapped here. A leaf absent from the table is "not modelled yet".
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Dict, Mapping

from tdxcore.module.leaves.mem import MEM_HANDLERS
from tdxcore.module.leaves.mng import MNG_HANDLERS
from tdxcore.module.leaves.phymem import PHYMEM_HANDLERS
from tdxcore.module.leaves.sys import SYS_HANDLERS
from tdxcore.module.leaves.vp import VP_HANDLERS
from tdxcore.module.tdx_module import BeginHandler, Handler, SeamcallResult
from tdxcore.status import Leaf

__all__ = ["HANDLERS"]


def _wrap(h: Handler) -> BeginHandler:
    def begin(tdx: Any, op: Any) -> SeamcallResult:
        return h(tdx, op.cpu, *op.regs)
    begin.__name__ = getattr(h, "__name__", "sys_handler")
    begin.__doc__ = h.__doc__
    return begin


_all: Dict[Leaf, BeginHandler] = {leaf: _wrap(h) for leaf, h in SYS_HANDLERS.items()}
for _table in (MNG_HANDLERS, VP_HANDLERS, MEM_HANDLERS, PHYMEM_HANDLERS):
    assert not set(_table) & set(_all)
    _all.update(_table)

HANDLERS: Mapping[Leaf, BeginHandler] = MappingProxyType(_all)
