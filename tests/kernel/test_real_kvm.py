"""The guest_memfd / memslot cases against the real ``/dev/kvm`` and the model (SPEC §4.11).

Each case of :mod:`tests.kernel.cases` runs on a fresh DEFAULT VM (type 0) of the real kernel
(``fcntl.ioctl`` with ``struct``-packed structs, user memory from ``mmap(2)`` through ctypes) and of
the model (``tdx.Kvm`` over a ``Host``); the outcome lists must be equal. The kernel's answers are
recorded in ``kvm_answers.json`` so a machine without ``/dev/kvm`` still checks the model:

* ``test_model_matches_recorded`` always runs (offline);
* ``test_model_matches_live_kernel`` runs where ``/dev/kvm`` opens, else it is skipped with the
  reason, and also checks that the recording is still what the kernel answers.

Re-record with ``python3 -m tests.kernel.test_real_kvm --record`` (on a machine with /dev/kvm).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import mmap
import os
import platform
import struct
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from tdxcore.constants import (
    IOC_NONE,
    IOC_READ,
    IOC_WRITE,
    KVM_CREATE_GUEST_MEMFD_SIZE,
    KVM_MEMORY_REGION2_SIZE,
    KVM_MEMORY_REGION_SIZE,
    KVMIO,
    PAGE_SIZE,
    KvmIoctlNr,
    VmType,
)
from tests.kernel.cases import CASES, RANDOM_COUNT, RANDOM_SEED, USER_MAP_SIZE, random_cases

ANSWERS = Path(__file__).with_name("kvm_answers.json")
DEV_KVM = "/dev/kvm"


def _ioc(direction: int, nr: int, size: int) -> int:
    """``_IOC(dir, KVMIO, nr, size)`` of asm-generic/ioctl.h."""
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_CREATE_VM = _ioc(IOC_NONE, KvmIoctlNr.CREATE_VM, 0)
KVM_CHECK_EXTENSION = _ioc(IOC_NONE, KvmIoctlNr.CHECK_EXTENSION, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(IOC_WRITE, KvmIoctlNr.SET_USER_MEMORY_REGION, KVM_MEMORY_REGION_SIZE)
KVM_SET_USER_MEMORY_REGION2 = _ioc(IOC_WRITE, KvmIoctlNr.SET_USER_MEMORY_REGION2, KVM_MEMORY_REGION2_SIZE)
KVM_CREATE_GUEST_MEMFD = _ioc(IOC_READ | IOC_WRITE, KvmIoctlNr.CREATE_GUEST_MEMFD,
                              KVM_CREATE_GUEST_MEMFD_SIZE)

_REGION = struct.Struct("<IIQQQ")
_REGION2 = struct.Struct("<IIQQQQII14Q")
_GMEM = struct.Struct("<QQ6Q")
assert _REGION.size == KVM_MEMORY_REGION_SIZE and _REGION2.size == KVM_MEMORY_REGION2_SIZE
assert _GMEM.size == KVM_CREATE_GUEST_MEMFD_SIZE


def _u64(v: int) -> int:
    return v & ((1 << 64) - 1)


def _fill(data: bytes) -> str:
    return f"fill:{data[0]:02x}" if data and data.count(data[0]) == len(data) else "mixed"


# --------------------------------------------------------------------------------------------
# The real kernel
# --------------------------------------------------------------------------------------------
class RealKvm:
    """Run case steps on ``/dev/kvm`` (one DEFAULT VM per case)."""

    def __init__(self) -> None:
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        self.libc = ctypes.CDLL(libc_name, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_long]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        self.kvm = os.open(DEV_KVM, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.kvm)

    def _mmap(self, size: int, fd: int = -1, flags: Optional[int] = None) -> int:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if flags is None:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        addr = self.libc.mmap(None, size, prot, flags, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return int(addr)

    def run_case(self, case: Dict[str, Any]) -> List[Any]:
        """Return the outcome of each step of ``case``."""
        vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, int(VmType.DEFAULT))
        base = self._mmap(USER_MAP_SIZE)
        env: Dict[str, int] = {"vm": vm, "kvm": self.kvm}
        opened = [vm]
        closed: set = set()
        try:
            return [self._step(op, args, env, base, opened, closed) for op, args in case["steps"]]
        finally:
            for fd in reversed(opened):
                if fd not in closed:
                    os.close(fd)
            self.libc.munmap(base, USER_MAP_SIZE)

    def _step(self, op: str, a: Dict[str, Any], env: Dict[str, int], base: int, opened: List[int],
              closed: set) -> Any:
        try:
            return self._do(op, a, env, base, opened, closed)
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, str(e.errno))

    def _do(self, op: str, a: Dict[str, Any], env: Dict[str, int], base: int, opened: List[int],
            closed: set) -> Any:
        if op == "check_extension":
            return fcntl.ioctl(env[a.get("fd", "vm")], KVM_CHECK_EXTENSION, a["cap"])
        if op == "vm":
            fd = fcntl.ioctl(self.kvm, KVM_CREATE_VM, int(VmType.DEFAULT))
            opened.append(fd)
            env[a["as"]] = fd
            return "ok"
        if op == "gmem":
            buf = bytearray(_GMEM.pack(_u64(a["size"]), _u64(a.get("flags", 0)), a.get("reserved", 0),
                                       0, 0, 0, 0, 0))
            fd = fcntl.ioctl(env[a.get("vm", "vm")], KVM_CREATE_GUEST_MEMFD, buf, True)
            opened.append(fd)
            env[a["as"]] = fd
            return "ok"
        if op == "memfd":
            fd = os.memfd_create("tdxcore-case", os.MFD_CLOEXEC)
            opened.append(fd)
            env[a["as"]] = fd
            return "ok"
        if op == "close":
            fd = env[a["fd"]]
            os.close(fd)
            closed.add(fd)
            return "ok"
        if op == "fallocate":
            r = self.libc.fallocate(env[a["fd"]], a["mode"], a["offset"], a["len"])
            if r:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            return "ok"
        if op in ("gmem_read", "gmem_write"):
            off, n = a["offset"], a["len"]
            start = off & ~(PAGE_SIZE - 1)
            length = -(-(off + n - start) // PAGE_SIZE) * PAGE_SIZE
            m = mmap.mmap(env[a["fd"]], length, mmap.MAP_SHARED, offset=start)
            try:
                if op == "gmem_write":
                    m[off - start:off - start + n] = bytes([a["byte"]]) * n
                    return "ok"
                return _fill(m[off - start:off - start + n])
            finally:
                m.close()
        if op in ("region", "region2"):
            uaddr = a["uaddr_abs"] if "uaddr_abs" in a else base + a["uaddr"]
            if op == "region":
                buf = bytearray(_REGION.pack(_u64(a["slot"]), a["flags"], _u64(a["gpa"]), _u64(a["size"]),
                                             _u64(uaddr)))
                fcntl.ioctl(env["vm"], KVM_SET_USER_MEMORY_REGION, buf, True)
            else:
                g = a.get("gmem", 0)
                gfd = env[g] if isinstance(g, str) else g
                buf = bytearray(_REGION2.pack(_u64(a["slot"]), a["flags"], _u64(a["gpa"]), _u64(a["size"]),
                                              _u64(uaddr), _u64(a.get("gmem_offset", 0)), gfd, 0, *[0] * 14))
                fcntl.ioctl(env["vm"], KVM_SET_USER_MEMORY_REGION2, buf, True)
            return "ok"
        msg = f"unknown step {op!r}"
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class ModelKvm:
    """Run case steps on the model: a fresh ``Host`` + ``Kvm`` + DEFAULT VM per case."""

    def run_case(self, case: Dict[str, Any]) -> List[Any]:
        """Return the outcome of each step of ``case``."""
        from tdxcore.kvm import Kvm
        from tdxcore.module.host import Host

        host = Host(packages=1, cpus_per_package=1, memory=64 << 20)
        kvm = Kvm(host)
        vm = kvm.create_vm(VmType.DEFAULT)
        base = host.mmap(USER_MAP_SIZE)
        env: Dict[str, Any] = {"vm": vm, "kvm": kvm}
        return [self._step(op, a, env, kvm, base) for op, a in case["steps"]]

    @staticmethod
    def _fd(obj: Any, kvm: Any) -> int:
        return kvm.fd if obj is kvm else obj.fd

    def _step(self, op: str, a: Dict[str, Any], env: Dict[str, Any], kvm: Any, base: int) -> Any:
        from tdxcore.errors import KvmError

        try:
            return self._do(op, a, env, kvm, base)
        except KvmError as e:
            return errno.errorcode.get(e.errno or 0, str(e.errno))

    def _do(self, op: str, a: Dict[str, Any], env: Dict[str, Any], kvm: Any, base: int) -> Any:
        if op == "check_extension":
            return env[a.get("fd", "vm")].check_extension(a["cap"])
        if op == "vm":
            env[a["as"]] = kvm.create_vm(VmType.DEFAULT)
            return "ok"
        if op == "gmem":
            env[a["as"]] = env[a.get("vm", "vm")].create_guest_memfd(_u64(a["size"]), _u64(a.get("flags", 0)))
            return "ok"
        if op == "memfd":
            env[a["as"]] = kvm.fds.get(kvm.memfd_create("tdxcore-case"))
            return "ok"
        if op == "close":
            obj = env[a["fd"]]
            kvm.close(self._fd(obj, kvm))
            return "ok"
        if op == "fallocate":
            env[a["fd"]].fallocate(a["mode"], a["offset"], a["len"])
            return "ok"
        if op == "gmem_write":
            env[a["fd"]].write(a["offset"], bytes([a["byte"]]) * a["len"])
            return "ok"
        if op == "gmem_read":
            return _fill(env[a["fd"]].read(a["offset"], a["len"]))
        if op in ("region", "region2"):
            uaddr = a["uaddr_abs"] if "uaddr_abs" in a else base + a["uaddr"]
            args = (_u64(a["slot"]), a["flags"], _u64(a["gpa"]), _u64(a["size"]), _u64(uaddr))
            if op == "region":
                env["vm"].set_user_memory_region(*args)
            else:
                g = a.get("gmem", 0)
                env["vm"].set_user_memory_region2(*args, _u64(a.get("gmem_offset", 0)),
                                                  self._fd(env[g], kvm) if isinstance(g, str) else g)
            return "ok"
        msg = f"unknown step {op!r}"
        raise ValueError(msg)


def all_cases() -> List[Dict[str, Any]]:
    """The hand-written cases, then the recorded seeded random ones."""
    return CASES + random_cases(RANDOM_SEED, RANDOM_COUNT)


def run_model(cases: Optional[List[Dict[str, Any]]] = None) -> Dict[str, List[Any]]:
    """Run every case (default :func:`all_cases`) on the model."""
    m = ModelKvm()
    return {c["name"]: m.run_case(c) for c in (all_cases() if cases is None else cases)}


def live_kvm_reason() -> Optional[str]:
    """Why the live test cannot run here (None: it can)."""
    if not os.path.exists(DEV_KVM):
        return f"{DEV_KVM} is absent"
    if not os.access(DEV_KVM, os.R_OK | os.W_OK):
        return f"{DEV_KVM} is not accessible (uid {os.getuid()})"
    try:
        k = RealKvm()
    except OSError as e:
        return f"cannot open {DEV_KVM}: {e}"
    try:
        vm = fcntl.ioctl(k.kvm, KVM_CREATE_VM, int(VmType.DEFAULT))
        os.close(vm)
    except OSError as e:
        return f"KVM_CREATE_VM(0) fails: {e}"
    finally:
        k.close()
    return None


def run_real(cases: Optional[List[Dict[str, Any]]] = None) -> Dict[str, List[Any]]:
    """Run every case (default :func:`all_cases`) on the real kernel."""
    k = RealKvm()
    try:
        return {c["name"]: k.run_case(c) for c in (all_cases() if cases is None else cases)}
    finally:
        k.close()


if __name__ == "__main__":  # pragma: no cover - the re-recording tool
    if "--record" not in sys.argv[1:]:
        print("usage: python3 -m tests.kernel.test_real_kvm --record", file=sys.stderr)
        sys.exit(2)
    why = live_kvm_reason()
    if why:
        print(f"cannot record: {why}", file=sys.stderr)
        sys.exit(1)
    answers = run_real()
    lines = [f"  {json.dumps(c['name'])}: {json.dumps(answers[c['name']])}" for c in all_cases()]
    ANSWERS.write_text('{"schema": "tdxcore.kvm_answers/1", '
                       f'"kernel": {json.dumps(platform.release())}, "vm_type": 0, '
                       f'"random_seed": {RANDOM_SEED}, "random_count": {RANDOM_COUNT}, "answers": {{\n'
                       + ",\n".join(lines) + "\n}}\n")
    print(f"recorded {len(answers)} cases from Linux {platform.release()} into {ANSWERS}")


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def _recorded() -> Dict[str, Any]:
    return json.loads(ANSWERS.read_text())


def _diff(expected: Dict[str, List[Any]], got: Dict[str, List[Any]], what: str) -> List[str]:
    out = []
    for c in all_cases():
        e, g = expected.get(c["name"]), got.get(c["name"])
        if e != g:
            out.append(f"{c['name']} ({c['doc']}): {what} {e} != model {g}")
    return out


def test_recording_covers_every_case():
    doc = _recorded()
    assert doc["schema"] == "tdxcore.kvm_answers/1" and doc["vm_type"] == 0
    assert (doc["random_seed"], doc["random_count"]) == (RANDOM_SEED, RANDOM_COUNT)
    assert sorted(doc["answers"]) == sorted(c["name"] for c in all_cases())
    for c in all_cases():
        assert len(doc["answers"][c["name"]]) == len(c["steps"]), c["name"]


def test_case_names_unique():
    names = [c["name"] for c in all_cases()]
    assert len(names) == len(set(names))


def test_model_matches_recorded():
    """Offline: the model's DEFAULT VM gives the recorded kernel answer for every case."""
    problems = _diff(_recorded()["answers"], run_model(), "kernel")
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(live_kvm_reason() is not None, reason=f"live /dev/kvm: {live_kvm_reason()}")
def test_model_matches_live_kernel():
    """Live: the running kernel and the model agree per case, and the recording is current."""
    real = run_real()
    problems = _diff(real, run_model(), "kernel")
    stale = _diff(_recorded()["answers"], real, "recorded")
    assert not problems, "\n".join(problems)
    assert not stale, "kvm_answers.json is stale (re-record with --record):\n" + "\n".join(stale)


@pytest.mark.skipif(live_kvm_reason() is not None, reason=f"live /dev/kvm: {live_kvm_reason()}")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_model_matches_live_kernel_random(seed):
    """Live: more seeded random sequences (not recorded) agree step by step."""
    cases = random_cases(seed, RANDOM_COUNT)
    real, model = run_real(cases), run_model(cases)
    bad = [f"{c['name']}: steps {c['steps']}\n kernel {real[c['name']]}\n model  {model[c['name']]}"
           for c in cases if real[c["name"]] != model[c["name"]]]
    assert not bad, "\n".join(bad[:3])


def test_random_cases_are_deterministic():
    assert random_cases(5, 3) == random_cases(5, 3) and random_cases(5, 3) != random_cases(6, 3)


def test_ioctl_numbers():
    """The encodings match the values the kernel headers give (and the live kernel accepted)."""
    assert KVM_CREATE_VM == 0xAE01 and KVM_CHECK_EXTENSION == 0xAE03
    assert KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
    assert KVM_CREATE_GUEST_MEMFD == 0xC040AED4


def test_errno_names_known():
    for answers in _recorded()["answers"].values():
        for a in answers:
            if isinstance(a, str) and a.startswith("E"):
                assert hasattr(errno, a), a


def test_live_reason_when_dev_kvm_absent(monkeypatch):
    """Without /dev/kvm the live test is skipped with a reason, never failed."""
    monkeypatch.setattr(sys.modules[__name__], "DEV_KVM", "/nonexistent/kvm")
    assert live_kvm_reason() == "/nonexistent/kvm is absent"


def test_model_outcomes_are_well_formed():
    for name, outcomes in run_model().items():
        for o in outcomes:
            assert o == "ok" or isinstance(o, int) or o.startswith(("fill:", "mixed", "E")), (name, o)


def test_offline_comparison_has_teeth(monkeypatch):
    """A model that forgets the GPA-overlap rule (EEXIST) is caught by the recorded answers."""
    from tdxcore.kvm.memslot import Memslots

    monkeypatch.setattr(Memslots, "overlaps", lambda self, as_id, id_, start, end: None)
    problems = _diff(_recorded()["answers"], run_model(), "kernel")
    assert any(p.startswith("slot_overlap ") for p in problems)
