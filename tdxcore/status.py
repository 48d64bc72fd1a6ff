"""TDX module status codes, operand ids, leaf numbers, levels and S-EPT state tables.

Every value here comes from the TDX module (1.5.01, see ``tdxcore/data/*.csv``) and is written
once: the CSVs are the module's own tables, copied verbatim from ``shared/reference``; this file
loads them. It imports only the standard library, because ``setup.py`` runs it standalone to
generate ``_defs.h`` for the Cython cores (STYLE §2.1), so C and Python cannot drift.

Names are spelled as in the module's ``tdx_error_codes_defs.h`` (``TDX_OPERAND_BUSY``,
``OPERAND_ID_SEPT_TREE``), plus KVM's alias ``OPERAND_ID_SEPT`` (SPEC §3.1).
"""

from __future__ import annotations

import csv
import enum
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Tuple

__all__ = [
    "DATA_DIR",
    "STATUS_CODES",
    "OPERAND_IDS",
    "TdxStatus",
    "Leaf",
    "TdcallLeaf",
    "TdxLevel",
    "SeptState",
    "SEPT_STATE_INDEX",
    "SEPT_STATE_FLAGS",
    "SEPT_PUBLIC_STATE",
    "SEPT_LEGALITY_SEAMCALL",
    "SEPT_LEGALITY_TDCALL",
    "OP_STATE_LEGALITY",
    "OpState",
    "TDX_SEAMCALL_STATUS_MASK",
    "status_name",
]

DATA_DIR = Path(__file__).resolve().parent / "data"

#: KVM's mask for "the class of a status, operand ignored" (``TDX_SEAMCALL_STATUS_MASK``).
TDX_SEAMCALL_STATUS_MASK = 0xFFFFFFFF00000000


def _rows(name: str) -> Iterator[Dict[str, str]]:
    """Yield the data rows of one CSV table in ``data/`` (``#`` lines are comments)."""
    with open(DATA_DIR / name, newline="") as fh:
        lines = [ln for ln in fh if not ln.startswith("#")]
    yield from csv.DictReader(lines)


# --------------------------------------------------------------------------------------------
# Status codes and operand ids
# --------------------------------------------------------------------------------------------

#: name -> 64-bit value, for every status code the module defines (168, incl. 1.5.06 extras).
STATUS_CODES: Dict[str, int] = {}
#: name -> operand id, e.g. ``OPERAND_ID_SEPT_TREE`` -> 146; plus KVM's ``OPERAND_ID_SEPT``.
OPERAND_IDS: Dict[str, int] = {}

for _r in _rows("tdx_status_codes.csv"):
    if _r["kind"] == "status":
        STATUS_CODES[_r["name"]] = int(_r["value"], 16)
    elif _r["kind"] == "operand_id":
        OPERAND_IDS[_r["name"]] = int(_r["value"], 0)
OPERAND_IDS["OPERAND_ID_SEPT"] = OPERAND_IDS["OPERAND_ID_SEPT_TREE"]  # KVM's spelling

globals().update(STATUS_CODES)
globals().update(OPERAND_IDS)
__all__ += sorted(STATUS_CODES) + sorted(OPERAND_IDS)

# base value -> name (first name wins; the table has no duplicate values)
_STATUS_BY_VALUE: Dict[int, str] = {}
for _n, _v in STATUS_CODES.items():
    _STATUS_BY_VALUE.setdefault(_v, _n)
# operand id -> short name without the OPERAND_ID_ prefix (KVM's alias excluded)
_OPERAND_BY_VALUE: Dict[int, str] = {}
for _n, _v in OPERAND_IDS.items():
    if _n != "OPERAND_ID_SEPT":
        _OPERAND_BY_VALUE.setdefault(_v, _n[len("OPERAND_ID_") :])

#: Status classes (bits 47:40) whose low 32 bits carry an operand id: operand (0x01), busy (0x02),
#: page metadata (0x03) and EPT (0x0B). SPEC §3.1 names operand, busy and EPT; the module also
#: adds the operand to PAGE_METADATA_INCORRECT (e.g. ``|R8`` from PAGE.AUG), so 0x03 is included.
OPERAND_CLASSES = frozenset({0x01, 0x02, 0x03, 0x0B})

_U64 = (1 << 64) - 1


def status_name(value: int) -> str:
    """Return the display name of a 64-bit status, e.g. ``TDX_OPERAND_BUSY|SEPT_TREE``."""
    base = value & TDX_SEAMCALL_STATUS_MASK
    low = value & 0xFFFFFFFF
    name = _STATUS_BY_VALUE.get(base)
    if name is None:
        name = f"UNKNOWN_STATUS_0x{base:016X}"
    if low == 0:
        return name
    cls = (value >> 40) & 0xFF
    if cls in OPERAND_CLASSES and low in _OPERAND_BY_VALUE:
        return f"{name}|{_OPERAND_BY_VALUE[low]}"
    return f"{name}|0x{low:X}"


class TdxStatus(int):
    """A 64-bit TDX module status: an ``int`` whose ``str``/``repr`` names it.

    ``str(TdxStatus(0x8000020000000092))`` is ``TDX_OPERAND_BUSY|SEPT_TREE (0x8000020000000092)``.
    A status is data, never an exception (STYLE §2.3); test a class with ``status.base``.

    Examples
    --------
    >>> s = TdxStatus(TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE)
    >>> s.is_error, s.base == TDX_OPERAND_BUSY, s.operand
    (True, True, 146)
    >>> str(TdxStatus(TDX_GPA_RANGE_ALREADY_BLOCKED | OPERAND_ID_RCX))
    'TDX_GPA_RANGE_ALREADY_BLOCKED|RCX (0x00000B0700000001)'
    """

    __slots__ = ()

    def __new__(cls, value: int = 0) -> "TdxStatus":
        """Build a status from a 64-bit value (``TdxTypeError``/``TdxValueError`` otherwise)."""
        if type(value) is int and 0 <= value <= _U64:   # the hot case: a plain int in range
            return int.__new__(cls, value)
        if isinstance(value, bool) or not isinstance(value, int):
            from tdxcore.errors import TdxTypeError

            msg = f"value={value!r} (type={type(value).__name__}) is not an int status"
            raise TdxTypeError(msg, name="value", value=value)
        if not 0 <= value <= _U64:
            from tdxcore.errors import TdxValueError

            msg = f"value={value:#x} is not a 64-bit status"
            raise TdxValueError(msg, name="value", value=value)
        return super().__new__(cls, value)

    @property
    def is_error(self) -> bool:
        """Bit 63: the call failed (warnings such as ALREADY_BLOCKED have it clear)."""
        return bool(self >> 63)

    @property
    def base(self) -> int:
        """The status without its operand/detail bits (``value & 0xFFFFFFFF00000000``)."""
        return int(self) & TDX_SEAMCALL_STATUS_MASK

    @property
    def operand(self) -> int:
        """The low 32 bits: the operand id (or other detail)."""
        return int(self) & 0xFFFFFFFF

    @property
    def name(self) -> str:
        """The display name without the hex value, e.g. ``TDX_OPERAND_BUSY|SEPT_TREE``."""
        return status_name(int(self))

    def __repr__(self) -> str:
        return f"{status_name(int(self))} (0x{int(self):016X})"

    __str__ = __repr__


# --------------------------------------------------------------------------------------------
# Leaves and levels
# --------------------------------------------------------------------------------------------


class Leaf(enum.IntEnum):
    """SEAMCALL leaf numbers (module ``tdx_api_defs.h``; tdx-facts §2.2).

    ``str(Leaf.TDH_MEM_PAGE_AUG)`` is ``TDH.MEM.PAGE.AUG``. Separate from :class:`TdcallLeaf`:
    6 is both PAGE.AUG and the guest's PAGE.ACCEPT, so APIs taking a leaf reject a bare int.
    """

    TDH_VP_ENTER = 0
    TDH_MNG_ADDCX = 1
    TDH_MEM_PAGE_ADD = 2
    TDH_MEM_SEPT_ADD = 3
    TDH_VP_ADDCX = 4
    TDH_MEM_PAGE_RELOCATE = 5
    TDH_MEM_PAGE_AUG = 6
    TDH_MEM_RANGE_BLOCK = 7
    TDH_MNG_KEY_CONFIG = 8
    TDH_MNG_CREATE = 9
    TDH_VP_CREATE = 10
    TDH_MNG_RD = 11
    TDH_MEM_RD = 12
    TDH_MNG_WR = 13
    TDH_MEM_WR = 14
    TDH_MEM_PAGE_DEMOTE = 15
    TDH_MR_EXTEND = 16
    TDH_MR_FINALIZE = 17
    TDH_VP_FLUSH = 18
    TDH_MNG_VPFLUSHDONE = 19
    TDH_MNG_KEY_FREEID = 20
    TDH_MNG_INIT = 21
    TDH_VP_INIT = 22
    TDH_MEM_PAGE_PROMOTE = 23
    TDH_PHYMEM_PAGE_RDMD = 24
    TDH_MEM_SEPT_RD = 25
    TDH_VP_RD = 26
    TDH_MNG_KEY_RECLAIMID = 27
    TDH_PHYMEM_PAGE_RECLAIM = 28
    TDH_MEM_PAGE_REMOVE = 29
    TDH_MEM_SEPT_REMOVE = 30
    TDH_SYS_KEY_CONFIG = 31
    TDH_SYS_INFO = 32
    TDH_SYS_INIT = 33
    TDH_SYS_RD = 34
    TDH_SYS_LP_INIT = 35
    TDH_SYS_TDMR_INIT = 36
    TDH_SYS_RDALL = 37
    TDH_MEM_TRACK = 38
    TDH_MEM_RANGE_UNBLOCK = 39
    TDH_PHYMEM_CACHE_WB = 40
    TDH_PHYMEM_PAGE_WBINVD = 41
    TDH_MEM_SEPT_WR = 42
    TDH_VP_WR = 43
    TDH_SYS_LP_SHUTDOWN = 44
    TDH_SYS_CONFIG = 45
    TDH_SERVTD_BIND = 48
    TDH_SERVTD_PREBIND = 49
    TDH_SYS_SHUTDOWN = 52
    TDH_SYS_UPDATE = 53
    TDH_PHYMEM_PAMT_ADD = 58
    TDH_PHYMEM_PAMT_REMOVE = 59

    def __str__(self) -> str:
        return self.name.replace("_", ".", 1).replace("_", ".")

    @property
    def module_name(self) -> str:
        """The module's dotted spelling, e.g. ``TDH.MEM.PAGE.AUG``."""
        return str(self)


class TdcallLeaf(enum.IntEnum):
    """Guest TDCALL leaf numbers (tdx-facts §2.2; ATTR.RD/WR and SERVTD from the module tables)."""

    TDG_VP_VMCALL = 0
    TDG_VP_INFO = 1
    TDG_MR_RTMR_EXTEND = 2
    TDG_VP_VEINFO_GET = 3
    TDG_MR_REPORT = 4
    TDG_VP_CPUIDVE_SET = 5
    TDG_MEM_PAGE_ACCEPT = 6
    TDG_VM_RD = 7
    TDG_VM_WR = 8
    TDG_SERVTD_RD = 18
    TDG_SERVTD_WR = 20
    TDG_MEM_PAGE_ATTR_RD = 23
    TDG_MEM_PAGE_ATTR_WR = 24

    def __str__(self) -> str:
        return self.name.replace("_", ".")

    @property
    def module_name(self) -> str:
        """The module's dotted spelling, e.g. ``TDG.MEM.PAGE.ACCEPT``."""
        return str(self)


def _leaf_from_module_name(name: str) -> "Leaf | TdcallLeaf":
    key = name.replace(".", "_")
    if key.startswith("TDG_"):
        return TdcallLeaf[key]
    return Leaf[key]


class TdxLevel(enum.IntEnum):
    """S-EPT level in the module's numbering (0 = 4K leaf). KVM's ``PG_LEVEL_4K = 1`` lives in kvm/."""

    L4K = 0
    L2M = 1
    L1G = 2
    L512G = 3
    L256T = 4


# --------------------------------------------------------------------------------------------
# S-EPT states and per-leaf legality (module sept_state_lookup.{h,c})
# --------------------------------------------------------------------------------------------

_L1_STATES: List[Dict[str, str]] = [r for r in _rows("sept_states.csv") if r["scope"] == "L1"]

#: L1 S-EPT states; the value is the module's 7-bit state encoding (FREE = 0x0E, MAPPED = 0x60).
SeptState = enum.IntEnum(  # type: ignore[misc]
    "SeptState", [(r["name"], int(r["encoding_hex"], 16)) for r in _L1_STATES], module=__name__
)
SeptState.__doc__ = "L1 S-EPT entry states; value = the module's 7-bit state encoding."

#: state encoding -> dense table index 0..15 (the legality tables' column).
SEPT_STATE_INDEX: Dict[int, int] = {int(r["encoding_hex"], 16): int(r["table_index"]) for r in _L1_STATES}
#: state encoding -> architectural public state (reported to the host in RDX bits 15:8).
SEPT_PUBLIC_STATE: Dict[int, int] = {int(r["encoding_hex"], 16): int(r["public_state"]) for r in _L1_STATES}
_FLAG_COLUMNS = (
    "mapped_or_pending",
    "any_pending",
    "any_pending_and_guest_acceptable",
    "any_blocked",
    "any_blockedw",
    "guest_fully_accessible_leaf",
    "tlb_tracking_required",
    "guest_accessible_leaf",
    "any_exported",
)
#: state encoding -> {flag name: bool} from ``sept_special_flags_lookup``, plus ``kind``.
SEPT_STATE_FLAGS: Dict[int, Mapping[str, object]] = {
    int(r["encoding_hex"], 16): {**{c: r[c] == "1" for c in _FLAG_COLUMNS}, "kind": r["kind"]}
    for r in _L1_STATES
}


def _legality(interface: str) -> Dict[int, Tuple[int, ...]]:
    table: Dict[int, List[int]] = {}
    for r in _rows("sept_leaf_legality.csv"):
        if r["interface"] != interface:
            continue
        row = table.setdefault(int(r["leaf_number"]), [0] * 16)
        row[int(r["state_index"])] = int(r["allowed"])
    return {leaf: tuple(v) for leaf, v in table.items()}


#: SEAMCALL leaf number -> 16 allowed bits indexed by dense state index (absent leaf = all 0).
SEPT_LEGALITY_SEAMCALL: Dict[int, Tuple[int, ...]] = _legality("SEAMCALL")
#: TDCALL leaf number -> 16 allowed bits (TDG.MEM.PAGE.ACCEPT, ATTR.RD/WR).
SEPT_LEGALITY_TDCALL: Dict[int, Tuple[int, ...]] = _legality("TDCALL")


class OpState(enum.IntEnum):
    """TDCS.OP_STATE values (module ``op_state_lookup``)."""

    UNINITIALIZED = 0
    INITIALIZED = 1
    RUNNABLE = 2
    LIVE_EXPORT = 3
    PAUSED_EXPORT = 4
    POST_EXPORT = 5
    MEMORY_IMPORT = 6
    STATE_IMPORT = 7
    POST_IMPORT = 8
    LIVE_IMPORT = 9
    FAILED_IMPORT = 10


def _op_legality() -> Dict[Tuple[str, int], Tuple[int, ...]]:
    table: Dict[Tuple[str, int], List[int]] = {}
    for r in _rows("op_state_legality.csv"):
        key = (r["table"], int(r["leaf_number"]))
        row = table.setdefault(key, [0] * len(OpState))
        row[int(r["op_state_value"])] = int(r["allowed"])
    return {k: tuple(v) for k, v in table.items()}


#: (table name, leaf number) -> allowed bit per :class:`OpState`.
OP_STATE_LEGALITY: Dict[Tuple[str, int], Tuple[int, ...]] = _op_legality()
#: op state -> ``opf_tlb_tracking_required`` (RUNNABLE, LIVE_EXPORT, LIVE_IMPORT).
OP_STATE_TLB_TRACKING_REQUIRED: Dict[int, bool] = {
    int(r["op_state_value"]): r["opf_tlb_tracking_required"] == "1"
    for r in _rows("op_state_legality.csv")
}

del _r, _n, _v
