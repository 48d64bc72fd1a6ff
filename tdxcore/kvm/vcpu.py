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
from typing import TYPE_CHECKING, Any, Deque, Generator, Iterable, List, NamedTuple, Optional, Tuple

from tdxcore import guest as _guest
from tdxcore.constants import EXIT_REASON_TDCALL, PAGE_SHIFT, PAGE_SIZE, ExitReason
from tdxcore.errors import TdxTypeError, check_int
from tdxcore.kvm.ioctl import OK, Ret, ebadf, fail, fd_call, ioctl
from tdxcore.kvm.run import GuestEvent, KvmRun
from tdxcore.sched import PREEMPT, WRITE, KLock, Wait
from tdxcore.status import TDX_OPERAND_BUSY  # type: ignore[attr-defined]

if TYPE_CHECKING:
    from tdxcore.kvm.tdx_vm import TdxVm

__all__ = ["Vcpu", "VcpuTdState", "MemRegion", "VP_ENTER_MAX_BUSY", "SEPT_ZAP_MAX_WAITS"]

#: Bound on back-to-back VP.ENTER attempts that return OPERAND_BUSY within one ``run()`` (upstream
#: re-enters from the fastpath without a bound; the model bounds it so a livelock becomes a
#: KVM_BUG and EIO instead of a hang). Each retry yields PREEMPT so the holder can finish.
VP_ENTER_MAX_BUSY = 1000
#: Bound on PREEMPT yields while ``vm.wait_for_sept_zap`` refuses entry within one ``run()``.
SEPT_ZAP_MAX_WAITS = 64


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

    def __repr__(self) -> str:
        return (f"Vcpu(vm={self.vm.id}, id={self.vcpu_id}, fd={self.fd}, {self.state.name}, "
                f"tdvpr={self.tdvpr}, tdcx={len(self.tdcx)})")

    @property
    def in_guest(self) -> bool:
        """Whether the vCPU is between VP.ENTER's entry and its exit (what a kick waits for)."""
        op = self._enter_op
        return op is not None and bool(op.in_guest)

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot of the vCPU's ``nr_*`` counters (``nr_vp_enter_busy``, ``nr_entries``, ...)."""
        return dict(sorted(self._counters.items()))

    @property
    def queue(self) -> Tuple[Any, ...]:
        """The guest ops not yet completed, head first."""
        return tuple(self._queue)

    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n
        self.vm.kvm.host.count(name, n)

    @property
    def is_closed(self) -> bool:
        """Whether the vCPU fd was closed."""
        return not self._fd_open

    def state_bytes(self) -> bytes:
        """``<QqBBqH`` vcpu_id, fd, state, fd_open, tdvpr (-1 none), TDCX count, then ``<Q`` each.

        Then the run state: ``<QQQB`` next guest op index, queued ops, guest_log length, pending
        signal (the ops themselves are the actor's program, hashed by its position).
        """
        return struct.pack(f"<QqBBqH{len(self.tdcx)}QQQQB", self.vcpu_id, self.fd, int(self.state),
                           self._fd_open, -1 if self.tdvpr is None else self.tdvpr, len(self.tdcx),
                           *self.tdcx, self._next_index, len(self._queue), len(self.guest_log),
                           self._signal)

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
            (EFAULT), page already populated (EEXIST), short ``source`` (EFAULT), PAGE.ADD BUSY
            (EBUSY) or error (EIO), MR.EXTEND error (EIO), mirror map KVM_BUG (EIO).

        Notes
        -----
        ``tdx_vcpu_init_mem_region`` → ``kvm_gmem_populate`` → ``tdx_gmem_post_populate``
        (6.18); tdx-facts §5.5. The PRIVATE memory attribute is not checked yet (the attribute
        store arrives with the memory issue).
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
            if not isinstance(o, (_guest.Read, _guest.Write, _guest.Hlt)):
                msg = f"ops[{i}]={o!r} is not a guest op (tdxcore.guest.read/write/hlt)"
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
        ioctl(self.vm.kvm.host, "KVM_RUN", self.vm.id, self._guard(self.run_gen_checked(new)))
        return self.kvm_run

    def run_gen(self, ops: Optional[Iterable[Any]] = None) -> Generator[Any, Any, Ret]:
        """Return the generator of :meth:`run` for an actor (SPEC §5): ``ops`` are validated now."""
        return self._guard(self.run_gen_checked(self._check_ops(ops)))

    def run_gen_checked(self, new: Tuple[Any, ...]) -> Generator[Any, Any, Ret]:
        """:meth:`run_gen` body for already validated ops (see :meth:`run`)."""
        from tdxcore.kvm.tdx_vm import TdState

        vm = self.vm
        owner = yield Wait(self.mutex, WRITE)
        try:
            if vm.td_state != TdState.RUNNABLE:
                return fail(_errno.EINVAL, f"TD is {vm.td_state.name}, not RUNNABLE")
            if self.state != VcpuTdState.INITIALIZED or self.tdvpr is None:
                return fail(_errno.EINVAL, f"vCPU {self.vcpu_id} is not initialized")
            self._queue.extend(new)
            return (yield from self._vcpu_run())
        finally:
            self.mutex.release(owner, WRITE)

    def _vcpu_run(self) -> Generator[Any, Any, Ret]:
        vm = self.vm
        tdx = vm.kvm.host.tdx
        waits = busy = 0
        actor = f"vm{vm.id}.vcpu{self.vcpu_id}"
        while True:
            if self._signal:
                self._signal = False
                self._count("nr_signal_exits")
                return self._set_exit(ExitReason.INTR, -_errno.EINTR)
            if vm.is_dead:
                return fail(_errno.EIO, f"VM {vm.id} is dead ({vm.bug_reason or 'killed'})")
            if vm.wait_for_sept_zap:
                # tdx_vcpu_run: no entry while a zap retries after BUSY; vcpu_run loops
                if waits >= SEPT_ZAP_MAX_WAITS:
                    return self._set_exit(ExitReason.INTR, -_errno.EINTR)
                waits += 1
                self._count("nr_sept_zap_waits")
                yield PREEMPT
                continue
            assert self.tdvpr is not None
            cpu = tdx.vcpu(self.tdvpr).associated_cpu
            op = tdx.vp_enter(self.tdvpr, cpu=cpu, actor=actor)
            if not op.acquired:
                status = op.result.status
                if status.base == TDX_OPERAND_BUSY:
                    busy += 1
                    self._count("nr_vp_enter_busy")
                    if busy > VP_ENTER_MAX_BUSY:
                        vm.bug(f"TDH.VP.ENTER BUSY {busy} times in a row")
                        return fail(_errno.EIO, f"TDH.VP.ENTER stayed BUSY ({busy} tries): KVM_BUG")
                    yield PREEMPT
                    continue
                # tdx_handle_exit: an error status is an unexpected exit
                self._count("nr_entry_failures")
                return self._set_exit(ExitReason.INTERNAL_ERROR, 0)
            self._enter_op = op
            try:
                op.enter()
                self._count("nr_entries")
                return (yield from self._guest(op))
            finally:
                if op.in_guest:             # the actor was closed while in the guest
                    op.exit(EXIT_REASON_TDCALL, rip=self._next_index)
                self._enter_op = None

    def _set_exit(self, reason: ExitReason, ret: int) -> Ret:
        self.kvm_run.exit_reason = reason
        self.kvm_run.ret = ret
        return OK

    def _log(self, gop: Any, status: Optional[int], value: Optional[int]) -> None:
        self.guest_log.append(GuestEvent(self._next_index, gop, status, 0, (), value, None))
        self._queue.popleft()
        self._next_index += 1

    def _guest(self, op: Any) -> Generator[Any, Any, Ret]:
        """Execute queued guest ops until one needs an exit (the vCPU is in the guest)."""
        vm = self.vm
        host = vm.kvm.host
        while self._queue:
            yield PREEMPT                   # in the guest: other actors run, kicks wait
            gop = self._queue[0]
            if isinstance(gop, _guest.Hlt):
                # TDG.VP.VMCALL<Instruction.HLT>: R10 = 0, R11 = 12 → EXIT_REASON_HLT
                op.exit(EXIT_REASON_TDCALL, rip=self._next_index)
                self._log(gop, 0, None)
                return self._set_exit(ExitReason.HLT, 0)
            gfn = gop.gpa >> PAGE_SHIFT
            leaf = vm.mmu.leaf(gfn)
            if gop.gpa & (1 << (vm.gpaw - 1)) or leaf is None or vm.hkid is None:
                op.exit(EXIT_REASON_TDCALL, rip=self._next_index)
                return fail(_errno.EINVAL, f"guest op {self._next_index} touches gpa {gop.gpa:#x}, which is "
                            "shared or not mapped (faults are not modelled yet)")
            off = gop.gpa & (PAGE_SIZE - 1)
            if isinstance(gop, _guest.Read):
                data = host.frame_read(leaf[0], off, gop.size, vm.hkid)
                self._log(gop, None, int.from_bytes(data, "little"))
            else:
                host.frame_write(leaf[0], off, gop.value.to_bytes(gop.size, "little"), vm.hkid)
                self._log(gop, None, None)
        # an empty queue: the guest halts (no op is logged)
        op.exit(EXIT_REASON_TDCALL, rip=self._next_index)
        return self._set_exit(ExitReason.HLT, 0)
