"""Target ``guest``: random guest programs through ``vcpu.run``, with a VMM answering the exits.

A RUNNABLE TD (2 vCPUs, 4 MiB private at 4 GiB, SEPT_VE_DISABLE by the input's choice) runs
programs of every op in :mod:`tdxcore.guest` — private and shared-alias GPAs, MMIO outside the
slot, MapGPA over ranges, raw TDVMCALLs with random registers — built with random arguments
(wrong ones too). The target plays QEMU: it converts memory on MEMORY_FAULT and MapGPA exits (or
refuses, or does nothing), fills I/O and MMIO reads, writes the ``ret`` fields (sometimes
garbage), raises signals, queues interrupts and punches holes in between. ``run()`` may return
an exit or raise ``KvmError``; a bounded number of runs per input is the hang guard (libFuzzer's
``-timeout`` and the replay watchdog catch a ``run()`` that never returns). Invariants hold
throughout and after teardown.
"""

from __future__ import annotations

from typing import Any, List

from tdxcore import guest
from tdxcore.constants import ExitReason, MemAttr, TdAttr
from tdxcore.invariants import check_invariants
from tdxcore.kvm import Kvm, helpers
from tdxcore.module.host import Host

from .common import ALLOWED, Finding
from .fdp import Fdp

GPA = 4 << 30
MEM = 4 << 20
SHARED = 1 << 47          # the shared bit of a 4-level (GPAW 48) TD
MAX_RUNS = 24
MAX_PROGRAM = 8


def _gpa(f: Fdp) -> Any:
    k = f.u8() % 8
    base = GPA + (f.int_in(0, 15) << 12) + (f.int_in(0, 7) * 8 if f.u8() < 64 else 0)
    if k < 4:
        g = base
    elif k < 6:
        g = base | SHARED
    elif k == 6:
        g = GPA + MEM + (f.int_in(0, 3) << 12)         # outside the slot: MMIO / emulated
    else:
        g = f.big()
    return f.value(g) if f.u8() < 16 else g


def _op(f: Fdp) -> Any:
    k = f.u8() % 16

    def v(good: Any) -> Any:
        # One argument in 16 goes through the junk/edge mill: most programs stay valid and run.
        return f.value(good) if f.u8() < 16 else good

    if k < 3:
        return guest.read(_gpa(f), v(f.pick((8, 4, 1, 2, 3))))
    if k < 6:
        return guest.write(_gpa(f), v(f.uint(8)), v(f.pick((8, 4, 1, 2))))
    if k < 8:
        return guest.accept(_gpa(f), v(f.pick((0, 0, 1, 2))))
    if k == 8:
        return guest.map_gpa(_gpa(f), v(f.pick((0x1000, 0x2000, 1 << 21, 0, 0x800))), v(f.bool()))
    if k == 9:
        return guest.mmio(_gpa(f), v(f.pick((8, 4, 1))), v(f.bool()), v(f.uint(4)))
    if k == 10:
        return guest.io(v(f.int_in(0, 0xFFFF)), v(f.pick((1, 2, 4))), v(f.bool()), v(f.uint(4)))
    if k == 11:
        return f.pick((guest.hlt, lambda: guest.cpuid(v(f.uint(4)), v(f.uint(1))),
                       lambda: guest.msr_read(v(f.uint(4))),
                       lambda: guest.msr_write(v(f.uint(4)), v(f.uint(8)))))()
    if k == 12:
        return guest.get_quote(_gpa(f), v(f.pick((0x1000, 0, 0x2000))))
    if k == 13:
        return f.pick((lambda: guest.get_tdvmcall_info(v(f.int_in(0, 3))),
                       lambda: guest.setup_event_notify(v(f.int_in(0, 300))),
                       lambda: guest.report_fatal_error(v(f.uint(8)))))()
    regs = {f.pick(guest.TDVMCALL_REGS): v(f.big()) for _ in range(f.int_in(0, 3))}
    return guest.tdvmcall(v(f.pick((0x10000, 0x10001, 0x10002, 0x10004, 30, 31, 32, 48, 0, 12))), **regs)


def _vmm(f: Fdp, vm: Any, run: Any) -> None:
    """Answer the exit in ``run`` as a VMM would — or not, or with garbage."""
    k = f.u8() % 8
    r = run.exit_reason
    if r in (ExitReason.MEMORY_FAULT, ExitReason.HYPERCALL) and k < 6:
        try:
            helpers.handle_memory_conversion(vm, run, discard=f.bool())
        except ALLOWED:
            pass
        if r == ExitReason.HYPERCALL and k == 5:
            run.hypercall.ret = f.big()
        return
    if r == ExitReason.MMIO and not run.mmio.is_write:
        run.mmio.data = f.raw(8).ljust(8, b"\0") if k < 7 else f.pick((b"", b"\x01" * 9))
    elif r == ExitReason.IO:
        run.io.data = f.raw(run.io.size or 1)
    elif r == ExitReason.TDX:
        for name in ("get_quote", "get_tdvmcall_info", "setup_event_notify"):
            if k < 6:
                getattr(run.tdx, name).ret = f.pick((0, 1, 2)) if k < 5 else f.big()


def _side(f: Fdp, td: Any) -> None:
    """Host-side actions between runs."""
    k = f.u8() % 6
    if k == 0:
        td.vm.set_memory_attributes(GPA + (f.int_in(0, 15) << 12), f.pick((0x1000, 1 << 21)),
                                    f.pick((0, int(MemAttr.PRIVATE))))
    elif k == 1 and td.gmem is not None:
        td.gmem.fallocate(3, f.int_in(0, 15) << 12, f.pick((0x1000, 0x2000)))
    elif k == 2:
        td.vcpus[f.int_in(0, len(td.vcpus) - 1)].raise_signal()
    elif k == 3:
        td.vcpus[f.int_in(0, len(td.vcpus) - 1)].queue_interrupt(f.value(f.int_in(32, 255)))
    elif k == 4:
        td.vcpus[f.int_in(0, len(td.vcpus) - 1)].clear_queue()


def target(data: bytes) -> None:
    """Fuzz target ``guest`` (see the module docstring)."""
    f = Fdp(data)
    host = Host(packages=1, cpus_per_package=2, memory=32 << 20, tdx_keyids=4, seed=0)
    host.tdx.enable()
    attrs = int(TdAttr.SEPT_VE_DISABLE) if f.u8() % 4 == 0 else 0
    td = helpers.td_create(Kvm(host), vcpus=2, memory=MEM, gpa=GPA, attributes=attrs)
    for i in range(MAX_RUNS):
        if f.remaining == 0:
            break
        try:
            if f.u8() % 4 == 0:
                _side(f, td)
            vcpu = td.vcpus[f.int_in(0, len(td.vcpus) - 1)]
            prog: List[Any] = []
            for _ in range(f.int_in(0, MAX_PROGRAM)):
                try:
                    prog.append(_op(f))
                except ALLOWED:
                    if f.u8() < 32:
                        prog.append(f.pick(([], None, 5, guest.hlt)))   # junk in the program itself
            run = vcpu.run(prog if f.u8() < 240 else f.pick((None, [None], (1,), "x")))
            _vmm(f, td.vm, run)
        except ALLOWED:
            pass
        except Exception as e:
            msg = f"run {i}: {type(e).__name__}: {e}"
            raise Finding(msg) from e
        if i % 8 == 7:
            check_invariants(host)
    check_invariants(host)
    td.close()
    check_invariants(host)
