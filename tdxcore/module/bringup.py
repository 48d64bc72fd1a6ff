"""The kernel's TDX module bring-up: detect, then initialize once (``tdx_enable()``).

tdx-facts §6; SPEC §4.10; seed ``001_…``. :func:`enable_op` is the one implementation, a
generator (SPEC §5): it takes ``tdx_module_lock`` with ``Wait``, yields ``PREEMPT`` between
TDH.SYS.TDMR.INIT chunks (the kernel's ``cond_resched()``), and returns 0 or raises
:class:`~tdxcore.errors.HostError`. ``TdxModule.enable()`` drives it to completion.

Steps (each logged as a ``bringup`` event; errno on failure):

1. ``detect`` — SEAMRR enabled (else ``ENODEV``), at least 2 TDX KeyIDs (else ``ENODEV``), every
   present CPU booted once (else ``EINVAL``). A detect failure changes no state (SEAMRR and the
   KeyID partition are fixed, so those fail identically every time; a CPU can still be booted).
2. ``sys_init`` — TDH.SYS.INIT once, on the lowest online CPU.
3. ``lp_init`` — TDH.SYS.LP.INIT on every online CPU, ascending. The module requires every
   present LP to have done it before CONFIG, so a booted CPU that is offline now makes
   ``config`` fail with ``TDX_SYS_CONFIG_NOT_PENDING`` (``EIO``).
4. ``construct_tdmrs`` — TDX memory list (one block per package/NUMA node, the first 1 MiB left
   out), TDMRs 1 GiB aligned (``ENOSPC`` over ``MAX_TDMRS``), a PAMT per TDMR (16 B per entry per
   level, each level rounded to 4 KiB: about 1/256 of the TDMR; one contiguous allocation,
   ``ENOMEM``), reserved areas (holes and PAMTs, ascending; ``ENOSPC`` over
   ``MAX_RESERVED_AREAS``), TDMR_INFO structures written into host frames under KeyID 0.
5. ``config`` — TDH.SYS.CONFIG(PA array, #TDMRs, global KeyID).
6. ``key_config`` — TDH.SYS.KEY.CONFIG on the lowest online CPU of each package, serially
   (the WBINVD before it has no effect on model state).
7. ``tdmr_init`` — per TDMR, TDH.SYS.TDMR.INIT repeated until RDX reaches the TDMR's end.

Every SEAMCALL goes through ``sc_retry`` (``TDX_RND_NO_ENTROPY`` retried up to
``RDRAND_RETRY_LOOPS`` times, counted in ``nr_sc_retries``); any other non-success status fails
the step with ``EIO`` (tdx-facts §1.1 mapping). A failure after detect sets the sticky ERROR:
the PAMT and TDMR_INFO frames go back to the allocator and, since the module's PAMT metadata
lived in them, ``host.pamt`` returns to its pre-init (all PT_NDA) state. Every later
``enable()`` raises ``EINVAL`` at once (``tdx_enable()``'s TDX_MODULE_ERROR case), naming the
original failure, with no SEAMCALL.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, List, Optional, Tuple

from tdxcore.constants import LOW_RESERVED_FRAMES, PAGE_SHIFT, PAGE_SIZE, RDRAND_RETRY_LOOPS
from tdxcore.errors import HostError
from tdxcore.module.leaves.sys import (
    MAX_RESERVED_AREAS,
    MAX_TDMRS,
    PAMT_ENTRY_SIZE,
    PAMT_LEVEL_SHIFTS,
    TDMR_ALIGN,
    TDMR_INFO_SIZE,
)
from tdxcore.module.tdx_module import ModuleStatus, SeamcallResult
from tdxcore.sched import PREEMPT, WRITE, Wait
from tdxcore.status import TDX_RND_NO_ENTROPY, TDX_SUCCESS  # type: ignore[attr-defined]

if TYPE_CHECKING:
    from tdxcore.module.tdx_module import TdxModule

__all__ = ["enable_op", "detect", "TdmrPlan", "plan_tdmrs", "ACTOR"]

#: Actor name of bring-up events and SEAMCALLs.
ACTOR = "tdx_enable"


@dataclass(frozen=True)
class TdmrPlan:
    """One TDMR as the kernel builds it: range, PAMT frames and reserved areas (bytes)."""

    base: int
    size: int
    pamt_pfn: int
    pamt_sizes: Tuple[int, int, int]             # bytes of the 4K, 2M, 1G PAMT levels
    rsvd: Tuple[Tuple[int, int], ...]            # (offset, size) ascending

    @property
    def pamt_nr_frames(self) -> int:
        """Frames of this TDMR's PAMT (all three levels, contiguous)."""
        return sum(self.pamt_sizes) >> PAGE_SHIFT


def _event(tdx: "TdxModule", step: str, status: Optional[int], err: int, detail: str) -> None:
    tdx.host.events.emit("bringup", ACTOR, step, status, err, detail)


def detect(tdx: "TdxModule") -> None:
    """Raise ``HostError`` if the platform cannot run TDX now (no state change).

    Notes
    -----
    The seed's ``tdx_detect()`` checks (SEAMRR, KeyIDs, CPUs booted); 6.18 does the first two
    at boot in ``tdx_init()`` and returns ``-ENODEV`` from ``tdx_enable()`` without the feature.
    """
    host = tdx.host
    if not host.seamrr:
        msg = "SEAMRR is not enabled: no TDX module can be loaded"
        raise HostError(_errno.ENODEV, msg)
    if host.keyids.tdx_keyids < 2:
        msg = f"initialization failed: too few private KeyIDs available ({host.keyids.tdx_keyids})"
        raise HostError(_errno.ENODEV, msg)
    never = [c for c in range(host.nr_cpus) if not host.is_cpu_booted(c)]
    if never:
        msg = f"present CPUs never booted: {never}; TDX needs every present CPU booted once"
        raise HostError(_errno.EINVAL, msg)


def memory_blocks(tdx: "TdxModule") -> List[Tuple[int, int]]:
    """TDX memory list: ``[start, end)`` byte ranges, one per package, minus the first 1 MiB."""
    host = tdx.host
    per = host.memory // host.nr_packages
    low = LOW_RESERVED_FRAMES << PAGE_SHIFT
    out = []
    for p in range(host.nr_packages):
        s, e = max(p * per, low), (p + 1) * per
        if s < e:
            out.append((s, e))
    return out


def plan_tdmrs(tdx: "TdxModule") -> List[Tuple[int, int]]:
    """Return TDMR ``(base, size)`` ranges covering the memory list, 1 GiB aligned.

    Mirrors ``fill_out_tdmrs()``: a block already covered by the previous TDMR extends nothing.
    """
    tdmrs: List[Tuple[int, int]] = []
    for s, e in memory_blocks(tdx):
        start = s & ~(TDMR_ALIGN - 1)
        end = -(-e // TDMR_ALIGN) * TDMR_ALIGN
        if tdmrs and start < tdmrs[-1][0] + tdmrs[-1][1]:
            start = tdmrs[-1][0] + tdmrs[-1][1]
        if start >= end:
            continue
        if len(tdmrs) == MAX_TDMRS:
            msg = f"construct_tdmrs: more than MAX_TDMRS={MAX_TDMRS} TDMRs needed"
            raise HostError(_errno.ENOSPC, msg)
        tdmrs.append((start, end - start))
    return tdmrs


def _pamt_sizes(size: int) -> Tuple[int, int, int]:
    return tuple(-(-((size >> s) * PAMT_ENTRY_SIZE) // PAGE_SIZE) * PAGE_SIZE
                 for s in PAMT_LEVEL_SHIFTS)  # type: ignore[return-value]


def _construct(tdx: "TdxModule") -> Tuple[List[TdmrPlan], int]:
    """Build TDMRs, allocate PAMTs and TDMR_INFO frames; return the plans and the PA array PA."""
    host = tdx.host
    ranges = plan_tdmrs(tdx)
    for _base, size in ranges:
        sizes = _pamt_sizes(size)
        pfn = host.frames.alloc_contig(sum(sizes) >> PAGE_SHIFT)
        tdx.pamt_frames.append((pfn, sum(sizes) >> PAGE_SHIFT))
    blocks = memory_blocks(tdx)
    plans: List[TdmrPlan] = []
    for (base, size), (pfn, _nr) in zip(ranges, tdx.pamt_frames, strict=True):
        areas: List[Tuple[int, int]] = []
        pos = base
        for s, e in blocks:  # holes between memory blocks (and below the first)
            s, e = max(s, base), min(e, base + size)
            if s >= e:
                continue
            if s > pos:
                areas.append((pos, s - pos))
            pos = max(pos, e)
        if pos < base + size:
            areas.append((pos, base + size - pos))
        for ppfn, pnr in tdx.pamt_frames:  # every PAMT inside this TDMR
            ps, pe = max(ppfn << PAGE_SHIFT, base), min((ppfn + pnr) << PAGE_SHIFT, base + size)
            if ps < pe:
                areas.append((ps, pe - ps))
        areas.sort()
        merged: List[Tuple[int, int]] = []
        for s, n in areas:  # the kernel refuses overlaps; merge touching/overlapping ones
            if merged and s <= merged[-1][0] + merged[-1][1]:
                ms, mn = merged[-1]
                merged[-1] = (ms, max(ms + mn, s + n) - ms)
            else:
                merged.append((s, n))
        if len(merged) > MAX_RESERVED_AREAS:
            msg = (f"construct_tdmrs: TDMR at {base:#x} needs {len(merged)} reserved areas "
                   f"(max {MAX_RESERVED_AREAS})")
            raise HostError(_errno.ENOSPC, msg)
        plans.append(TdmrPlan(base, size, pfn, _pamt_sizes(size),
                              tuple((s - base, n) for s, n in merged)))
    # TDMR_INFO array: one frame of PAs, then 512-byte TDMR_INFO slots, 8 per frame.
    per_frame = PAGE_SIZE // TDMR_INFO_SIZE
    nr_info = -(-len(plans) // per_frame)
    for _ in range(1 + nr_info):
        tdx.tdmr_info_frames.append(host.alloc_frame())
    pas = []
    for i, p in enumerate(plans):
        fpfn = tdx.tdmr_info_frames[1 + i // per_frame]
        off = (i % per_frame) * TDMR_INFO_SIZE
        pa4k = p.pamt_pfn << PAGE_SHIFT
        s4k, s2m, s1g = p.pamt_sizes
        hdr = struct.pack("<8Q", p.base, p.size, pa4k + s4k + s2m, s1g, pa4k + s4k, s2m, pa4k, s4k)
        rs = b"".join(struct.pack("<QQ", o, n) for o, n in p.rsvd)
        host.frame_write(fpfn, off, (hdr + rs).ljust(TDMR_INFO_SIZE, b"\0"), 0)
        pas.append((fpfn << PAGE_SHIFT) + off)
    host.frame_write(tdx.tdmr_info_frames[0], 0, struct.pack(f"<{len(pas)}Q", *pas), 0)
    return plans, tdx.tdmr_info_frames[0] << PAGE_SHIFT


def _sc(tdx: "TdxModule", step: str, call: Any) -> SeamcallResult:
    """``sc_retry``: reissue on TDX_RND_NO_ENTROPY (bounded, counted); raise EIO on failure."""
    res = call()
    tries = 0
    while res.status == TDX_RND_NO_ENTROPY and tries < RDRAND_RETRY_LOOPS:
        tries += 1
        tdx.host.count("nr_sc_retries")
        res = call()
    if res.status != TDX_SUCCESS:
        msg = f"{step}: SEAMCALL failed with {res.status}"
        e = HostError(_errno.EIO, msg)
        e.status = res.status  # type: ignore[attr-defined]
        raise e
    return res


def _fail(tdx: "TdxModule", step: str, e: HostError) -> None:
    """Enter the sticky ERROR: free PAMT/TDMR_INFO frames and forget PAMT metadata."""
    host = tdx.host
    status = getattr(e, "status", None)
    _event(tdx, step, None if status is None else int(status), e.errno or 0, str(e))
    for pfn, nr in tdx.pamt_frames:
        for p in range(pfn, pfn + nr):
            host.free_frame(p)
    for p in tdx.tdmr_info_frames:
        host.free_frame(p)
    tdx.pamt_frames, tdx.tdmr_info_frames = [], []
    host._reset_pamt()
    tdx.status = ModuleStatus.ERROR
    tdx.error = e
    host.count("nr_bringup_failures")


def enable_op(tdx: "TdxModule") -> Generator[Any, Any, int]:
    """Detect, then initialize the module once; return 0 or raise ``HostError`` (module docstring).

    Notes
    -----
    Mirrors ``tdx_enable()`` / ``init_tdx_module()`` in ``arch/x86/virt/vmx/tdx/tdx.c`` (6.18)
    plus ``tdx_cpu_enable()`` and the seed's detection; SPEC §4.10, §5.
    """
    owner = yield Wait(tdx.module_lock, WRITE)
    try:
        with tdx.lock:
            if tdx.status == ModuleStatus.INITIALIZED:
                return 0
            if tdx.status == ModuleStatus.ERROR:
                msg = f"TDX module initialization failed earlier (sticky ERROR): {tdx.error}"
                raise HostError(_errno.EINVAL, msg) from tdx.error
            try:
                detect(tdx)
            except HostError as e:
                _event(tdx, "detect", None, e.errno or 0, str(e))
                raise
            _event(tdx, "detect", None, 0, "")
        step = "sys_init"
        try:
            host = tdx.host
            with tdx.lock:
                if not tdx.kernel_sysinit_done:
                    _sc(tdx, step, lambda: tdx.tdh_sys_init(actor=ACTOR))
                    tdx.kernel_sysinit_done = True
                _event(tdx, step, TDX_SUCCESS, 0, "")
                step = "lp_init"
                for c in range(host.nr_cpus):
                    if host.is_cpu_online(c) and c not in tdx.kernel_lp_done:
                        _sc(tdx, step, lambda c=c: tdx.tdh_sys_lp_init(c, actor=ACTOR))
                        tdx.kernel_lp_done[c] = None
                _event(tdx, step, TDX_SUCCESS, 0, "")
                step = "construct_tdmrs"
                plans, array_pa = _construct(tdx)
                _event(tdx, step, None, 0, f"{len(plans)} TDMRs, "
                       f"{sum(p.pamt_nr_frames for p in plans) * PAGE_SIZE >> 10} KB PAMT")
                step = "config"
                gk = host.keyids.global_keyid
                _sc(tdx, step, lambda: tdx.tdh_sys_config(array_pa, len(plans), gk, actor=ACTOR))
                _event(tdx, step, TDX_SUCCESS, 0, "")
                step = "key_config"
                for pkg in range(host.nr_packages):
                    cpu = host.first_online_cpu(pkg)
                    _sc(tdx, step, lambda cpu=cpu: tdx.tdh_sys_key_config(cpu, actor=ACTOR))
                _event(tdx, step, TDX_SUCCESS, 0, "")
                step = "tdmr_init"
            for p in plans:
                nxt = p.base
                while nxt < p.base + p.size:
                    with tdx.lock:
                        res = _sc(tdx, step, lambda p=p: tdx.tdh_sys_tdmr_init(p.base, actor=ACTOR))
                    nxt = res.rdx
                    yield PREEMPT  # cond_resched() between chunks
            with tdx.lock:
                _event(tdx, step, TDX_SUCCESS, 0, "")
                tdx.status = ModuleStatus.INITIALIZED
                _event(tdx, "done", TDX_SUCCESS, 0, "")
            return 0
        except HostError as e:
            with tdx.lock:
                _fail(tdx, step, e)
            raise
    finally:
        tdx.module_lock.release(owner, WRITE)

