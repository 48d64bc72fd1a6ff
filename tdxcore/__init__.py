"""tdxcore: a fast, faithful, hardware-free model of the Intel TDX host memory stack."""

from tdxcore import constants, errors, status
from tdxcore.errors import InvariantViolation, KvmError, TdxError, TdxTypeError, TdxValueError
from tdxcore.status import Leaf, SeptState, TdcallLeaf, TdxLevel, TdxStatus

__version__ = "0.1.0"

__all__ = [
    "constants",
    "errors",
    "status",
    "InvariantViolation",
    "KvmError",
    "TdxError",
    "TdxTypeError",
    "TdxValueError",
    "Leaf",
    "SeptState",
    "TdcallLeaf",
    "TdxLevel",
    "TdxStatus",
]
