"""The KVM layer (SPEC §2, §3.2): VMs, guest_memfd, memslots, the fd table, the errno boundary.

``Kvm`` (``/dev/kvm``) creates :class:`Vm` objects; a VM creates :class:`GuestMemfd` files and
sets memslots. Kernel helpers return ``0``/``-errno`` as upstream does; ``kvm/ioctl.py`` is the one
place a negative errno becomes :class:`~tdxcore.errors.KvmError`.
"""

from tdxcore.kvm.gmem import GuestMemfd
from tdxcore.kvm.kvm import FdTable, Kvm, Memfd
from tdxcore.kvm.memslot import Memslot, Memslots
from tdxcore.kvm.vm import Vm

__all__ = ["Kvm", "Vm", "GuestMemfd", "FdTable", "Memfd", "Memslot", "Memslots"]
