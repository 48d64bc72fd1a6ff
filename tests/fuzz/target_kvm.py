"""Target ``kvm``: KVM ioctls with random arguments, in random order, on random objects.

A small host, its ``Kvm`` and (input's choice) a RUNNABLE TD built by ``helpers.td_create``; the
input then issues ioctls — VM/vCPU creation, caps, INIT_VM/INIT_VCPU/INIT_MEM_REGION/FINALIZE,
guest_memfd create/fallocate/close, memslots, memory attributes, pre-fault, madvise, fds closed or
reused, terminate — with arguments drawn around the valid ones (aligned sizes, slot GPAs, real
fds) and beyond (edges, wrong types). Each must succeed, raise ``KvmError`` with no state change,
or refuse a Python misuse. ``check_invariants`` holds during, and after everything is closed
(teardown in the upstream order, every frame accounted for).
"""

from __future__ import annotations

from typing import Any, List

from tdxcore.constants import Cap, MemAttr, MemFlag, TdAttr, VmType
from tdxcore.errors import KvmError
from tdxcore.invariants import check_invariants
from tdxcore.kvm import Kvm, helpers
from tdxcore.kvm.tdx_vm import TdxVm
from tdxcore.module.host import Host

from .common import ALLOWED, Finding
from .fdp import Fdp

GPA = 4 << 30
M2 = 1 << 21
SIZES = (0x1000, 0x2000, M2, 4 << 20, 0, 0x800, 1 << 30, 1 << 40)
GPAS = (GPA, GPA + 0x1000, GPA + M2, GPA + (4 << 20), 0, 1 << 47, GPA | (1 << 47), GPA + 0x800, 1 << 52)
CAPS = tuple(Cap)
MAX_OPS = 40
CHECK_EVERY = 10


class _World:
    def __init__(self, f: Fdp) -> None:
        self.host = Host(packages=1, cpus_per_package=2, memory=48 << 20, tdx_keyids=4, seed=0)
        self.kvm = Kvm(self.host)
        self.vms: List[Any] = []
        self.vcpus: List[Any] = []
        self.gmems: List[Any] = []
        self.hvas: List[int] = [0]
        k = f.u8() % 3
        if k:
            self.host.tdx.enable()
            td = helpers.td_create(self.kvm, vcpus=k, memory=4 << 20, gpa=GPA,
                                   attributes=int(TdAttr.SEPT_VE_DISABLE) if f.bool() else 0)
            self.vms.append(td.vm)
            self.vcpus += td.vcpus
            if td.gmem is not None:
                self.gmems.append(td.gmem)

    def obj(self, f: Fdp, pool: List[Any]) -> Any:
        """Return an object of ``pool`` (closed ones included), or junk when the pool is empty."""
        if not pool or f.u8() >= 250:
            return None
        return pool[f.int_in(0, len(pool) - 1)]

    def size(self, f: Fdp) -> Any:
        return f.value(f.pick(SIZES))

    def gpa(self, f: Fdp) -> Any:
        return f.value(f.pick(GPAS) + (f.int_in(0, 7) << 12 if f.bool() else 0))

    def fd(self, f: Fdp) -> Any:
        k = f.u8() % 5
        if k < 3 and self.gmems:
            return f.pick(self.gmems)
        if k == 3:
            return f.value(f.int_in(-1, 12))
        return None


def _vm_op(f: Fdp, w: _World, vm: Any) -> None:
    k = f.u8() % 16
    if k == 0:
        vm.enable_cap(f.value(f.pick(CAPS)),
                      *(f.value(f.pick((0, 1, 24, 1 << 12))) for _ in range(f.int_in(0, 2))),
                      flags=f.value(0))
    elif k == 1:
        vm.init_vm(gpaw=f.value(f.pick((48, 52, 47, 0))),
                   attributes=f.value(f.pick((0, int(TdAttr.SEPT_VE_DISABLE), int(TdAttr.DEBUG), 1 << 5))))
    elif k == 2:
        g = vm.create_guest_memfd(w.size(f), flags=f.value(0))
        w.gmems.append(g)
    elif k in (3, 4):
        flags = f.value(f.pick((int(MemFlag.GUEST_MEMFD), 0, int(MemFlag.READONLY), 1, 0xFF)))
        vm.set_user_memory_region2(slot=f.value(f.int_in(0, 3)), flags=flags, guest_phys_addr=w.gpa(f),
                                   memory_size=w.size(f), userspace_addr=f.value(f.pick(w.hvas)),
                                   guest_memfd=w.fd(f), guest_memfd_offset=f.value(f.pick((0, 0x1000, M2))))
    elif k == 5:
        vm.set_user_memory_region(f.value(f.int_in(0, 3)), f.value(0), w.gpa(f), w.size(f),
                                  f.value(f.pick(w.hvas)))
    elif k in (6, 7, 8):
        vm.set_memory_attributes(address=w.gpa(f), size=w.size(f),
                                 attributes=f.value(f.pick((int(MemAttr.PRIVATE), 0, 1, 1 << 63))),
                                 flags=f.value(0))
    elif k == 9:
        w.vcpus.append(vm.create_vcpu(f.value(f.int_in(0, 3))))
    elif k == 10:
        vm.finalize_vm(hw_error=f.value(0))
    elif k == 11:
        vm.check_extension(f.value(f.pick(CAPS)))
        vm.capabilities(f.value(f.pick((256, 0, 1, 1 << 20))))
        vm.get_cpuid()
    elif k == 12:
        vm.get_memory_attributes(f.value(f.pick((GPA >> 12, 0, 1 << 52, (GPA >> 12) + 1))))
    elif k == 13:
        vm.terminate_vm(hw_error=f.value(0))
    elif k == 14 or f.u8() < 192:
        vm.check_extension(f.value(f.pick(CAPS)))
    else:
        vm.close()          # rarely: most later ioctls on a closed VM are one EBADF path


def _vcpu_op(f: Fdp, w: _World, vcpu: Any) -> None:
    k = f.u8() % 6
    if k == 0:
        vcpu.init_vcpu(f.value(0), flags=f.value(0), hw_error=f.value(0))
    elif k == 1:
        src = f.value(bytes(f.pick((4096, 8192, 0, 100))))
        vcpu.init_mem_region(source=src, gpa=w.gpa(f), nr_pages=f.value(f.int_in(0, 2)),
                             measure=f.value(f.bool()))
    elif k == 2:
        vcpu.pre_fault_memory(w.gpa(f), w.size(f), f.value(0))
    elif k == 3:
        from tdxcore import guest
        run = vcpu.run([guest.accept(GPA + (f.int_in(0, 3) << 12)),
                        guest.write(GPA + (f.int_in(0, 3) << 12), 1)])
        run.hypercall.ret = 0
    elif k == 4:
        vcpu.raise_signal() if f.bool() else vcpu.queue_interrupt(f.value(f.int_in(0, 255)))
    else:
        vcpu.close()


def _step(f: Fdp, w: _World) -> None:
    k = f.u8() % 10
    if k < 4:
        vm = w.obj(f, w.vms)
        if vm is not None:
            try:
                _vm_op(f, w, vm)
            except AttributeError as e:
                # A non-TDX ``Vm`` has no TDX sub-ioctl methods (nor create_vcpu) in the model:
                # the method's absence is the answer (upstream: ENOTTY); not bad input.
                if isinstance(vm, TdxVm) or "'Vm' object has no attribute" not in str(e):
                    raise
    elif k < 6:
        v = w.obj(f, w.vcpus)
        if v is not None:
            _vcpu_op(f, w, v)
    elif k == 6:
        w.vms.append(w.kvm.create_vm(f.value(f.pick((VmType.TDX, VmType.TDX, VmType.DEFAULT, 1, 2, 9)))))
    elif k == 7:
        g = w.obj(f, w.gmems)
        if g is not None:
            if f.u8() < 40:
                g.close()
            else:
                g.fallocate(f.value(f.pick((3, 0, 1, 2, 0x10))), f.value(f.pick((0, 0x1000, M2, 1 << 40))),
                            w.size(f))
    elif k == 8:
        w.hvas.append(w.host.mmap(f.value(f.pick((4 << 20, 0x1000, M2, 0, 1 << 40)))))
        if f.bool():
            w.host.madvise_dontneed(f.value(f.pick(w.hvas)), w.size(f))
    else:
        kk = f.u8() % 4
        if kk == 0:
            w.kvm.close(f.value(f.int_in(-1, 12)))
        elif kk == 1:
            w.kvm.memfd_create()
        elif kk == 2:
            w.host.tdx.enable()
        else:
            w.kvm.check_extension(f.value(f.pick(CAPS)))


def _close_all(w: _World) -> None:
    for v in w.vcpus:
        if not v.is_closed:
            v.close()
    for g in w.gmems:
        if not g.is_closed:
            g.close()
    for vm in w.vms:
        if not vm.is_closed:
            vm.close()


def target(data: bytes) -> None:
    """Fuzz target ``kvm`` (see the module docstring)."""
    f = Fdp(data)
    try:
        w = _World(f)
    except KvmError as e:       # the prebuilt TD must build: its failure is a finding
        msg = f"td_create failed: {e}"
        raise Finding(msg) from e
    for i in range(MAX_OPS):
        if f.remaining == 0:
            break
        try:
            _step(f, w)
        except ALLOWED:
            pass
        except Exception as e:
            msg = f"step {i}: {type(e).__name__}: {e}"
            raise Finding(msg) from e
        if i % CHECK_EVERY == CHECK_EVERY - 1:
            check_invariants(w.host)
    check_invariants(w.host)
    try:
        _close_all(w)
    except Exception as e:
        msg = f"closing everything: {type(e).__name__}: {e}"
        raise Finding(msg) from e
    check_invariants(w.host)
