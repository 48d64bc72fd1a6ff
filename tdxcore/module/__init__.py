"""The TDX module layer (SPEC §2): the host, KeyIDs, frames, bring-up and every SEAMCALL leaf.

:class:`Host` owns the frames, PAMT, KeyIDs, RNG streams, event log and the module
(``host.tdx``, a :class:`TdxModule`): bring-up (``enable()``), the TD-scope host leaves and the
guest's ACCEPT, in-flight ops (``begin`` → :class:`Op` → ``complete``/``abort``) whose try-locks
really conflict, the TD epoch and zero-step rules, and status injection (``inject``).
"""

from __future__ import annotations

from tdxcore.errors import HostError
from tdxcore.module.host import Host, LeakRecord, Stats
from tdxcore.module.inflight import Op
from tdxcore.module.inject import LEAF_STATUSES, InjectCall, Injection, Injector
from tdxcore.module.keyids import KeyIdPartition
from tdxcore.module.td import BuiltTd, TdParams, add_sept_path, build_td
from tdxcore.module.tdx_module import (
    BRINGUP_STEPS,
    ModuleStatus,
    SeamcallResult,
    SysState,
    TdxModule,
)

__all__ = ["Host", "HostError", "KeyIdPartition", "LeakRecord", "Stats", "TdxModule", "SeamcallResult",
           "ModuleStatus", "SysState", "BRINGUP_STEPS", "Op", "Injector", "Injection", "InjectCall",
           "LEAF_STATUSES", "TdParams", "BuiltTd", "build_td", "add_sept_path"]
