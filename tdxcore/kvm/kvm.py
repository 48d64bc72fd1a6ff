"""``Kvm``: the model's ``/dev/kvm`` — system ioctls, VM creation, and the fd table (SPEC §3.2).

The fd table (``kvm.fds``) gives every open file of the model a number, as the process's fd table
does: ``/dev/kvm`` itself, each VM, each guest_memfd, each plain memfd from :meth:`Kvm.memfd_create`.
Numbers are the lowest free from 3 up (0-2 are the standard streams), and a closed number may be
reused — so "the VM fd", "a plain memfd" and "a closed fd" can be passed where the kernel takes an
fd, and get the kernel's EINVAL / EBADF.
"""

from __future__ import annotations

import errno as _errno
import hashlib
import struct
from typing import Any, Dict, Generator, Iterator, Optional, Tuple, Type

from tdxcore.constants import (
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_READONLY_MEM,
    KVM_EXIT_HYPERCALL_VALID_MASK,
    KVM_MAX_NR_ADDRESS_SPACES,
    KVM_MAX_VCPUS,
    KVM_USER_MEM_SLOTS,
    Cap,
    MemAttr,
    VmType,
)
from tdxcore.errors import TdxTypeError, TdxValueError, check_int
from tdxcore.kvm.gmem import GuestMemfd, kvm_gmem_get_supported_flags
from tdxcore.kvm.ioctl import OK, Ret, fail, fd_call, ioctl, register_kvm_events
from tdxcore.kvm.policy import Policy
from tdxcore.kvm.vcpu import Vcpu
from tdxcore.kvm.vm import Vm

__all__ = ["Kvm", "FdTable", "Memfd", "STORE_BACKENDS"]

#: Memory-attribute store backends (``AttributeStore(backend=...)``).
STORE_BACKENDS = ("ranges", "xarray")

#: Lowest fd number the table hands out.
FIRST_FD = 3


class Memfd:
    """A plain ``memfd_create`` file: an open file that is not a guest_memfd."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fd = -1  # set when installed

    def __repr__(self) -> str:
        return f"Memfd({self.name!r}, fd={self.fd})"


class FdTable:
    """Open files by number (lowest free first); the model's process fd table."""

    def __init__(self) -> None:
        self._files: Dict[int, Any] = {}

    def install(self, obj: Any) -> int:
        """Give ``obj`` the lowest free number and return it."""
        fd = FIRST_FD
        while fd in self._files:
            fd += 1
        self._files[fd] = obj
        return fd

    def get(self, fd: int) -> Optional[Any]:
        """Return the open file at ``fd``, or None (``fget`` failing)."""
        return self._files.get(fd)

    def remove(self, fd: int) -> Any:
        """Drop ``fd`` from the table (the caller releases the file)."""
        return self._files.pop(fd)

    def __contains__(self, fd: object) -> bool:
        return fd in self._files

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._files))

    def items(self) -> Tuple[Tuple[int, Any], ...]:
        """``(fd, file)`` pairs in fd order."""
        return tuple(sorted(self._files.items(), key=lambda kv: kv[0]))


class Kvm:
    """The model's ``/dev/kvm`` on one host.

    Parameters
    ----------
    host : Host
        The machine (frames, user memory, events, the VM registry).
    policy : Policy, optional
        The retry policy every VM of this ``Kvm`` uses (default ``Policy.LINUX_6_18``; SPEC §4.1).
    store : str
        Backend of each VM's memory-attribute store: ``"ranges"`` (default) or ``"xarray"``.
    terminate_vm : bool
        Enable the opt-in ``KVM_TDX_TERMINATE_VM`` extension (not in 6.18; SPEC §3.2).

    Attributes
    ----------
    fds : FdTable
        Every open file of the model.
    fd : int
        The number of ``/dev/kvm`` itself in ``fds``.

    Notes
    -----
    ``VM_CLASSES`` maps each VM type the model can create to its class; a type not in it is
    EINVAL from :meth:`create_vm`, as the kernel answers for a type it was not built with
    (``kvm_is_vm_type_supported``). TDX (type 5) is registered by ``kvm/tdx_vm.py``.
    """

    VM_CLASSES: Dict[int, Type[Vm]] = {int(VmType.DEFAULT): Vm, int(VmType.SW_PROTECTED): Vm}
    # VmType.TDX is added by tdxcore.kvm.tdx_vm (imported by tdxcore.kvm)

    def __init__(self, host: Any, policy: Optional[Policy] = None, *, store: str = "ranges",
                 terminate_vm: bool = False) -> None:
        if not hasattr(host, "register_vm") or not hasattr(host, "alloc_frame"):
            msg = f"host={host!r} must be a tdx.Host"
            raise TdxTypeError(msg, name="host", value=host)
        if policy is None:
            policy = Policy.LINUX_6_18
        if not isinstance(policy, Policy):
            msg = f"policy={policy!r} must be a tdx.Policy (e.g. Policy.LINUX_6_18)"
            raise TdxTypeError(msg, name="policy", value=policy)
        if store not in STORE_BACKENDS:
            msg = f"store={store!r} must be one of {STORE_BACKENDS}"
            raise TdxValueError(msg, name="store", value=store)
        if not isinstance(terminate_vm, bool):
            msg = f"terminate_vm={terminate_vm!r} must be a bool"
            raise TdxTypeError(msg, name="terminate_vm", value=terminate_vm)
        self.host = host
        self.policy: Policy = policy
        self.store = store
        self.terminate_vm_enabled = terminate_vm
        register_kvm_events(host)
        self.fds = FdTable()
        self.fd = self.fds.install(self)
        self._nr_vms = 0

    def __repr__(self) -> str:
        return (f"Kvm(fd={self.fd}, policy={self.policy.name}, store={self.store!r}, "
                f"open_fds={len(self.fds)}, vms_created={self._nr_vms})")

    def state_hash(self) -> int:
        """Stable 64-bit hash of the KVM layer's state (blake2b, digest 8, little-endian).

        Serialization: ``<Q`` VMs created, ``<Q`` open fds, then per fd ascending ``<q`` fd, the
        kind (``kvm``/``vm``/``gmem``/``memfd`` as bytes + NUL) and, for a VM or guest_memfd,
        its ``state_bytes()``; then the ``state_bytes()`` of every VM still alive but whose fd
        is closed, by VM id.
        """
        h = hashlib.blake2b(digest_size=8, person=b"tdxkvm")
        h.update(struct.pack("<QQ", self._nr_vms, len(self.fds)))
        for fd, f in self.fds.items():
            kind = ("kvm" if f is self else "vm" if isinstance(f, Vm) else
                    "gmem" if isinstance(f, GuestMemfd) else "vcpu" if isinstance(f, Vcpu) else "memfd")
            h.update(struct.pack("<q", fd) + kind.encode() + b"\0")
            if isinstance(f, (Vm, GuestMemfd, Vcpu)):
                h.update(f.state_bytes())
        for vm in sorted((v for v in self.host.vms if isinstance(v, Vm) and v.kvm is self and v.is_closed),
                         key=lambda v: v.id):
            h.update(vm.state_bytes())
        return int.from_bytes(h.digest(), "little")

    # ------------------------------------------------------------------ system ioctls
    def create_vm(self, type: int = VmType.DEFAULT) -> Vm:  # noqa: A002 - the ioctl's word
        """``KVM_CREATE_VM``: a new VM of machine ``type``.

        Raises
        ------
        KvmError
            EINVAL for a type this model does not build (SEV*); for TDX, the errno of
            ``host.tdx.enable()`` if the module cannot be brought up (ENODEV, EIO, ...).
        """
        t = check_int("type", type, 0, 1 << 64)
        out: list = []

        def op() -> Generator[Any, Any, Ret]:
            yield from ()
            cls = self.VM_CLASSES.get(t)
            if cls is None:
                return fail(_errno.EINVAL, f"VM type {t} is not supported")
            pre = cls._pre_create(self)
            if pre[0] < 0:
                return pre
            vm = cls(self, VmType(t), self.host.next_vm_id())
            self._nr_vms += 1
            out.append(vm)
            return vm.fd, ""

        ioctl(self.host, "KVM_CREATE_VM", None, op())
        return out[0]

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on ``/dev/kvm`` (0 for an unknown cap)."""
        c = check_int("cap", cap, -(1 << 63), 1 << 63)

        def op() -> Generator[Any, Any, Ret]:
            yield from ()
            return self._check_extension(None, c), ""

        return ioctl(self.host, "KVM_CHECK_EXTENSION", None, op())

    def _check_extension(self, vm: Optional[Vm], cap: int) -> int:
        """``kvm_vm_ioctl_check_extension_generic`` + x86, for the caps this layer implements."""
        if cap in (Cap.USER_MEMORY, Cap.USER_MEMORY2, Cap.GUEST_MEMFD):
            return 1
        if cap == Cap.NR_MEMSLOTS:
            return KVM_USER_MEM_SLOTS
        if cap == KVM_CAP_GUEST_MEMFD_FLAGS:
            return kvm_gmem_get_supported_flags(vm)
        if cap == KVM_CAP_READONLY_MEM:
            return int(vm is None or vm.has_readonly_mem)
        if cap == KVM_CAP_MULTI_ADDRESS_SPACE:
            # compiled out when there is one address space (no SMM), as on the reference kernel
            if KVM_MAX_NR_ADDRESS_SPACES == 1:
                return 0
            return KVM_MAX_NR_ADDRESS_SPACES if vm is None else vm.nr_memslot_as_ids
        if cap == Cap.MEMORY_ATTRIBUTES:
            return int(MemAttr.PRIVATE) if vm is None or vm.has_private_mem else 0
        if cap == Cap.SPLIT_IRQCHIP:
            return 1
        if cap == Cap.EXIT_HYPERCALL:
            return KVM_EXIT_HYPERCALL_VALID_MASK
        if cap == Cap.MAX_VCPUS:
            return KVM_MAX_VCPUS if vm is None else vm.max_vcpus
        if cap == Cap.VM_TYPES:
            mask = 0
            for t in self.VM_CLASSES:
                mask |= 1 << t
            return mask
        return 0

    # ------------------------------------------------------------------ files
    def memfd_create(self, name: str = "memfd") -> int:
        """``memfd_create(2)``: a plain (non-guest_memfd) file; returns its fd number."""
        if not isinstance(name, str):
            msg = f"name={name!r} must be a str"
            raise TdxTypeError(msg, name="name", value=name)
        m = Memfd(name)
        m.fd = self.fds.install(m)
        return m.fd

    def close(self, fd: int) -> None:
        """``close(fd)`` of any number in the table (a VM, guest_memfd, memfd; not ``/dev/kvm``).

        Raises
        ------
        KvmError
            EBADF for a number that is not open.
        TdxValueError
            ``fd`` is ``/dev/kvm`` itself (the model's Kvm never closes).
        """
        n = check_int("fd", fd, 0, 1 << 31)
        f = self.fds.get(n)
        if f is self:
            msg = f"fd={n} is /dev/kvm: the model's Kvm stays open"
            raise TdxValueError(msg, name="fd", value=n)
        if isinstance(f, (Vm, GuestMemfd, Vcpu)):
            f.close()
            return
        ret: Ret = fail(_errno.EBADF, f"fd {n} is not open") if f is None else OK
        if f is not None:
            self.fds.remove(n)
        fd_call(self.host, "close", None, ret)
