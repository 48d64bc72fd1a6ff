"""The TDX module layer (SPEC §2): the host, KeyIDs, frames, bring-up and SEAMCALL leaves.

Built so far (issue 4 items 1-2): :class:`Host`, :class:`TdxModule` with the SYS leaves and
``enable()``. TD pages, TD-scope leaves, in-flight ``begin``/``complete``, ``inject`` and the
scheduler come later and plug in through ``module.leaves.HANDLERS`` and ``TdxModule``.
"""

from __future__ import annotations

from tdxcore.errors import HostError
from tdxcore.module.host import Host, LeakRecord, Stats
from tdxcore.module.keyids import KeyIdPartition
from tdxcore.module.tdx_module import (
    BRINGUP_STEPS,
    ModuleStatus,
    SeamcallResult,
    SysState,
    TdxModule,
)

__all__ = ["Host", "HostError", "KeyIdPartition", "LeakRecord", "Stats", "TdxModule", "SeamcallResult",
           "ModuleStatus", "SysState", "BRINGUP_STEPS"]
