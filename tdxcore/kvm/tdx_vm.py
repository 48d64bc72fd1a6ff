"""``TdxVm``: the TD control-structure lifecycle of KVM (SPEC §3.2, §4.9; issue 5 items 1, 5, 6).

``kvm.create_vm(VmType.TDX)`` makes one (enabling the module on demand). Then, as KVM 6.18's
``arch/x86/kvm/vmx/tdx.c``:

* ``KVM_TDX_INIT_VM`` (:meth:`TdxVm.init_vm`): validation, HKID, TDR + TDCS pages, the package
  check, MNG.CREATE under :data:`tdx_lock`, KEY.CONFIG per package, ADDCX per TDCS page, MNG.INIT,
  MNG.RD of the TSC offset/multiplier → ``TdState.INITIALIZED``. A failure after MNG.CREATE runs
  the full teardown (release HKID, reclaim control pages), which may leak (tdx-facts §5.8).
* ``KVM_CREATE_VCPU`` (:meth:`TdxVm.create_vcpu`) and ``KVM_TDX_INIT_VCPU``
  (:meth:`tdxcore.kvm.vcpu.Vcpu.init_vcpu`).
* ``KVM_TDX_FINALIZE_VM`` (:meth:`TdxVm.finalize_vm`) → ``TdState.RUNNABLE``.
* Teardown when the last reference goes (``kvm_destroy_vm``): :meth:`TdxVm._mmu_release_hkid`
  (VP.FLUSH, VPFLUSHDONE, CACHE.WB per package, KEY.FREEID), :meth:`TdxVm._vcpu_free` per vCPU
  (RECLAIM TDCX then TDVPR), :meth:`TdxVm._reclaim_td_control_pages` (TDCS, TDR, WBINVD of the
  TDR with the global KeyID). Every frame or HKID that cannot be given back is abandoned on
  purpose and recorded as a :class:`Leak` (``vm.leaks``; also ``host.leaks``).

SEAMCALL statuses become errnos only here (STYLE §2.3); ``kvm/ioctl.py`` raises them.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Generator, List, NamedTuple, Optional, Sequence, Set, Tuple

from tdxcore.constants import (
    KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_VCPU_IDS,
    KVM_MAX_VCPUS,
    KVM_TDX_INIT_VM_RESERVED,
    KVM_TDX_SUPPORTED_ATTRS,
    MNG_RD_FIELD_TSC_MULTIPLIER,
    MNG_RD_FIELD_TSC_OFFSET,
    PAGE_SHIFT,
    PAGE_SIZE,
    TD_MAX_VCPUS_LIMIT,
    TD_XFAM_FIXED1,
    TD_XFAM_SUPPORTED,
    TDCS_NR_PAGES,
    TDVPS_NR_PAGES,
    TDX_EXTENDMR_CHUNKSIZE,
    TDX_SC_RETRIES,
    TDX_SEAMCALL_RETRIES,
    MemAttr,
    MemFlag,
    VmType,
)
from tdxcore.errors import HostError, TdxTypeError, TdxValueError, check_int
from tdxcore.kvm.gmem import GuestMemfd
from tdxcore.kvm.ioctl import OK, Ret, fail, ioctl
from tdxcore.kvm.kvm import Kvm
from tdxcore.kvm.mmu import MirrorMmu, SpteState
from tdxcore.kvm.tdx_mmu import TdxMirrorOps
from tdxcore.kvm.vcpu import Vcpu, VcpuTdState
from tdxcore.kvm.vm import Vm
from tdxcore.module.td import TdParams
from tdxcore.sched import PREEMPT, WRITE, KLock, Wait, run_to_completion
from tdxcore.status import (  # type: ignore[attr-defined]
    TDX_FLUSHVP_NOT_DONE,
    TDX_INTERRUPTED_RESUMABLE,
    TDX_OPERAND_BUSY,
    TDX_OPERAND_INVALID,
    TDX_RND_NO_ENTROPY,
    TDX_SUCCESS,
    TDX_VCPU_NOT_ASSOCIATED,
)

__all__ = ["TdxVm", "TdState", "Leak", "CpuidEntry", "TdxCapabilities", "tdx_lock", "sc_retry",
           "LEAK_KINDS"]

#: ``tdx_lock`` (the global mutex of KVM's tdx.c): MNG.CREATE, and VPFLUSHDONE → CACHE.WB →
#: KEY.FREEID, so KOT-locking SEAMCALLs of different TDs never contend (tdx-facts §4.3).
tdx_lock = KLock("tdx_lock")

#: ``Leak.what`` values.
LEAK_KINDS = ("tdr", "tdcs", "tdvpr", "tdcx", "sept", "private", "hkid")

#: x86 ``CPUID.0x80000008``: EAX[7:0] = physical, EAX[23:16] = guest physical address bits.
CPUID_LEAF_ADDR_SIZES = 0x80000008


class TdState(enum.IntEnum):
    """``enum kvm_tdx_state`` (6.18)."""

    UNINITIALIZED = 0
    INITIALIZED = 1
    RUNNABLE = 2


@dataclass(frozen=True)
class Leak:
    """A frame or HKID the TD's teardown abandoned on purpose (SPEC §4.9; tdx-facts §5.8).

    ``pfn``/``page_type`` are None for an HKID; ``hkid`` is the TD's; ``event_index`` is the
    ``leak`` event in ``host.events`` (the same record is in ``host.leaks``).
    """

    pfn: Optional[int]
    page_type: Optional[int]
    what: str
    hkid: Optional[int]
    reason: str
    event_index: int


@dataclass(frozen=True)
class CpuidEntry:
    """``struct kvm_cpuid_entry2`` (``padding`` is its 3 reserved u32, which must be 0)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    padding: Tuple[int, int, int] = (0, 0, 0)


class TdxCapabilities(NamedTuple):
    """``struct kvm_tdx_capabilities`` (the fields the model fills)."""

    supported_attrs: int
    supported_xfam: int
    cpuid: Tuple[CpuidEntry, ...]


#: CPUID bits userspace may configure (model: only the guest-physical-address width).
_CONFIGURABLE_CPUID = (CpuidEntry(CPUID_LEAF_ADDR_SIZES, eax=0x00FF0000),)


def sc_retry(call: Callable[[], Any]) -> Any:
    """``sc_retry``: reissue a SEAMCALL up to ``TDX_SC_RETRIES`` times while it says RND_NO_ENTROPY."""
    res = call()
    for _ in range(TDX_SC_RETRIES - 1):
        if res.status != TDX_RND_NO_ENTROPY:
            break
        res = call()
    return res


def _host_fail(e: HostError, what: str) -> Ret:
    """Pass a host-level failure (``ida_alloc``, ``alloc_page``, ``tdx_enable``) up as its errno."""
    return fail(int(e.errno or _errno.EIO), what)


def _u(name: str, value: Any, bits: int) -> int:
    return check_int(name, value, 0, 1 << bits)


def _entries(cpuid: Any) -> Tuple[CpuidEntry, ...]:
    if isinstance(cpuid, (str, bytes)) or not hasattr(cpuid, "__iter__"):
        msg = f"cpuid={cpuid!r} must be a sequence of CpuidEntry"
        raise TdxTypeError(msg, name="cpuid", value=cpuid)
    out = []
    for i, e in enumerate(cpuid):
        if not isinstance(e, CpuidEntry):
            msg = f"cpuid[{i}]={e!r} must be a CpuidEntry"
            raise TdxTypeError(msg, name="cpuid", value=e)
        for f in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
            _u(f"cpuid[{i}].{f}", getattr(e, f), 32)
        if len(e.padding) != 3:
            msg = f"cpuid[{i}].padding={e.padding!r} must be 3 u32"
            raise TdxValueError(msg, name="cpuid", value=e.padding)
        for p in e.padding:
            _u(f"cpuid[{i}].padding", p, 32)
        out.append(e)
    return tuple(out)


class TdxVm(Vm):
    """A TD (``KVM_X86_TDX_VM``); made by ``kvm.create_vm(VmType.TDX)``.

    Attributes
    ----------
    td_state : TdState
        ``kvm_tdx->state``.
    hkid : int or None
        The HKID while assigned (``kvm_tdx->hkid``; None = -1).
    tdr : int or None
        The TDR frame while KVM holds it.
    tdcs : list of int
        TDCS frames MNG.ADDCX accepted (still held).
    vcpus : list of Vcpu
        Created vCPUs, in creation order.
    nr_premapped : int
        Pages mapped in the mirror but not yet PAGE.ADDed (6.18; FINALIZE needs 0).
    mmu : MirrorMmu
        The mirror root (KVM's view of the private mappings; ``kvm/mmu.py``).
    wait_for_sept_zap : bool
        ``kvm_tdx->wait_for_sept_zap``: set while a zap retries after BUSY (no TD entry then).
    last_hw_error : int
        ``cmd.hw_error`` of the last TDX sub-ioctl (the module status it reported, or 0).
    """

    def __init__(self, kvm: Kvm, vm_type: VmType, vm_id: int) -> None:
        super().__init__(kvm, vm_type, vm_id)
        self.td_state = TdState.UNINITIALIZED
        self.max_vcpus = min(KVM_MAX_VCPUS, kvm.host.nr_cpus, TD_MAX_VCPUS_LIMIT)
        self.hkid: Optional[int] = None
        self._td_hkid: Optional[int] = None        # the HKID this TD had (for leak records)
        self.tdr: Optional[int] = None
        self.tdcs: List[int] = []
        self.vcpus: List[Vcpu] = []
        self.nr_premapped = 0
        self.wait_for_sept_zap = False
        self.mmu = MirrorMmu(4, TdxMirrorOps(self), self.mmu_lock)
        self._gmem_prepared: Set[Tuple[int, int]] = set()   # (gmem fd, index) populated ("prepared")
        self.pre_fault_allowed = False
        self.attributes = 0
        self.xfam = 0
        self.gpaw = 0
        self.cpuid: Tuple[CpuidEntry, ...] = ()
        self.tsc_offset = 0
        self.tsc_multiplier = 0
        self.last_hw_error = 0
        self._leaks: List[Leak] = []

    def __repr__(self) -> str:
        return (f"TdxVm(id={self.id}, fd={self.fd}, {self.td_state.name}, hkid={self.hkid}, "
                f"vcpus={len(self.vcpus)}, refs={self._refs}, leaks={len(self._leaks)}, "
                f"destroyed={self._destroyed})")

    @classmethod
    def _pre_create(cls, kvm: Kvm) -> Ret:
        """Enable the module on the first TD (upstream does it at kvm_intel load)."""
        try:
            kvm.host.tdx.enable()
        except HostError as e:
            return _host_fail(e, f"TDX module: {e}")
        return OK

    # ------------------------------------------------------------------ properties
    @property
    def pinned_pfns(self) -> frozenset:
        """Private frames a failed zap leaked (``Leak.what == "private"``): never freed."""
        return frozenset(lk.pfn for lk in self._leaks if lk.what == "private" and lk.pfn is not None)

    @property
    def gpa_shared_mask(self) -> int:
        """The shared bit: GPA bit 47 (GPAW 48) or 51 (GPAW 52); 0 before KVM_TDX_INIT_VM."""
        return 1 << (self.gpaw - 1) if self.gpaw else 0

    @property
    def leaks(self) -> Tuple[Leak, ...]:
        """What this TD's teardown abandoned, in order."""
        return tuple(self._leaks)

    def state_bytes(self) -> bytes:
        """Serialize canonically: the base VM's bytes, ``<BB`` terminated and wait_for_sept_zap, then the TD.

        ``<BqqHQQQ`` TD state, hkid (-1), tdr (-1), TDCS count, premapped, attributes, xfam;
        ``<Q`` each TDCS; ``<H`` vCPUs and each vCPU's ``state_bytes``; the mirror's
        ``state_bytes``; ``<Q`` populated gmem pages then ``<qq`` (fd, index) each, ascending;
        ``<H`` leaks and per leak ``<qqqq`` pfn, page_type, hkid (-1 none),
        event and the ``what`` bytes + NUL.
        """
        parts = [super().state_bytes(),
                 struct.pack("<BB", self.is_terminated, self.wait_for_sept_zap),
                 struct.pack(f"<BqqHQQQ{len(self.tdcs)}Q", int(self.td_state),
                             -1 if self.hkid is None else self.hkid, -1 if self.tdr is None else self.tdr,
                             len(self.tdcs), self.nr_premapped, self.attributes, self.xfam, *self.tdcs),
                 struct.pack("<H", len(self.vcpus))]
        parts += [v.state_bytes() for v in self.vcpus]
        parts.append(self.mmu.state_bytes())
        prepared = sorted(self._gmem_prepared)
        parts.append(struct.pack(f"<Q{2 * len(prepared)}q", len(prepared),
                                 *(x for fi in prepared for x in fi)))
        parts.append(struct.pack("<H", len(self._leaks)))
        for lk in self._leaks:
            parts.append(struct.pack("<qqqq", -1 if lk.pfn is None else lk.pfn,
                                     -1 if lk.page_type is None else lk.page_type,
                                     -1 if lk.hkid is None else lk.hkid, lk.event_index)
                         + lk.what.encode() + b"\0")
        return b"".join(parts)

    # ------------------------------------------------------------------ helpers
    def _leak(self, pfn: Optional[int], what: str, reason: str) -> None:
        host = self.kvm.host
        pt = None if pfn is None else int(host.pamt.page_type(pfn))
        rec = host.record_leak(pfn, pt, what, self._td_hkid, reason)
        self._leaks.append(Leak(rec.pfn, rec.page_type, rec.what, rec.hkid, rec.reason, rec.event_index))

    def _check_tdx_cmd(self, hw_error: int) -> Ret:
        """``tdx_vm_ioctl``: userspace never sets ``hw_error`` (the kernel fills it)."""
        if hw_error:
            return fail(_errno.EINVAL, f"hw_error={hw_error:#x} must be 0 on input")
        return OK

    def _check_vcpu_ioctl(self, hw_error: int) -> Ret:
        """``tdx_vcpu_ioctl``: HKID assigned and TD not RUNNABLE, then ``hw_error`` zero."""
        if self.hkid is None or self.td_state == TdState.RUNNABLE:
            return fail(_errno.EINVAL, f"TD is {self.td_state.name} "
                        f"({'no HKID' if self.hkid is None else 'already finalized'})")
        return self._check_tdx_cmd(hw_error)

    # ------------------------------------------------------------------ sub-ioctls
    def capabilities(self, nent: int = KVM_MAX_CPUID_ENTRIES, *, hw_error: int = 0) -> TdxCapabilities:
        """``KVM_TDX_CAPABILITIES``: supported attributes, XFAM and configurable CPUID.

        Raises
        ------
        KvmError
            EINVAL for ``hw_error``; E2BIG if ``nent`` is below the number of CPUID entries.
        """
        n = _u("nent", nent, 32)
        hw = _u("hw_error", hw_error, 64)

        def op() -> Generator[Any, Any, Ret]:
            yield from ()
            ret = self._check_tdx_cmd(hw)
            if ret[0] < 0:
                return ret
            if n < len(_CONFIGURABLE_CPUID):
                return fail(_errno.E2BIG, f"cpuid.nent={n} < {len(_CONFIGURABLE_CPUID)} entries")
            return OK

        ioctl(self.kvm.host, "KVM_TDX_CAPABILITIES", self.id, self._guard(op()))
        return TdxCapabilities(KVM_TDX_SUPPORTED_ATTRS, TD_XFAM_SUPPORTED, _CONFIGURABLE_CPUID)

    def get_cpuid(self) -> Tuple[CpuidEntry, ...]:
        """``KVM_TDX_GET_CPUID`` (model: VM-scope): the TD's CPUID with the address sizes leaf.

        Raises
        ------
        KvmError
            EINVAL before INIT_VM (no TD to read); EIO on a dead VM.
        """
        out: List[Tuple[CpuidEntry, ...]] = []

        def op() -> Generator[Any, Any, Ret]:
            yield from ()
            if self.hkid is None or self.td_state == TdState.UNINITIALIZED:
                return fail(_errno.EINVAL, "TD is not initialized")
            ents = [e for e in self.cpuid if e.function != CPUID_LEAF_ADDR_SIZES]
            ents.append(CpuidEntry(CPUID_LEAF_ADDR_SIZES, eax=self.gpaw | (self.gpaw << 16)))
            out.append(tuple(sorted(ents, key=lambda e: (e.function, e.index))))
            return OK

        ioctl(self.kvm.host, "KVM_TDX_GET_CPUID", self.id, self._guard(op()))
        return out[0]

    def init_vm(self, gpaw: int = 48, attributes: int = 0, xfam: int = TD_XFAM_FIXED1,
                cpuid: Sequence[CpuidEntry] = (), *, flags: int = 0, hw_error: int = 0,
                reserved: Sequence[int] = (), cpuid_padding: int = 0) -> None:
        """``KVM_MEMORY_ENCRYPT_OP(KVM_TDX_INIT_VM)``: build the TD's control structures.

        Parameters
        ----------
        gpaw : int
            Guest physical address width (upstream reads it from CPUID 0x80000008 EAX[23:16]).
        attributes, xfam : int
            ``kvm_tdx_init_vm`` fields (u64); XFAM's fixed-1 bits are added for TD_PARAMS.
        cpuid : sequence of CpuidEntry
            ``cpuid.entries`` (at most 256).
        flags, hw_error : int
            ``cmd.flags`` and ``cmd.hw_error`` (both must be 0).
        reserved : sequence of int
            ``reserved[12]`` (u64; must be 0; missing = 0). ``cpuid_padding`` is ``cpuid.padding``.

        Raises
        ------
        KvmError
            In upstream order: EINVAL hw_error set (``tdx_vm_ioctl``); EINVAL state not
            UNINITIALIZED; EINVAL flags; E2BIG nent > 256; EINVAL reserved / padding; EBUSY
            vCPUs exist; EINVAL attributes or xfam unsupported, GPAW not 48/52. Then ENOSPC (no
            HKID), ENOMEM (no frame), EIO (a package with no online CPU), EAGAIN (RND_NO_ENTROPY
            on CREATE/ADDCX after ``sc_retry``), EINVAL with ``hw_error`` (MNG.INIT
            OPERAND_INVALID), EIO (any other SEAMCALL failure; KEY.CONFIG also KVM_BUGs).

        Notes
        -----
        ``tdx_td_init`` / ``setup_tdparams`` / ``__tdx_td_init`` (6.18); tdx-facts §5.3;
        anchors §2.3. A failure leaves nothing changed but the frames/HKID leaks §5.8 predicts.
        """
        g = _u("gpaw", gpaw, 8)
        a = _u("attributes", attributes, 64)
        x = _u("xfam", xfam, 64)
        ents = _entries(cpuid)
        f = _u("flags", flags, 32)
        hw = _u("hw_error", hw_error, 64)
        if isinstance(reserved, (str, bytes)) or not hasattr(reserved, "__iter__"):
            msg = f"reserved={reserved!r} must be a sequence of u64"
            raise TdxTypeError(msg, name="reserved", value=reserved)
        res = [_u("reserved", r, 64) for r in reserved]
        if len(res) > KVM_TDX_INIT_VM_RESERVED:
            msg = f"reserved has {len(res)} words; kvm_tdx_init_vm has {KVM_TDX_INIT_VM_RESERVED}"
            raise TdxValueError(msg, name="reserved", value=len(res))
        pad = _u("cpuid_padding", cpuid_padding, 32)
        hw_out = [0]

        def op() -> Generator[Any, Any, Ret]:
            ret = self._check_tdx_cmd(hw)
            if ret[0] < 0:
                return ret
            owner = yield Wait(self.lock, WRITE)
            try:
                if self.td_state != TdState.UNINITIALIZED:
                    return fail(_errno.EINVAL, f"TD state is {self.td_state.name}, not UNINITIALIZED")
                if f:
                    return fail(_errno.EINVAL, f"flags {f:#x} must be 0")
                if len(ents) > KVM_MAX_CPUID_ENTRIES:
                    return fail(_errno.E2BIG, f"cpuid.nent={len(ents)} > KVM_MAX_CPUID_ENTRIES")
                if any(res):
                    return fail(_errno.EINVAL, "reserved fields must be 0")
                if pad or any(any(e.padding) for e in ents):
                    return fail(_errno.EINVAL, "cpuid padding must be 0")
                if self.created_vcpus:
                    return fail(_errno.EBUSY, "vCPUs were already created")
                if a & ~KVM_TDX_SUPPORTED_ATTRS:
                    return fail(_errno.EINVAL,
                                f"attributes {a:#x} not in supported {KVM_TDX_SUPPORTED_ATTRS:#x}")
                if x & ~TD_XFAM_SUPPORTED:
                    return fail(_errno.EINVAL, f"xfam {x:#x} not in supported {TD_XFAM_SUPPORTED:#x}")
                if g not in (48, 52):
                    return fail(_errno.EINVAL, f"GPAW {g} is neither 48 nor 52")
                params = TdParams(attributes=a, xfam=x | TD_XFAM_FIXED1, max_vcpus=self.max_vcpus,
                                  eptp_levels=4 if g == 48 else 5)
                ret = yield from self._td_init(params, hw_out)
                if ret[0] < 0:
                    return ret
                self.attributes, self.xfam, self.gpaw, self.cpuid = a, x | TD_XFAM_FIXED1, g, ents
                self.mmu.root_level = params.eptp_levels
                self.td_state = TdState.INITIALIZED
                return OK
            finally:
                self.lock.release(owner, WRITE)

        try:
            ioctl(self.kvm.host, "KVM_TDX_INIT_VM", self.id, self._guard(op()), hw_out)
        finally:
            self.last_hw_error = hw_out[0]

    def _td_init(self, params: TdParams, hw_out: List[int]) -> Generator[Any, Any, Ret]:
        """``__tdx_td_init``: HKID, pages, package check, CREATE, KEY.CONFIG, ADDCX, INIT."""
        host = self.kvm.host
        t = host.tdx
        try:
            hkid = host.keyids.alloc()
        except HostError as e:
            return _host_fail(e, f"HKID allocation: {e}")
        frames: List[int] = []
        try:
            for _ in range(1 + TDCS_NR_PAGES):
                frames.append(host.alloc_frame())
        except HostError as e:
            for p in frames:
                host.free_frame(p)
            host.keyids.free(hkid)
            return _host_fail(e, f"TDR/TDCS pages: {e}")
        tdr, tdcs = frames[0], frames[1:]

        def free_all() -> None:
            for p in frames:
                host.free_frame(p)
            host.keyids.free(hkid)

        offline = [p for p in range(host.nr_packages)
                   if not any(host.is_cpu_online(c) for c in range(host.nr_cpus) if host.package_of(c) == p)]
        if offline:
            free_all()
            return fail(_errno.EIO, f"package(s) {offline} have no online CPU to program the HKID")
        owner = yield Wait(tdx_lock, WRITE)
        try:
            res = sc_retry(lambda: t.tdh_mng_create(tdr, hkid))
        finally:
            tdx_lock.release(owner, WRITE)
        if res.status != TDX_SUCCESS:
            free_all()
            if res.status == TDX_RND_NO_ENTROPY:
                return fail(_errno.EAGAIN, "TDH.MNG.CREATE: RND_NO_ENTROPY")
            return fail(_errno.EIO, f"TDH.MNG.CREATE: {res.status.name}")
        # from here the TD exists in the module: failures run the full teardown
        self.hkid = self._td_hkid = hkid
        self.tdr = tdr
        err: Ret = OK
        for pkg in range(host.nr_packages):
            cpu = host.first_online_cpu(pkg)
            res = sc_retry(partial(t.tdh_mng_key_config, tdr, cpu=cpu))
            if res.status != TDX_SUCCESS:
                self.bug(f"TDH.MNG.KEY.CONFIG: {res.status.name}")
                err = fail(_errno.EIO, f"TDH.MNG.KEY.CONFIG on package {pkg}: {res.status.name}")
                break
        if err == OK:
            for page in tdcs:
                res = sc_retry(partial(t.tdh_mng_addcx, tdr, page))
                if res.status == TDX_SUCCESS:
                    self.tdcs.append(page)
                    continue
                if res.status == TDX_RND_NO_ENTROPY:
                    err = fail(_errno.EAGAIN, "TDH.MNG.ADDCX: RND_NO_ENTROPY")
                else:
                    err = fail(_errno.EIO, f"TDH.MNG.ADDCX: {res.status.name}")
                break
        if err == OK:
            err = self._mng_init(params, hw_out)
        if err != OK:
            # teardown: free the TDCS pages never added, then the full teardown helpers
            for page in tdcs[len(self.tdcs):]:
                host.free_frame(page)
            yield from self._mmu_release_hkid()
            self._reclaim_td_control_pages()
            # whatever could not be given back is recorded; KVM forgets it
            self.hkid, self.tdr, self.tdcs = None, None, []
            return err
        self.tsc_offset = self._rd(MNG_RD_FIELD_TSC_OFFSET)
        self.tsc_multiplier = self._rd(MNG_RD_FIELD_TSC_MULTIPLIER)
        return OK

    def _mng_init(self, params: TdParams, hw_out: List[int]) -> Ret:
        """TDH.MNG.INIT from a TD_PARAMS page: OPERAND_INVALID → EINVAL + hw_error, else EIO."""
        host = self.kvm.host
        t = host.tdx
        tdr = self.tdr
        assert tdr is not None
        try:
            pp = host.alloc_frame()
        except HostError as e:
            return _host_fail(e, f"TD_PARAMS page: {e}")
        pa = pp << PAGE_SHIFT
        t.write_td_params(pa, params)
        try:
            res = sc_retry(lambda: t.tdh_mng_init(tdr, pa))
        finally:
            t.td_params.pop(pa, None)       # kfree(td_params)
            host.free_frame(pp)
        if res.status.base == TDX_OPERAND_INVALID:
            hw_out[0] = int(res.status)
            return fail(_errno.EINVAL, f"TDH.MNG.INIT: {res.status.name}")
        if res.status != TDX_SUCCESS:
            return fail(_errno.EIO, f"TDH.MNG.INIT: {res.status.name}")
        return OK

    def _rd(self, field: int) -> int:
        """``td_tdcs_exec_read64``: TDH.MNG.RD; a failure reads as 0 (6.18: pr_err, no KVM_BUG)."""
        assert self.tdr is not None
        res = self.kvm.host.tdx.tdh_mng_rd(self.tdr, field)
        if res.status != TDX_SUCCESS:
            return 0
        return int(res.r8)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """``KVM_CREATE_VCPU``: a new vCPU (its fd holds a VM reference).

        Raises
        ------
        KvmError
            EINVAL: id ≥ KVM_MAX_VCPU_IDS, ``max_vcpus`` reached, no split irqchip. EIO: TD not
            INITIALIZED (``tdx_vcpu_create``; checked before the irqchip), or the VM is dead.
            EEXIST: the id is taken.
        """
        i = _u("vcpu_id", vcpu_id, 32)
        out: List[Vcpu] = []

        def op() -> Generator[Any, Any, Ret]:
            if i >= KVM_MAX_VCPU_IDS:
                return fail(_errno.EINVAL, f"vcpu id {i} >= KVM_MAX_VCPU_IDS ({KVM_MAX_VCPU_IDS})")
            owner = yield Wait(self.lock, WRITE)
            try:
                if self.created_vcpus >= self.max_vcpus:
                    return fail(_errno.EINVAL, f"max_vcpus ({self.max_vcpus}) vCPUs already created")
                if self.td_state != TdState.INITIALIZED:
                    return fail(_errno.EIO, f"TD state is {self.td_state.name}, not INITIALIZED")
                if self.split_irqchip_pins is None:
                    return fail(_errno.EINVAL, "a TD needs KVM_CAP_SPLIT_IRQCHIP")
                if any(v.vcpu_id == i for v in self.vcpus):
                    return fail(_errno.EEXIST, f"vcpu id {i} exists")
                v = Vcpu(self, i)
                self.get()
                self.created_vcpus += 1
                self.vcpus.append(v)
                out.append(v)
                return v.fd, ""
            finally:
                self.lock.release(owner, WRITE)

        ioctl(self.kvm.host, "KVM_CREATE_VCPU", self.id, self._guard(op()))
        return out[0]

    def _td_vcpu_init(self, v: Vcpu, rcx: int) -> Ret:
        """``tdx_td_vcpu_init``: pages, VP.CREATE, VP.ADDCX × n, VP.INIT (failures: KVM_BUG, EIO)."""
        host = self.kvm.host
        t = host.tdx
        assert self.tdr is not None
        frames: List[int] = []
        try:
            for _ in range(TDVPS_NR_PAGES):
                frames.append(host.alloc_frame())
        except HostError as e:
            for p in frames:
                host.free_frame(p)
            return _host_fail(e, f"TDVPR/TDCX pages: {e}")
        tdvpr, tdcx = frames[0], frames[1:]
        res = sc_retry(lambda: t.tdh_vp_create(self.tdr, tdvpr))
        if res.status != TDX_SUCCESS:
            for p in frames:
                host.free_frame(p)
            self.bug(f"TDH.VP.CREATE: {res.status.name}")
            return fail(_errno.EIO, f"TDH.VP.CREATE: {res.status.name}")
        v.tdvpr = tdvpr
        for k, page in enumerate(tdcx):
            res = sc_retry(partial(t.tdh_vp_addcx, tdvpr, page))
            if res.status != TDX_SUCCESS:
                for p in tdcx[k:]:
                    host.free_frame(p)      # added ones are reclaimed at vCPU free
                self.bug(f"TDH.VP.ADDCX: {res.status.name}")
                return fail(_errno.EIO, f"TDH.VP.ADDCX: {res.status.name}")
            v.tdcx.append(page)
        res = sc_retry(lambda: t.tdh_vp_init(tdvpr, rcx, v.vcpu_id))
        if res.status != TDX_SUCCESS:
            self.bug(f"TDH.VP.INIT: {res.status.name}")
            return fail(_errno.EIO, f"TDH.VP.INIT: {res.status.name}")
        return OK

    def finalize_vm(self, *, hw_error: int = 0) -> None:
        """``KVM_MEMORY_ENCRYPT_OP(KVM_TDX_FINALIZE_VM)``: TDH.MR.FINALIZE → RUNNABLE.

        Raises
        ------
        KvmError
            EINVAL: ``hw_error`` set; no HKID or already RUNNABLE; ``nr_premapped`` ≠ 0.
            EBUSY (``hw_error`` = the status): MR.FINALIZE OPERAND_BUSY. EIO (``hw_error``):
            any other failure (KVM_BUG).

        Notes
        -----
        ``tdx_td_finalize`` (6.18); tdx-facts §5.6.
        """
        hw = _u("hw_error", hw_error, 64)
        hw_out = [0]

        def op() -> Generator[Any, Any, Ret]:
            ret = self._check_tdx_cmd(hw)
            if ret[0] < 0:
                return ret
            owner = yield Wait(self.lock, WRITE)
            try:
                if self.hkid is None or self.td_state == TdState.RUNNABLE:
                    return fail(_errno.EINVAL, f"TD is {self.td_state.name} "
                                f"({'no HKID' if self.hkid is None else 'already finalized'})")
                if self.nr_premapped:
                    return fail(_errno.EINVAL, f"{self.nr_premapped} pre-mapped pages not yet added")
                assert self.tdr is not None
                res = self.kvm.host.tdx.tdh_mr_finalize(self.tdr)
                hw_out[0] = int(res.status)
                if res.status.base == TDX_OPERAND_BUSY:
                    return fail(_errno.EBUSY, f"TDH.MR.FINALIZE: {res.status.name}")
                if res.status != TDX_SUCCESS:
                    self.bug(f"TDH.MR.FINALIZE: {res.status.name}")
                    return fail(_errno.EIO, f"TDH.MR.FINALIZE: {res.status.name}")
                self.td_state = TdState.RUNNABLE
                self.pre_fault_allowed = True
                return OK
            finally:
                self.lock.release(owner, WRITE)

        try:
            ioctl(self.kvm.host, "KVM_TDX_FINALIZE_VM", self.id, self._guard(op()), hw_out)
        finally:
            self.last_hw_error = hw_out[0]

    # ------------------------------------------------------------------ teardown
    def terminate_vm(self, *, hw_error: int = 0) -> None:
        """``KVM_MEMORY_ENCRYPT_OP(KVM_TDX_TERMINATE_VM)``: release the HKID before shutdown.

        An opt-in extension, **not in 6.18** (linux-6.18.md §6): enabled by
        ``Kvm(host, terminate_vm=True)``; without it the sub-ioctl is an unknown command id and
        fails EINVAL, as 6.18's ``tdx_vm_ioctl`` answers. With it, the model follows the upstream
        series "KVM: TDX: Add sub-ioctl KVM_TDX_TERMINATE_VM" (v4 of Jun 2025, applied then
        dropped as e4775f57ad51; reworked as patch 5/5 of 29 Jul 2025), ``tdx_terminate_vm``:
        under ``kvm->lock``, take every vCPU mutex with a trylock (``kvm_trylock_all_vcpus``:
        one held → EBUSY, nothing changed), mark the VM dead (``kvm_vm_dead``; not bugged) and
        terminated (``kvm_tdx->vm_terminated`` of 5/5), drop the vCPU mutexes, then
        ``tdx_mmu_release_hkid`` (VP.FLUSH, VPFLUSHDONE, CACHE.WB per package, KEY.FREEID) —
        the TD is then in TEARDOWN and closing its guest_memfds reclaims each private page with
        one TDH.PHYMEM.PAGE.RECLAIM (:func:`tdxcore.kvm.tdx_mmu.tdx_sept_remove_private_spte`)
        instead of BLOCK + TRACK + REMOVE + WBINVD.

        Raises
        ------
        KvmError
            EIO: the VM is already dead (also a second TERMINATE_VM: ``kvm_vm_ioctl``'s check).
            EINVAL: ``hw_error`` set (checked first, as for every TDX sub-ioctl), or the
            extension is not enabled. EBUSY: a vCPU's mutex is held (a vCPU in KVM_RUN).

        Notes
        -----
        Choices where upstream is silent or was still moving (the series never merged):
        any TD state is accepted (no state check in v4 or 5/5; with no HKID only the
        dead/terminated marks change); the ioctl succeeds even if the release stops early
        (``tdx_terminate_vm`` ignores it): the HKID then stays assigned, the release is retried
        at VM destruction (``vm_pre_destroy``) and only a failure there is recorded as leaked;
        ``hw_error`` is never filled.
        """
        hw = _u("hw_error", hw_error, 64)

        def op() -> Generator[Any, Any, Ret]:
            ret = self._check_tdx_cmd(hw)
            if ret[0] < 0:
                return ret
            if not self.kvm.terminate_vm_enabled:
                return fail(_errno.EINVAL, "unknown KVM_TDX command: KVM_TDX_TERMINATE_VM is not in 6.18 "
                            "(enable the extension with Kvm(host, terminate_vm=True))")
            owner = yield Wait(self.lock, WRITE)          # tdx_vm_ioctl: kvm->lock
            try:
                taken: List[Vcpu] = []
                try:
                    for v in self.vcpus:                  # kvm_trylock_all_vcpus
                        if not v.mutex.try_acquire(owner, WRITE):
                            return fail(_errno.EBUSY, f"vCPU {v.vcpu_id} is in use (its mutex is held)")
                        taken.append(v)
                    self.mark_dead("KVM_TDX_TERMINATE_VM")
                    self.terminated = True
                finally:
                    for v in taken:
                        v.mutex.release(owner, WRITE)
                yield from self._mmu_release_hkid(record_leak=False)
                return OK
            finally:
                self.lock.release(owner, WRITE)

        ioctl(self.kvm.host, "KVM_TDX_TERMINATE_VM", self.id, self._guard(op()))

    @property
    def is_terminated(self) -> bool:
        """Whether KVM_TDX_TERMINATE_VM succeeded on this TD (``kvm_tdx->vm_terminated``)."""
        return bool(getattr(self, "terminated", False))

    def _mmu_release_hkid(self, record_leak: bool = True) -> Generator[Any, Any, None]:
        """``tdx_mmu_release_hkid`` (6.18; tdx-facts §5.7 step 1).

        VP.FLUSH each vCPU associated with a CPU (VCPU_NOT_ASSOCIATED is fine); under
        :data:`tdx_lock` VPFLUSHDONE (FLUSHVP_NOT_DONE: stop, HKID and pages leaked; other error:
        KVM_BUG, HKID leaked), CACHE.WB on the first online CPU of each package (resume loop,
        ≤ TDX_SEAMCALL_RETRIES; NO_HKID_READY_TO_WBCACHE is success), KEY.FREEID (error: KVM_BUG,
        HKID leaked; success: the HKID goes back to the pool). ``record_leak`` False (from
        :meth:`terminate_vm`): a failure leaves the HKID assigned without a leak record, since
        VM destruction runs the release again (upstream's ``vm_pre_destroy``) and records it
        only if that attempt fails too.
        """
        if self.hkid is None or self.tdr is None:
            return
        host = self.kvm.host
        t = host.tdx
        tdr, hkid = self.tdr, self.hkid
        for v in self.vcpus:
            if v.tdvpr is None:
                continue
            cpu = t.vcpu(v.tdvpr).associated_cpu
            if cpu is None:
                continue            # vcpu->cpu == -1: never loaded, nothing to flush
            res = t.tdh_vp_flush(v.tdvpr, cpu=cpu)
            if res.status not in (TDX_SUCCESS, TDX_VCPU_NOT_ASSOCIATED):
                self.bug(f"TDH.VP.FLUSH: {res.status.name}")
        owner = yield Wait(tdx_lock, WRITE)
        try:
            res = t.tdh_mng_vpflushdone(tdr)
            if res.status == TDX_FLUSHVP_NOT_DONE:
                if record_leak:
                    self._leak(None, "hkid", "TDH.MNG.VPFLUSHDONE: FLUSHVP_NOT_DONE")
                return
            if res.status != TDX_SUCCESS:
                self.bug(f"TDH.MNG.VPFLUSHDONE: {res.status.name}")
                if record_leak:
                    self._leak(None, "hkid", f"TDH.MNG.VPFLUSHDONE: {res.status.name}")
                return
            for pkg in range(host.nr_packages):
                cpu = host.first_online_cpu(pkg)
                status = TDX_SUCCESS
                for _ in range(TDX_SEAMCALL_RETRIES):
                    status = t.tdh_phymem_cache_wb(status != TDX_SUCCESS, cpu=cpu).status
                    if status != TDX_INTERRUPTED_RESUMABLE:
                        break
                # a final error is only a WARN upstream; KEY.FREEID then reports it
                del status
            res = t.tdh_mng_key_freeid(tdr)
            if res.status != TDX_SUCCESS:
                self.bug(f"TDH.MNG.KEY.FREEID: {res.status.name}")
                if record_leak:
                    self._leak(None, "hkid", f"TDH.MNG.KEY.FREEID: {res.status.name}")
                return
            host.keyids.free(hkid)
            self.hkid = None
        finally:
            tdx_lock.release(owner, WRITE)

    def _reclaim_page(self, pfn: int, what: str, clear: bool = True) -> bool:
        """``tdx_reclaim_page``: RECLAIM, then clear (erratum hosts only); False = leaked."""
        host = self.kvm.host
        res = host.tdx.tdh_phymem_page_reclaim(pfn)
        if res.status != TDX_SUCCESS:
            self._leak(pfn, what, f"TDH.PHYMEM.PAGE.RECLAIM: {res.status.name}")
            return False
        if clear and host.cpu_erratum_pw_mce:
            host.frame_clear(pfn)
        return True

    def _vcpu_free(self, v: Vcpu) -> None:
        """Free a vCPU's pages (``tdx_vcpu_free``, 6.18).

        With the HKID still assigned the pages are leaked; else RECLAIM (+ clear) and free each
        TDCX page, then the TDVPR.
        """
        host = self.kvm.host
        if v.tdvpr is None:
            return
        if self.hkid is not None:
            for p in v.tdcx:
                self._leak(p, "tdcx", "HKID still assigned at vCPU free")
            self._leak(v.tdvpr, "tdvpr", "HKID still assigned at vCPU free")
        else:
            for p in v.tdcx:
                if self._reclaim_page(p, "tdcx"):
                    host.free_frame(p)
            if self._reclaim_page(v.tdvpr, "tdvpr"):
                host.free_frame(v.tdvpr)
        v.tdcx = []
        v.tdvpr = None
        v.state = VcpuTdState.UNINITIALIZED

    def _reclaim_td_control_pages(self) -> None:
        """``tdx_reclaim_td_control_pages`` (6.18; tdx-facts §5.7 step 4).

        With the HKID still assigned everything is leaked. Else RECLAIM (+ clear) and free each
        TDCS page; RECLAIM the TDR (no clear yet), TDH.PHYMEM.PAGE.WBINVD it with the global
        KeyID (failure: KVM_BUG, TDR leaked), clear (erratum hosts), free.
        """
        host = self.kvm.host
        if self.tdr is None:
            return
        if self.hkid is not None:
            for p in self.tdcs:
                self._leak(p, "tdcs", "HKID still assigned at VM destroy")
            self._leak(self.tdr, "tdr", "HKID still assigned at VM destroy")
            self.tdcs, self.tdr = [], None
            return
        for p in self.tdcs:
            if self._reclaim_page(p, "tdcs"):
                host.free_frame(p)
        self.tdcs = []
        tdr, self.tdr = self.tdr, None
        if not self._reclaim_page(tdr, "tdr", clear=False):
            return
        res = host.tdx.tdh_phymem_page_wbinvd(tdr, host.keyids.global_keyid)
        if res.status != TDX_SUCCESS:
            self.bug(f"TDH.PHYMEM.PAGE.WBINVD of the TDR: {res.status.name}")
            self._leak(tdr, "tdr", f"TDH.PHYMEM.PAGE.WBINVD: {res.status.name}")
            return
        if host.cpu_erratum_pw_mce:
            host.frame_clear(tdr)
        host.free_frame(tdr)

    def _destroy_vm(self) -> None:
        """Destroy a TD (``kvm_destroy_vm``, 6.18 order; tdx-facts §5.7, linux-6.18.md §7).

        Zap every private leaf still in the mirror while the HKID is assigned (normally none:
        closing each guest_memfd zapped its pages), release the HKID, free vCPUs, free the
        mirror's S-EPT pages (``free_external_spt``: RECLAIM + clear, or leak), reclaim the
        control pages, then the generic part; the TD state goes back to UNINITIALIZED.
        """
        if self.mmu.leaves:
            run_to_completion(self.mmu.zap_all_private_leaves(), name="kvm_mmu_zap_private")
        run_to_completion(self._mmu_release_hkid(), name="tdx_mmu_release_hkid")
        for v in self.vcpus:
            self._vcpu_free(v)
        from tdxcore.kvm import tdx_batch
        if tdx_batch.batch_spt_applies(self):     # opted in: one batch RECLAIM of the S-EPT pages
            tdx_batch.free_all_spt_batch(self)
        else:
            self.mmu.free_all_spt()
        self._reclaim_td_control_pages()
        # an HKID still assigned was recorded as leaked: KVM never gives it back
        self.hkid = None
        self.td_state = TdState.UNINITIALIZED
        super()._destroy_vm()

    # ------------------------------------------------------------------ guest_memfd + initial memory
    def kvm_gmem_invalidate(self, gmem: GuestMemfd, start: int,
                            end: int) -> Generator[Any, Any, frozenset]:
        """Forget the populated state of pages ``[start, end)``, then the generic invalidation.

        The private unmap it runs is :meth:`zap_private_locked` (BLOCK → TRACK + kick → REMOVE →
        WBINVD per page, :mod:`tdxcore.kvm.tdx_mmu`), as 6.18's ``kvm_gmem_release`` /
        ``kvm_gmem_punch_hole`` do before the pages go back to the host.
        """
        for key in [k for k in self._gmem_prepared if k[0] == gmem.fd and start <= k[1] < end]:
            self._gmem_prepared.discard(key)
        return (yield from super().kvm_gmem_invalidate(gmem, start, end))

    def zap_private_locked(self, start: int, end: int) -> Generator[Any, Any, List[int]]:
        """Zap the mirror leaves of ``[start, end)`` (mmu_lock write held); return the gfns that failed.

        A policy with a ``zap_range(vm, gfns)`` generator method zaps the range itself (the hook of
        :mod:`tdxcore.kvm.policy_batched`, not upstream); 6.18 zaps page by page below.
        """
        from tdxcore.kvm import tdx_batch
        if tdx_batch.batch_zap_applies(self):       # terminated: one batch RECLAIM, not per page
            return (yield from tdx_batch.zap_terminated_range(self, start, end))
        if hasattr(self.policy, "zap_range"):
            return (yield from self.policy.zap_range(self, self.mmu.leaves_in(start, end)))
        return (yield from self.zap_leaves_per_page(self.mmu.leaves_in(start, end)))

    def zap_leaves_per_page(self, gfns: Any) -> Generator[Any, Any, List[int]]:
        """Zap each present mirror leaf at ``gfns`` through the remove hook (6.18's per-page zap)."""
        failed = []
        for gfn in gfns:
            leaf = self.mmu.leaf(gfn)
            if leaf is None or leaf[1] != SpteState.PRESENT:
                continue
            if (yield from self.mmu.zap_private_leaf_locked(gfn)):
                failed.append(gfn)
        return failed

    def _gmem_populate_one(self, gfn: int, data: bytes, measure: bool) -> Generator[Any, Any, Ret]:
        """``kvm_gmem_populate`` of one page with ``tdx_gmem_post_populate`` (6.18).

        The gfn's memslot must have a guest_memfd (EINVAL), still open (EFAULT); a page already
        populated → EEXIST; not PRIVATE → EINVAL. Then map it in the mirror (SEPT.ADD for missing levels, then
        ``nr_premapped += 1``; -EBUSY retries as ``kvm_tdp_map_page`` does), PAGE.ADD from a
        bounce page holding ``data`` (BUSY → EBUSY, else EIO; success → ``nr_premapped -= 1``),
        and with ``measure`` 16 × MR.EXTEND (failure → EIO).
        """
        host = self.kvm.host
        t = host.tdx
        slot = self.memslots.gfn_to_memslot(gfn)
        if slot is None or not slot.flags & MemFlag.GUEST_MEMFD:
            return fail(_errno.EINVAL, f"gfn {gfn:#x} is not in a guest_memfd memslot")
        f = slot.gmem
        if f is None:
            return fail(_errno.EFAULT, f"the guest_memfd of slot {slot.id} is closed")
        index = slot.gmem_pgoff + gfn - slot.base_gfn
        owner = yield Wait(f.invalidate_lock, WRITE)
        try:
            if (f.fd, index) in self._gmem_prepared:
                return fail(_errno.EEXIST, f"gfn {gfn:#x} is already populated")
            if not self.mem_attr.has_range(gfn, gfn + 1, MemAttr.PRIVATE, MemAttr.PRIVATE):
                return fail(_errno.EINVAL, f"gfn {gfn:#x} is not PRIVATE (KVM_SET_MEMORY_ATTRIBUTES)")
            pfn = f.pfn_of(index)
            if pfn is None:
                ret = f._allocate_locked(index, index + 1)
                if ret[0] < 0:
                    return ret
                pfn = f.pfn_of(index)
                assert pfn is not None
            while True:
                r = yield from self.mmu.map_private(gfn, pfn)
                if r != -_errno.EBUSY:
                    break
                yield PREEMPT                # kvm_tdp_map_page: RET_PF_RETRY → try again
            if r < 0:
                return fail(-r, f"kvm_tdp_map_page gfn {gfn:#x}")
            assert self.tdr is not None
            gpa = gfn << PAGE_SHIFT
            try:
                src = host.alloc_frame()
            except HostError as e:
                return _host_fail(e, f"source page: {e}")
            try:
                host.frame_write(src, 0, data, 0)
                res = t.tdh_mem_page_add(self.tdr, gpa, pfn, src)
            finally:
                host.free_frame(src)
            if res.status != TDX_SUCCESS:
                if res.status.base == TDX_OPERAND_BUSY:
                    return fail(_errno.EBUSY, f"TDH.MEM.PAGE.ADD gpa {gpa:#x}: {res.status.name}")
                return fail(_errno.EIO, f"TDH.MEM.PAGE.ADD gpa {gpa:#x}: {res.status.name}")
            self.nr_premapped -= 1
            if measure:
                for off in range(0, PAGE_SIZE, TDX_EXTENDMR_CHUNKSIZE):
                    res = t.tdh_mr_extend(self.tdr, gpa + off)
                    if res.status != TDX_SUCCESS:
                        return fail(_errno.EIO, f"TDH.MR.EXTEND gpa {gpa + off:#x}: {res.status.name}")
            self._gmem_prepared.add((f.fd, index))
            return OK
        finally:
            f.invalidate_lock.release(owner, WRITE)


Kvm.VM_CLASSES[int(VmType.TDX)] = TdxVm
