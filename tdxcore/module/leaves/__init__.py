"""SEAMCALL leaf handlers, one module per family (STYLE §2.1): ``sys`` so far.

:data:`HANDLERS` maps each modelled :class:`~tdxcore.status.Leaf` to its handler
``handler(tdx, cpu, rcx, rdx, r8, r9, r10, r11) -> SeamcallResult``, called by
``TdxModule.seamcall`` with ``tdx.lock`` held. Later families (``mng``, ``mem``, ``vp``,
``phymem``) add their tables here; a leaf absent from it is "not modelled yet".
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from tdxcore.module.leaves.sys import SYS_HANDLERS
from tdxcore.module.tdx_module import Handler
from tdxcore.status import Leaf

__all__ = ["HANDLERS"]

HANDLERS: Mapping[Leaf, Handler] = MappingProxyType({**SYS_HANDLERS})
