"""The KVM layer (SPEC §2, §3.2): VMs, guest_memfd, memslots, the fd table, the errno boundary.

``Kvm`` (``/dev/kvm``) creates :class:`Vm` objects; a VM creates :class:`GuestMemfd` files and
sets memslots.
``Vcpu.run`` is KVM_RUN (``kvm_run`` is its :class:`KvmRun`); ``helpers`` is the selftest-style
vocabulary (``td_create`` ...).
``TdxVm`` (type TDX) adds the TD lifecycle, ``Vcpu`` its vCPUs (and KVM_TDX_INIT_MEM_REGION);
``MirrorMmu`` (``mmu.py``) is a TD's mirror root, driven through the 6.18 TDX hooks of ``tdx_mmu.py``;
``DirectMmu`` its shared mappings. ``attributes.py`` is KVM_SET_MEMORY_ATTRIBUTES, ``fault.py`` the
page-fault path and EPT-violation handler, ``vcpu_run.py`` KVM_RUN's loop, ``exits.py`` the TDVMCALL
dispatch, ``policy.py`` the BUSY retry policies (``Policy.LINUX_6_18``, ``Policy.SERIES_2023``).
Kernel helpers return ``0``/``-errno`` as upstream does; ``kvm/ioctl.py`` is the one
place a negative errno becomes :class:`~tdxcore.errors.KvmError`.
"""

from tdxcore.kvm import helpers
from tdxcore.kvm.gmem import GuestMemfd
from tdxcore.kvm.kvm import FdTable, Kvm, Memfd
from tdxcore.kvm.memslot import Memslot, Memslots
from tdxcore.kvm.mmu import DirectMmu, MirrorMmu, SpteState
from tdxcore.kvm.policy import Linux618Policy, Policy, Series2023Policy
from tdxcore.kvm.run import GuestEvent, Interrupt, KvmRun, VeInfo
from tdxcore.kvm.tdx_vm import CpuidEntry, Leak, TdState, TdxCapabilities, TdxVm
from tdxcore.kvm.vcpu import MemRegion, Vcpu, VcpuTdState
from tdxcore.kvm.vm import Vm

__all__ = ["Kvm", "Vm", "GuestMemfd", "FdTable", "Memfd", "Memslot", "Memslots", "TdxVm", "TdState",
           "Vcpu", "VcpuTdState", "Leak", "CpuidEntry", "TdxCapabilities", "MemRegion", "MirrorMmu",
           "SpteState", "DirectMmu", "KvmRun", "GuestEvent", "VeInfo", "Interrupt", "Policy",
           "Linux618Policy", "Series2023Policy", "helpers"]
