"""tdxcore: a fast, faithful, hardware-free model of the Intel TDX host memory stack.

The public façade. The Cython cores (``SeptTree``, ``Pamt``, ``AttributeStore``,
``InvalidateTracker``, ``BusyLock``) are usable standalone; the status and constant vocabulary
(``TdxStatus``, ``Leaf``, ``TdcallLeaf``, ``TdxLevel``, ``SeptState``, ``VmType``, ``ExitReason``,
...) is shared by every layer. See SPEC §3.

Examples
--------
>>> import tdxcore as tdx
>>> store = tdx.AttributeStore()
>>> store.set_range(0x100000, 0x100200, int(tdx.MemAttr.PRIVATE))
>>> store[0x1001FF], store[0x100200]
(8, 0)
>>> str(tdx.TdxStatus(0x8000020000000092))
'TDX_OPERAND_BUSY|SEPT_TREE (0x8000020000000092)'
"""

from tdxcore import constants, errors, guest, status
from tdxcore._busylock import BusyLock
from tdxcore._invalidate import InvalidateTracker
from tdxcore._pamt import Pamt, is_tlb_tracked
from tdxcore._sept import SeptTree
from tdxcore._xarray import AttributeStore
from tdxcore.constants import (
    HC,
    Cap,
    ExitReason,
    MemAttr,
    MemFlag,
    PageType,
    TdAttr,
    TdvmcallLeaf,
    TdvmcallStatus,
    VmType,
)
from tdxcore.errors import HostError, InvariantViolation, KvmError, TdxError, TdxTypeError, TdxValueError
from tdxcore.invariants import check_invariants, register_invariant
from tdxcore.kvm import Kvm, Policy, helpers
from tdxcore.module.host import Host
from tdxcore.module.td import TdParams
from tdxcore.module.tdx_module import SeamcallResult
from tdxcore.sched import PREEMPT, Wait, WaitOutOfGuest
from tdxcore.status import Leaf, OpState, SeptState, TdcallLeaf, TdxLevel, TdxStatus
from tdxcore.storm.scheduler import Scheduler

__version__ = "0.1.0"

__all__ = [
    "constants",
    "errors",
    "status",
    "AttributeStore",
    "BusyLock",
    "InvalidateTracker",
    "Pamt",
    "SeptTree",
    "is_tlb_tracked",
    "HC",
    "Cap",
    "ExitReason",
    "MemAttr",
    "MemFlag",
    "PageType",
    "TdAttr",
    "TdvmcallLeaf",
    "TdvmcallStatus",
    "VmType",
    "Host",
    "HostError",
    "SeamcallResult",
    "TdParams",
    "Scheduler",
    "InvariantViolation",
    "KvmError",
    "TdxError",
    "TdxTypeError",
    "TdxValueError",
    "PREEMPT",
    "Wait",
    "WaitOutOfGuest",
    "Leaf",
    "OpState",
    "SeptState",
    "TdcallLeaf",
    "TdxLevel",
    "TdxStatus",
    "check_invariants",
    "register_invariant",
    "Kvm",
    "Policy",
    "helpers",
    "guest",
]
