"""The SYS leaves bring-up uses: TDH.SYS.INIT, LP.INIT, CONFIG, KEY.CONFIG, TDMR.INIT.

Each handler runs with ``tdx.lock`` held, after the dispatcher's ready gate (SYS leaves are
exempt) and injection. Checks and their order follow the module 1.5 handlers
(``tdh_sys_*.c`` in intel/tdx-module); statuses are the module's names:

=====================  ==================================================================
leaf                   failures (first that applies wins)
=====================  ==================================================================
SYS.INIT               RCX != 0 → ``OPERAND_INVALID|RCX`` (model: reserved input);
                       not SYSINIT_PENDING → ``TDX_SYS_INIT_NOT_PENDING``
SYS.LP.INIT            SYS.INIT not done → ``TDX_SYS_LP_INIT_NOT_PENDING``; this LP already
                       initialized → ``TDX_SYS_LP_INIT_DONE``. Accepted in any state after
                       SYS.INIT (module 1.5 supports LPs onlined after init; the 1.0 handler
                       accepted SYSINIT_DONE only)
SYS.CONFIG             not SYSINIT_DONE, or an LP of the platform (a present CPU) without
                       LP.INIT → ``TDX_SYS_CONFIG_NOT_PENDING``; RCX not a 512-aligned
                       address of host memory → ``OPERAND_INVALID|RCX``; RDX not in
                       ``[1, MAX_TDMRS]`` → ``OPERAND_INVALID|RDX``; R8 not a private KeyID →
                       ``OPERAND_INVALID|R8``; per TDMR i (detail = i in bits 7:0): a bad entry
                       PA → ``OPERAND_INVALID|RCX``; out of order/overlapping →
                       ``TDX_NON_ORDERED_TDMR``; base/size not 1 GiB multiples →
                       ``TDX_INVALID_TDMR``; reserved areas unsorted/outside →
                       ``TDX_NON_ORDERED_RESERVED_IN_TDMR``/``TDX_INVALID_RESERVED_IN_TDMR``;
                       a PAMT not 4K aligned or too small → ``TDX_INVALID_PAMT``; PAMTs
                       overlapping each other → ``TDX_PAMT_OVERLAP``
SYS.KEY.CONFIG         not SYSCONFIG_DONE → ``TDX_SYS_KEY_CONFIG_NOT_PENDING``; package done
                       → ``TDX_KEY_CONFIGURED`` (warning); the last package → SYS_READY
SYS.TDMR.INIT          RCX not 1 GiB aligned or not a TDMR base → ``OPERAND_INVALID|RCX``;
                       done → ``TDX_TDMR_ALREADY_INITIALIZED`` (warning); else initializes
                       ``TDMR_INIT_PAMT_ENTRIES`` 4K entries, RDX = next address rounded
                       down to 1 GiB. Before SYS_READY the dispatcher answers
                       ``TDX_SYS_NOT_READY``
=====================  ==================================================================

Not modelled (documented absence): CMR checks (every host frame is CMR memory), PAMT vs
TDMR-available-area overlap, SYS.RD/INFO/RDALL (their field ids are not in ``constants.py``),
SYS.LP.SHUTDOWN/SHUTDOWN/UPDATE.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Dict, List, Tuple

from tdxcore.constants import (
    MAX_RESERVED_AREAS,
    MAX_TDMRS,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAMT_ENTRY_SIZE,
    PAMT_LEVEL_SHIFTS,
    TDMR_ALIGN,
    TDMR_INFO_ALIGN,
    TDMR_INFO_SIZE,
    TDMR_INIT_PAMT_ENTRIES,
)
from tdxcore.module.tdx_module import Handler, SeamcallResult, SysState, Tdmr, result
from tdxcore.status import (  # type: ignore[attr-defined]
    OPERAND_ID_R8,
    OPERAND_ID_RCX,
    OPERAND_ID_RDX,
    TDX_INVALID_PAMT,
    TDX_INVALID_RESERVED_IN_TDMR,
    TDX_INVALID_TDMR,
    TDX_KEY_CONFIGURED,
    TDX_NON_ORDERED_RESERVED_IN_TDMR,
    TDX_NON_ORDERED_TDMR,
    TDX_OPERAND_INVALID,
    TDX_PAMT_OVERLAP,
    TDX_SUCCESS,
    TDX_SYS_CONFIG_NOT_PENDING,
    TDX_SYS_INIT_NOT_PENDING,
    TDX_SYS_KEY_CONFIG_NOT_PENDING,
    TDX_SYS_LP_INIT_DONE,
    TDX_SYS_LP_INIT_NOT_PENDING,
    TDX_TDMR_ALREADY_INITIALIZED,
    Leaf,
)

if TYPE_CHECKING:
    from tdxcore.module.tdx_module import TdxModule

__all__ = ["SYS_HANDLERS", "MAX_TDMRS", "MAX_RESERVED_AREAS", "PAMT_ENTRY_SIZE", "TDMR_ALIGN",
           "TDMR_INFO_SIZE", "TDMR_INFO_ALIGN", "TDMR_INIT_PAMT_ENTRIES", "PAMT_LEVEL_SHIFTS"]

# Module sysinfo values live in constants.py (STYLE §2.1: each upstream value once).

_HDR = struct.Struct("<8Q")
_RSVD = struct.Struct("<QQ")


def _host_pa_ok(tdx: "TdxModule", pa: int, size: int, align: int) -> bool:
    return pa % align == 0 and pa + size <= tdx.host.nr_frames << PAGE_SHIFT


def _read(tdx: "TdxModule", pa: int, size: int) -> bytes:
    """Read ``size`` bytes of host memory at ``pa`` under KeyID 0 (may cross frames)."""
    out = bytearray()
    while size:
        off = pa & (PAGE_SIZE - 1)
        n = min(size, PAGE_SIZE - off)
        out += tdx.host.frame_read(pa >> PAGE_SHIFT, off, n, 0)
        pa, size = pa + n, size - n
    return bytes(out)


def tdh_sys_init(tdx: "TdxModule", cpu: int, rcx: int, rdx: int, r8: int, r9: int, r10: int,
                 r11: int) -> SeamcallResult:
    """TDH.SYS.INIT: SYSINIT_PENDING → SYSINIT_DONE."""
    if rcx != 0:
        return result(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    if tdx.sys_state != SysState.SYSINIT_PENDING:
        return result(TDX_SYS_INIT_NOT_PENDING)
    tdx.sys_state = SysState.SYSINIT_DONE
    return result(TDX_SUCCESS)


def tdh_sys_lp_init(tdx: "TdxModule", cpu: int, rcx: int, rdx: int, r8: int, r9: int, r10: int,
                    r11: int) -> SeamcallResult:
    """TDH.SYS.LP.INIT: mark logical processor ``cpu`` initialized."""
    if tdx.sys_state == SysState.SYSINIT_PENDING:
        return result(TDX_SYS_LP_INIT_NOT_PENDING)
    if cpu in tdx.lp_initialized:
        return result(TDX_SYS_LP_INIT_DONE)
    tdx.lp_initialized[cpu] = None
    return result(TDX_SUCCESS)


def _parse_tdmr(raw: bytes) -> Tuple[int, int, Tuple[Tuple[int, int], ...], Tuple[Tuple[int, int], ...]]:
    h = _HDR.unpack_from(raw, 0)
    pamt = ((h[6], h[7]), (h[4], h[5]), (h[2], h[3]))  # 4K, 2M, 1G as (base, size)
    rsvd: List[Tuple[int, int]] = []
    for j in range(MAX_RESERVED_AREAS):
        off, size = _RSVD.unpack_from(raw, _HDR.size + j * _RSVD.size)
        if size == 0:
            break  # a NULL entry ends the list
        rsvd.append((off, size))
    return h[0], h[1], pamt, tuple(rsvd)


def tdh_sys_config(tdx: "TdxModule", cpu: int, rcx: int, rdx: int, r8: int, r9: int, r10: int,
                   r11: int) -> SeamcallResult:
    """TDH.SYS.CONFIG: take the TDMR list and the global KeyID; SYSINIT_DONE → SYSCONFIG_DONE."""
    host = tdx.host
    if tdx.sys_state != SysState.SYSINIT_DONE:
        return result(TDX_SYS_CONFIG_NOT_PENDING)
    if any(c not in tdx.lp_initialized for c in range(host.nr_cpus)):
        return result(TDX_SYS_CONFIG_NOT_PENDING)
    if not _host_pa_ok(tdx, rcx, 8, TDMR_INFO_ALIGN):
        return result(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    if not 1 <= rdx <= MAX_TDMRS:
        return result(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    if not _host_pa_ok(tdx, rcx, rdx * 8, TDMR_INFO_ALIGN):
        return result(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    if not host.keyids.is_private(r8):
        return result(TDX_OPERAND_INVALID | OPERAND_ID_R8)
    pas = struct.unpack(f"<{rdx}Q", _read(tdx, rcx, rdx * 8))
    tdmrs: List[Tdmr] = []
    pamts: List[Tuple[int, int]] = []
    for i, pa in enumerate(pas):
        if not _host_pa_ok(tdx, pa, TDMR_INFO_SIZE, TDMR_INFO_ALIGN):
            return result(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
        base, size, pamt, rsvd = _parse_tdmr(_read(tdx, pa, TDMR_INFO_SIZE))
        if tdmrs and (base < tdmrs[-1].base or base < tdmrs[-1].end):
            return result(TDX_NON_ORDERED_TDMR | i)
        if base % TDMR_ALIGN or size % TDMR_ALIGN or size == 0:
            return result(TDX_INVALID_TDMR | i)
        prev_end = 0
        for off, rsize in rsvd:
            if off % PAGE_SIZE or rsize % PAGE_SIZE or off + rsize > size:
                return result(TDX_INVALID_RESERVED_IN_TDMR | i)
            if off < prev_end:
                return result(TDX_NON_ORDERED_RESERVED_IN_TDMR | i)
            prev_end = off + rsize
        for (pbase, psize), shift in zip(pamt, PAMT_LEVEL_SHIFTS, strict=True):
            if pbase % PAGE_SIZE or psize % PAGE_SIZE or psize < (size >> shift) * PAMT_ENTRY_SIZE:
                return result(TDX_INVALID_PAMT | i)
            for qb, qs in pamts:
                if pbase < qb + qs and qb < pbase + psize:
                    return result(TDX_PAMT_OVERLAP | i)
            pamts.append((pbase, psize))
        tdmrs.append(Tdmr(base, size, base, pamt, rsvd))
    # All checks passed: the call cannot fail from here on.
    tdx.tdmrs = tdmrs
    tdx.global_keyid = r8
    tdx.pkg_configured = {}
    tdx.sys_state = SysState.SYSCONFIG_DONE
    return result(TDX_SUCCESS)


def tdh_sys_key_config(tdx: "TdxModule", cpu: int, rcx: int, rdx: int, r8: int, r9: int, r10: int,
                       r11: int) -> SeamcallResult:
    """TDH.SYS.KEY.CONFIG: program the global KeyID on ``cpu``'s package; last one → SYS_READY."""
    if tdx.sys_state != SysState.SYSCONFIG_DONE:
        return result(TDX_SYS_KEY_CONFIG_NOT_PENDING)
    pkg = tdx.host.package_of(cpu)
    if pkg in tdx.pkg_configured:
        return result(TDX_KEY_CONFIGURED)
    tdx.pkg_configured[pkg] = None
    if len(tdx.pkg_configured) == tdx.host.nr_packages:
        tdx.sys_state = SysState.SYS_READY
    return result(TDX_SUCCESS)


def tdh_sys_tdmr_init(tdx: "TdxModule", cpu: int, rcx: int, rdx: int, r8: int, r9: int, r10: int,
                      r11: int) -> SeamcallResult:
    """TDH.SYS.TDMR.INIT: initialize the next chunk of PAMT entries of the TDMR at RCX."""
    if rcx % TDMR_ALIGN:
        return result(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    t = next((t for t in tdx.tdmrs if t.base == rcx), None)
    if t is None:
        return result(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    if t.last_initialized >= t.end:
        return result(TDX_TDMR_ALREADY_INITIALIZED)
    lo = t.last_initialized
    hi = min(t.end, lo + TDMR_INIT_PAMT_ENTRIES * PAGE_SIZE)
    # Initializing the PAMT marks every frame of a reserved area PT_RSVD (PAMTs included);
    # frames beyond the host's memory (the TDMR's 1 GiB tail) have no PAMT entry in the model.
    nr = tdx.host.nr_frames
    for off, size in t.rsvd:
        a, b = max(lo, t.base + off), min(hi, t.base + off + size)
        for pfn in range(a >> PAGE_SHIFT, min(b >> PAGE_SHIFT, nr)):
            tdx.host.pamt.reserve(pfn)
    t.last_initialized = hi
    return result(TDX_SUCCESS, rdx=hi & ~(TDMR_ALIGN - 1))


SYS_HANDLERS: Dict[Leaf, Handler] = {
    Leaf.TDH_SYS_INIT: tdh_sys_init,
    Leaf.TDH_SYS_LP_INIT: tdh_sys_lp_init,
    Leaf.TDH_SYS_CONFIG: tdh_sys_config,
    Leaf.TDH_SYS_KEY_CONFIG: tdh_sys_key_config,
    Leaf.TDH_SYS_TDMR_INIT: tdh_sys_tdmr_init,
}
