"""``Vcpu``: a KVM vCPU of a TD — its fd, its VM reference, and KVM_TDX_INIT_VCPU (SPEC §3.2).

A vCPU fd holds a VM reference (``kvm_vm_ioctl_create_vcpu`` takes ``kvm_get_kvm``; the fd's
release puts it), so the VM outlives a closed VM fd while any vCPU fd is open. The vCPU object
itself is freed only when the VM is destroyed (``kvm_destroy_vcpus``): its TDVPR/TDCX pages are
reclaimed there by :meth:`tdxcore.kvm.tdx_vm.TdxVm._vcpu_free`.

``KVM_RUN`` (:meth:`Vcpu.run`, SPEC §3.3) enters the TD through the module's VP.ENTER op (begin →
enter → the guest executes queued ops → exit) and decodes the exit as ``tdx_handle_exit`` does
(tdx-facts §9.1). This slice executes HLT and loads/stores to private pages that are already
mapped; faults, conversions and TDVMCALLs come with the next issues.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Generator, Iterable, List, NamedTuple, Optional, Tuple

from tdxcore import guest as _guest
from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE, ExitReason
from tdxcore.errors import TdxTypeError, TdxValueError, check_int
from tdxcore.kvm.ioctl import OK, Ret, ebadf, fail, fd_call, ioctl
from tdxcore.kvm.run import GuestEvent, KvmRun, VeInfo
from tdxcore.kvm.vcpu_run import SEPT_ZAP_MAX_WAITS, VP_ENTER_MAX_BUSY, vcpu_run
from tdxcore.sched import PREEMPT, WRITE, KLock, Wait

if TYPE_CHECKING:
    from tdxcore.kvm.tdx_vm import TdxVm

__all__ = ["Vcpu", "VcpuTdState", "MemRegion", "VP_ENTER_MAX_BUSY", "SEPT_ZAP_MAX_WAITS"]

#: ``TdState.RUNNABLE`` (an IntEnum of :mod:`tdxcore.kvm.tdx_vm`, which imports this module).
_TD_RUNNABLE = 2

class MemRegion(NamedTuple):
    """``struct kvm_tdx_init_mem_region`` as written back.

    ``source_offset`` (bytes into ``source``: the model's ``source_addr``), ``gpa`` and ``nr_pages``
    still to do.
    """

    source_offset: int
    gpa: int
    nr_pages: int


class VcpuTdState(enum.IntEnum):
    """``enum vcpu_tdx_state`` (6.18)."""

    UNINITIALIZED = 0
    INITIALIZED = 1


class Vcpu:
    """One TD vCPU (made by :meth:`TdxVm.create_vcpu`, never directly).

    Attributes
    ----------
    vm : TdxVm
        Its VM (referenced while the fd is open).
    vcpu_id : int
        The id userspace chose (also the x2APIC id passed to TDH.VP.INIT).
    fd : int
        Its number in ``kvm.fds`` (stays readable after close).
    state : VcpuTdState
        UNINITIALIZED until KVM_TDX_INIT_VCPU succeeds.
    tdvpr : int or None
        The TDVPR frame once VP.CREATE succeeded (None after it is reclaimed or freed).
    tdcx : list of int
        TDCX frames VP.ADDCX accepted (reclaimed at vCPU free).
    """

    def __init__(self, vm: "TdxVm", vcpu_id: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.state = VcpuTdState.UNINITIALIZED
        self.tdvpr: Optional[int] = None
        self.tdcx: List[int] = []
        self.mem_region: Optional[MemRegion] = None   # last KVM_TDX_INIT_MEM_REGION write-back
        self._fd_open = True
        self.fd = vm.kvm.fds.install(self)
        self.kvm_run = KvmRun()                        # the one struct kvm_run, reused
        self.guest_log: List[GuestEvent] = []          # one GuestEvent per completed guest op
        self.mutex = KLock(f"vcpu{vcpu_id}.mutex")     # vcpu->mutex, taken by KVM_RUN
        self._queue: Deque[_guest.GuestOp] = deque()   # guest ops not yet completed
        self._next_index = 0                           # guest op index = RIP of the queue head
        self._signal = False                           # raise_signal() pending
        self._enter_op: Optional[Any] = None           # the VP.ENTER op while in the guest
        self._counters: dict[str, int] = {}
        self._events: Deque[int] = deque()             # queue_interrupt() vectors not yet delivered
        self._ve_ops: Deque[Any] = deque()             # the #VE handler's ops, before the queue head
        self._head_ve: Optional[VeInfo] = None         # the #VE the queue head took, for its log
        self._last_accept_status = 0
        self._kick_pending = False                     # a kick's IPI not yet taken
        self.guest_mode_seq = 0                        # guest-mode spans ended so far
        self.actor = f"vm{vm.id}.vcpu{vcpu_id}"
        #: What the next ``run()`` does first with userspace's answer to the last exit
        #: (``complete_userspace_io`` of upstream): ``fn(vcpu) -> Optional[Ret]`` — None resumes
        #: the guest, a Ret exits to userspace again (e.g. the next MapGPA chunk).
        self.completion: Optional[Callable[["Vcpu"], Optional[Ret]]] = None

    def __repr__(self) -> str:
        return (f"Vcpu(vm={self.vm.id}, id={self.vcpu_id}, fd={self.fd}, {self.state.name}, "
                f"tdvpr={self.tdvpr}, tdcx={len(self.tdcx)})")

    @property
    def in_guest(self) -> bool:
        """Whether the vCPU is in guest mode: from VP.ENTER's start to its TD exit (kicks wait)."""
        return self._enter_op is not None

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot of the vCPU's ``nr_*`` counters (``nr_vp_enter_busy``, ``nr_entries``, ...)."""
        return dict(sorted(self._counters.items()))

    @property
    def queue(self) -> Tuple[Any, ...]:
        """The guest ops not yet completed, head first."""
        return tuple(self._queue)

    def _count(self, name: str, n: int = 1) -> None:
        c = self._counters
        c[name] = c.get(name, 0) + n
        self.vm.kvm.host.count(name, n)

    @property
    def is_closed(self) -> bool:
        """Whether the vCPU fd was closed."""
        return not self._fd_open

    def state_bytes(self) -> bytes:
        """``<QqBBqH`` vcpu_id, fd, state, fd_open, tdvpr (-1 none), TDCX count, then ``<Q`` each.

        Then the run state: ``<QQQBB`` next guest op index, queued ops, guest_log length, pending
        signal, pending kick; ``<H`` pending interrupt vectors and ``<B`` each; ``<H`` #VE handler
        ops; ``<B`` whether a completion is armed (the ops themselves are the actor's program,
        hashed by its position).
        """
        return (struct.pack(f"<QqBBqH{len(self.tdcx)}QQQQBB", self.vcpu_id, self.fd, int(self.state),
                            self._fd_open, -1 if self.tdvpr is None else self.tdvpr, len(self.tdcx),
                            *self.tdcx, self._next_index, len(self._queue), len(self.guest_log),
                            self._signal, self._kick_pending)
                + struct.pack(f"<H{len(self._events)}BHB", len(self._events), *self._events,
                              len(self._ve_ops), self.completion is not None))

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """``close(vcpu_fd)``: drop the fd's VM reference (``kvm_vcpu_release``).

        Raises
        ------
        KvmError
            EBADF if the fd is already closed.
        """
        ret: Ret = OK
        if not self._fd_open:
            ret = ebadf("vCPU fd")
        else:
            self._fd_open = False
            self.vm.kvm.fds.remove(self.fd)
            self.vm.put()
        fd_call(self.vm.kvm.host, "close", self.vm.id, ret)

    # ------------------------------------------------------------------ ioctls
    def _guard(self, gen: Generator[Any, Any, Ret]) -> Generator[Any, Any, Ret]:
        if not self._fd_open:
            gen.close()
            return ebadf("vCPU fd")
        if self.vm.is_dead:
            # kvm_vcpu_ioctl: vm_dead → -EIO before anything else
            gen.close()
            return fail(_errno.EIO, f"VM {self.vm.id} is dead ({self.vm.bug_reason or 'killed'})")
        return (yield from gen)

    def init_vcpu(self, rcx: int = 0, *, flags: int = 0, hw_error: int = 0) -> None:
        """``KVM_MEMORY_ENCRYPT_OP(KVM_TDX_INIT_VCPU)``: VP.CREATE, VP.ADDCX × n, VP.INIT.

        Parameters
        ----------
        rcx : int
            ``cmd.data``: the guest's initial RCX (u64).
        flags, hw_error : int
            ``cmd.flags`` (must be 0) and ``cmd.hw_error`` (userspace must leave it 0).

        Raises
        ------
        KvmError
            EIO: the VM is dead, or a SEAMCALL failed (KVM_BUG: the VM is dead from then on).
            EINVAL: no HKID / TD already RUNNABLE (checked first), ``hw_error`` set, flags, the
            vCPU already initialized. ENOMEM: no frame for the TDVPR/TDCX pages.

        Notes
        -----
        ``tdx_vcpu_ioctl`` → ``tdx_vcpu_init`` → ``tdx_td_vcpu_init`` (6.18). Pages are allocated
        first; on a VP.CREATE failure all are freed; on a VP.ADDCX failure the pages not yet added
        are freed and the added ones are reclaimed at vCPU free (tdx-facts §5.4).
        """
        r = check_int("rcx", rcx, 0, 1 << 64)
        f = check_int("flags", flags, 0, 1 << 32)
        hw = check_int("hw_error", hw_error, 0, 1 << 64)
        vm = self.vm

        def op() -> Generator[Any, Any, Ret]:
            yield from ()
            ret = vm._check_vcpu_ioctl(hw)
            if ret[0] < 0:
                return ret
            if f:
                return fail(_errno.EINVAL, f"flags {f:#x} must be 0")
            if self.state != VcpuTdState.UNINITIALIZED:
                return fail(_errno.EINVAL, f"vCPU {self.vcpu_id} is already initialized")
            ret = vm._td_vcpu_init(self, r)
            if ret[0] < 0:
                return ret
            self.state = VcpuTdState.INITIALIZED
            return OK

        ioctl(vm.kvm.host, "KVM_TDX_INIT_VCPU", vm.id, self._guard(op()))

    def init_mem_region(self, source: bytes, gpa: int, nr_pages: int, measure: bool = True, *,
                        hw_error: int = 0) -> MemRegion:
        """``KVM_MEMORY_ENCRYPT_OP(KVM_TDX_INIT_MEM_REGION)``: add initial private pages.

        Parameters
        ----------
        source : bytes
            The source pages (``source_addr``); page ``i`` is ``source[i*4096:(i+1)*4096]``.
            A short buffer is a fault on the missing page (EFAULT), as an unmapped source is.
        gpa, nr_pages : int
            u64 each: the first private GPA and the number of 4K pages.
        measure : bool
            ``KVM_TDX_MEASURE_MEMORY_REGION``: 16 TDH.MR.EXTEND per page.
        hw_error : int
            ``cmd.hw_error`` (must be 0).

        Returns
        -------
        MemRegion
            The region written back (all done: ``nr_pages == 0``); also ``self.mem_region``,
            which is written back with the progress made even when the ioctl fails.

        Raises
        ------
        KvmError
            EINVAL (in order): no HKID / TD RUNNABLE, ``hw_error``, vCPU not INITIALIZED, gpa not
            page aligned, ``nr_pages`` 0, ``gpa + nr_pages * 4096`` wraps, first or last GPA
            shared; per page: no memslot with GUEST_MEMFD (EINVAL), its guest_memfd closed
            (EFAULT), page already populated (EEXIST), gfn not PRIVATE (EINVAL), short ``source``
            (EFAULT), PAGE.ADD BUSY
            (EBUSY) or error (EIO), MR.EXTEND error (EIO), mirror map KVM_BUG (EIO).

        Notes
        -----
        ``tdx_vcpu_init_mem_region`` → ``kvm_gmem_populate`` → ``tdx_gmem_post_populate``
        (6.18); tdx-facts §5.5.
        """
        if not isinstance(source, (bytes, bytearray, memoryview)):
            msg = f"source must be bytes-like, not {type(source).__name__}"
            raise TdxTypeError(msg, name="source", value=type(source).__name__)
        if not isinstance(measure, bool):
            msg = f"measure={measure!r} must be a bool"
            raise TdxTypeError(msg, name="measure", value=measure)
        src = bytes(source)
        g = check_int("gpa", gpa, 0, 1 << 64)
        n = check_int("nr_pages", nr_pages, 0, 1 << 64)
        hw = check_int("hw_error", hw_error, 0, 1 << 64)
        vm = self.vm
        region = [MemRegion(0, g, n)]

        def op() -> Generator[Any, Any, Ret]:
            ret = vm._check_vcpu_ioctl(hw)
            if ret[0] < 0:
                return ret
            if self.state != VcpuTdState.INITIALIZED:
                return fail(_errno.EINVAL, f"vCPU {self.vcpu_id} is not initialized")
            owner = yield Wait(vm.slots_lock, WRITE)
            try:
                from tdxcore.kvm.tdx_vm import TdState

                if vm.td_state == TdState.RUNNABLE:
                    return fail(_errno.EINVAL, "the TD is finalized")
                if g & (PAGE_SIZE - 1):
                    return fail(_errno.EINVAL, f"gpa {g:#x} is not page aligned")
                if n == 0:
                    return fail(_errno.EINVAL, "nr_pages is 0")
                end = (g + (n << PAGE_SHIFT)) & ((1 << 64) - 1)
                if end <= g:
                    return fail(_errno.EINVAL, f"gpa {g:#x} + {n} pages overflows")
                shared = 1 << (vm.gpaw - 1)
                if g & shared or (end - 1) & shared:
                    return fail(_errno.EINVAL, f"[{g:#x}, {end:#x}) is not all private")
                while region[0].nr_pages:
                    off, cur, left = region[0]
                    data = src[off:off + PAGE_SIZE]
                    if len(data) != PAGE_SIZE:
                        return fail(_errno.EFAULT, f"source has no page at offset {off:#x}")
                    ret = yield from vm._gmem_populate_one(cur >> PAGE_SHIFT, data, measure)
                    if ret[0] < 0:
                        return ret
                    region[0] = MemRegion(off + PAGE_SIZE, cur + PAGE_SIZE, left - 1)
                return OK
            finally:
                vm.slots_lock.release(owner, WRITE)

        try:
            ioctl(vm.kvm.host, "KVM_TDX_INIT_MEM_REGION", vm.id, self._guard(op()))
        finally:
            self.mem_region = region[0]     # copy_to_user of the progress, even on error
        return region[0]

    # ------------------------------------------------------------------ KVM_PRE_FAULT_MEMORY
    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> Tuple[int, int]:
        """``KVM_PRE_FAULT_MEMORY``: map ``[gpa, gpa + size)`` as faults would, without the guest.

        Parameters
        ----------
        gpa, size : int
            u64, page aligned, non-empty, no wrap. Each page is faulted as private or shared by
            its memory attribute (a TD's private pages are AUGed: the guest still accepts them).
        flags : int
            u64, must be 0.

        Returns
        -------
        tuple of int
            ``(gpa, size)`` as written back: what is left (``size == 0`` when all was mapped). A
            stop after progress (a signal, an invalid memslot) returns the remainder and no error,
            as upstream returns 0 when at least one page was mapped.

        Raises
        ------
        KvmError
            EINVAL: flags, alignment, empty or wrapping range. EOPNOTSUPP: before FINALIZE
            (``pre_fault_allowed``). With no progress: EINTR (a pending signal), EAGAIN (the
            memslot is being deleted or moved, 6.18), EFAULT (attribute mismatch or no gmem),
            ENOENT (no memslot: MMIO), EIO (dead VM).

        Notes
        -----
        ``kvm_vcpu_pre_fault_memory`` → ``kvm_arch_vcpu_pre_fault_memory`` → ``kvm_tdp_map_page``
        (6.18, with commit 3ccbf6f47098's -EAGAIN). SPEC §3.2.
        """
        g = check_int("gpa", gpa, 0, 1 << 64)
        n = check_int("size", size, 0, 1 << 64)
        f = check_int("flags", flags, 0, 1 << 64)
        out = [(g, n)]
        ioctl(self.vm.kvm.host, "KVM_PRE_FAULT_MEMORY", self.vm.id,
              self._guard(self._pre_fault_gen(g, n, f, out)))
        return out[0]

    def _pre_fault_gen(self, gpa: int, size: int, flags: int,
                       out: List[Tuple[int, int]]) -> Generator[Any, Any, Ret]:
        from tdxcore.kvm.fault import (
            RET_PF_EMULATE,
            RET_PF_FIXED,
            RET_PF_RETRY,
            RET_PF_SPURIOUS,
            kvm_mmu_page_fault,
        )

        vm = self.vm
        if flags:
            return fail(_errno.EINVAL, f"flags {flags:#x} must be 0")
        if gpa & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1) or size == 0 or gpa + size > (1 << 64):
            return fail(_errno.EINVAL, f"gpa {gpa:#x} size {size:#x}: unaligned, empty or wraps")
        owner = yield Wait(self.mutex, WRITE)
        so = vm.srcu.read_lock()
        try:
            if not getattr(vm, "pre_fault_allowed", False):
                return fail(_errno.EOPNOTSUPP, "pre-faulting is allowed only after KVM_TDX_FINALIZE_VM")
            full = size
            r = 0
            while size:
                if self._signal:
                    self._signal = False
                    r = -_errno.EINTR
                    break
                if vm.is_dead:
                    r = -_errno.EIO
                    break
                gfn = gpa >> PAGE_SHIFT
                private = vm.is_private(gfn)
                fault_gpa = gpa if private else gpa | vm.gpa_shared_mask
                while True:                   # kvm_tdp_map_page
                    slot = vm.memslots.gfn_to_memslot(gfn)
                    if slot is not None and slot.invalid:
                        r = -_errno.EAGAIN
                        break
                    r = yield from kvm_mmu_page_fault(self, fault_gpa, private)
                    if r != RET_PF_RETRY:
                        break
                    if self._signal or vm.is_dead:
                        break
                    yield PREEMPT
                if r in (RET_PF_FIXED, RET_PF_SPURIOUS):
                    gpa, size = gpa + PAGE_SIZE, size - PAGE_SIZE
                    out[0] = (gpa, size)
                    self._count("nr_pre_faulted")
                    yield PREEMPT             # cond_resched()
                    continue
                if r == RET_PF_EMULATE:
                    r = -_errno.ENOENT
                elif r == RET_PF_RETRY:
                    r = -_errno.EINTR if self._signal else -_errno.EIO
                    self._signal = False
                break
            if size == full and r < 0:
                return fail(-r, f"pre-fault of gpa {gpa:#x}: {_errno.errorcode.get(-r, r)}")
            return OK
        finally:
            vm.srcu.read_unlock(so)
            self.mutex.release(owner, WRITE)

    # ------------------------------------------------------------------ KVM_RUN
    def raise_signal(self) -> None:
        """Make a signal pending: the next entry check of :meth:`run` returns ``-EINTR`` once.

        Notes
        -----
        ``kvm_vcpu_running`` loop of ``vcpu_run``: ``signal_pending(current)`` → ``-EINTR`` with
        ``KVM_EXIT_INTR`` (6.18). The flag clears when it is reported. SPEC §3.3.
        """
        self._signal = True

    @staticmethod
    def _check_ops(ops: Optional[Iterable[Any]]) -> Tuple[Any, ...]:
        if ops is None:
            return ()
        if isinstance(ops, (str, bytes)) or not hasattr(ops, "__iter__"):
            msg = f"ops must be a list or iterator of guest ops, not {type(ops).__name__}"
            raise TdxTypeError(msg, name="ops", value=type(ops).__name__)
        out = tuple(ops)        # an iterator is consumed now: the queue holds immutable ops
        for i, o in enumerate(out):
            if not isinstance(o, _guest.OPS):
                msg = f"ops[{i}]={o!r} is not a guest op (tdxcore.guest)"
                raise TdxTypeError(msg, name="ops", value=type(o).__name__)
        return out

    def run(self, ops: Optional[Iterable[Any]] = None) -> KvmRun:
        """``KVM_RUN``: append ``ops`` to the guest queue and run until an exit needs userspace.

        Parameters
        ----------
        ops : list or iterator of guest ops, optional
            From :mod:`tdxcore.guest`; appended (once the pre-run checks pass) to the queue.

        Returns
        -------
        KvmRun
            ``self.kvm_run``: ``ExitReason.HLT`` with ``ret == 0`` when the guest halts or its
            queue is empty; ``ExitReason.INTR`` with ``ret == -EINTR`` for a pending signal
            (:meth:`raise_signal`), or when ``vm.wait_for_sept_zap`` still refuses entry after
            :data:`SEPT_ZAP_MAX_WAITS` preemption points (the model's stand-in for the kernel's
            loop, which only a signal ends); ``ExitReason.INTERNAL_ERROR`` (``ret == 0``) when
            VP.ENTER fails with an error other than BUSY.

        Raises
        ------
        KvmError
            EBADF: the fd is closed. EIO: the VM is dead/bugged (also after
            :data:`VP_ENTER_MAX_BUSY` BUSY entries in a row: KVM_BUG). EINVAL: the TD is not
            RUNNABLE or the vCPU is not initialized (``tdx_vcpu_pre_run``), or the guest touched
            memory this slice cannot execute (a shared or unmapped GPA: faults arrive later).
        TdxTypeError
            ``ops`` is not an iterable of guest ops (nothing is queued).

        Notes
        -----
        ``kvm_arch_vcpu_ioctl_run`` → ``vcpu_run`` → ``tdx_vcpu_pre_run`` / ``tdx_vcpu_run``
        (VP.ENTER, BUSY re-entered from the fastpath; no entry while ``wait_for_sept_zap``) →
        ``tdx_handle_exit`` (6.18; tdx-facts §9.1). A -EINTR return is returned, not raised, so
        the ``ioctl`` event of ``KVM_RUN`` records errno 0 and ``kvm_run.ret`` carries it.
        SPEC §3.3, §5.
        """
        new = self._check_ops(ops)
        ioctl(self.vm.kvm.host, "KVM_RUN", self.vm.id, self._run_gen(new))
        return self.kvm_run

    def run_gen(self, ops: Optional[Iterable[Any]] = None) -> Generator[Any, Any, Ret]:
        """Return the generator of :meth:`run` for an actor (SPEC §5): ``ops`` are validated now."""
        return self._run_gen(self._check_ops(ops))

    def _run_gen(self, new: Tuple[Any, ...]) -> Generator[Any, Any, Ret]:
        """``self._guard(self.run_gen_checked(new))`` as one generator (one frame fewer per step)."""
        if not self._fd_open:
            return ebadf("vCPU fd")
        vm = self.vm
        if vm.is_dead:
            # kvm_vcpu_ioctl: vm_dead → -EIO before anything else
            return fail(_errno.EIO, f"VM {vm.id} is dead ({vm.bug_reason or 'killed'})")
        mutex = self.mutex
        owner = yield mutex.wait_write
        try:
            if vm.td_state != _TD_RUNNABLE:
                return fail(_errno.EINVAL, f"TD is {vm.td_state.name}, not RUNNABLE")
            if self.state != VcpuTdState.INITIALIZED or self.tdvpr is None:
                return fail(_errno.EINVAL, f"vCPU {self.vcpu_id} is not initialized")
            self._queue.extend(new)
            return (yield from vcpu_run(self))
        finally:
            mutex.release(owner, WRITE)

    def run_gen_checked(self, new: Tuple[Any, ...]) -> Generator[Any, Any, Ret]:
        """:meth:`run_gen` body for already validated ops (see :meth:`run`)."""
        vm = self.vm
        owner = yield self.mutex.wait_write
        try:
            if vm.td_state != _TD_RUNNABLE:
                return fail(_errno.EINVAL, f"TD is {vm.td_state.name}, not RUNNABLE")
            if self.state != VcpuTdState.INITIALIZED or self.tdvpr is None:
                return fail(_errno.EINVAL, f"vCPU {self.vcpu_id} is not initialized")
            self._queue.extend(new)
            return (yield from vcpu_run(self))
        finally:
            self.mutex.release(owner, WRITE)

    def set_exit(self, reason: ExitReason, ret: int = 0) -> Ret:
        """Set ``kvm_run.exit_reason`` and ``kvm_run.ret``; return the Ret that makes KVM_RUN return."""
        self.kvm_run.exit_reason = reason
        self.kvm_run.ret = ret
        return OK

    def complete_op(self, status: Optional[int] = None, r11: int = 0, outputs: Tuple[int, ...] = (),
                    value: Optional[int] = None, ve: Optional[Any] = None) -> None:
        """Complete the guest op at the head of the queue: log what the guest saw, advance the RIP."""
        gop = self._queue.popleft()
        self.guest_log.append(GuestEvent(self._next_index, gop, status, r11, outputs, value, ve))
        self._next_index += 1

    def _take_head_ve(self) -> Optional[VeInfo]:
        ve, self._head_ve = self._head_ve, None
        return ve

    # ------------------------------------------------------------------ events
    def queue_interrupt(self, vector: int) -> None:
        """Make an interrupt pending (SPEC §3.3).

        It stops the local retry loop and MapGPA between chunks, and is delivered (logged in
        ``guest_log``, guest progress for zero-step) at the next VP.ENTER.
        """
        self._events.append(check_int("vector", vector, 0, 256))

    def clear_queue(self) -> int:
        """Abandon the guest ops not yet completed (a program the guest gives up); return how many.

        ``TdxValueError`` while a ``KVM_RUN`` holds the vCPU (its mutex is taken).
        """
        if self.mutex.holders():
            msg = f"vCPU {self.vcpu_id} is in KVM_RUN: its queue cannot be cleared"
            raise TdxValueError(msg, name="vcpu", value=self.vcpu_id)
        n = len(self._queue) + len(self._ve_ops)
        self._queue.clear()
        self._ve_ops.clear()
        self._head_ve = None
        self.completion = None
        return n

    def kick(self) -> None:
        """``kvm_vcpu_kick``: an IPI to a vCPU in the guest.

        It takes an external-interrupt exit at its next step (KVM handles it and re-enters, unless
        ``wait_for_sept_zap`` refuses the entry).
        """
        self._kick_pending = True

    @property
    def has_pending_event(self) -> bool:
        """``kvm_vcpu_has_events`` for the model: a queued interrupt not yet delivered."""
        return bool(self._events)

    @property
    def has_pending_signal(self) -> bool:
        """Whether :meth:`raise_signal` is pending (``signal_pending(current)``)."""
        return self._signal
