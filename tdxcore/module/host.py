"""``tdx.Host``: the machine the model runs on (SPEC §3.1; issue 4 item 1).

The host puts small objects together (STYLE §2.11): CPUs and packages (here), the frame
allocator, frame contents and user memory (:mod:`.frames`), the KeyID partition
(:mod:`.keyids`), the PAMT core, the event log, counters, the seeded RNG streams, the VM
registry and the leak records, and the TDX module (``host.tdx``).
"""

from __future__ import annotations

import errno as _errno
import hashlib
import random
import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from tdxcore._pamt import Pamt
from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE
from tdxcore.errors import HostError, TdxTypeError, TdxValueError, check_int
from tdxcore.eventlog import EventLog
from tdxcore.module.frames import FrameAllocator, FrameContents, UserMemory
from tdxcore.module.keyids import KeyIdPartition
from tdxcore.module.tdx_module import TdxModule

__all__ = ["Host", "Stats", "LeakRecord", "HOST_COUNTERS"]

#: Counters the host and module keep themselves (others are declared on first ``count``).
HOST_COUNTERS = ("nr_seamcalls_total", "nr_seamcall_errors", "nr_injected", "nr_sc_retries",
                 "nr_bringup_failures", "nr_frames_allocated", "nr_frames_freed", "nr_leaks",
                 "nr_cpu_offline", "nr_cpu_online", "nr_madvise")


class Stats:
    """A frozen snapshot of the host's ``nr_*`` counters with attribute access (SPEC §3.2).

    ``host.stats.nr_seamcalls_total`` (int); ``host.stats.nr_seamcalls`` is a read-only
    ``{Leaf: calls}`` and ``host.stats.nr_busy`` a ``{(leaf, operand): BUSY results}`` (SEAMCALL
    and TDCALL leaves; ``OPERAND_BUSY`` and ``OPERAND_BUSY_HOST_PRIORITY``). An undeclared name
    raises ``AttributeError`` (no silent 0).
    """

    __slots__ = ("_d", "_maps")
    _d: "MappingProxyType[str, int]"
    _maps: "MappingProxyType[str, Any]"

    def __init__(self, counters: Mapping[str, int],
                 maps: Optional[Mapping[str, Mapping[Any, int]]] = None) -> None:
        object.__setattr__(self, "_d", MappingProxyType(dict(counters)))
        object.__setattr__(self, "_maps", MappingProxyType(
            {k: MappingProxyType(dict(v)) for k, v in (maps or {}).items()}))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._d[name]
        except KeyError:
            pass
        try:
            return self._maps[name]
        except KeyError:
            msg = f"no counter {name!r}"
            raise AttributeError(msg) from None

    def __setattr__(self, name: str, value: Any) -> None:
        msg = "Stats is a frozen snapshot"
        raise AttributeError(msg)

    def as_dict(self) -> Mapping[str, int]:
        """Read-only mapping of every scalar counter."""
        return self._d

    def __repr__(self) -> str:
        return "Stats(" + ", ".join(f"{k}={v}" for k, v in sorted(self._d.items())) + ")"


@dataclass(frozen=True)
class LeakRecord:
    """A frame or object left unreclaimed on purpose (SPEC §4.9; tdx-facts §5.8)."""

    pfn: Optional[int]
    page_type: Optional[int]
    what: str
    hkid: Optional[int]
    reason: str
    event_index: int


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        msg = f"{name}={v!r} must be a bool"
        raise TdxTypeError(msg, name=name, value=v)
    return v


class Host:
    """One model host: CPUs, memory, KeyIDs, PAMT, events, counters, RNG streams, the module.

    Parameters
    ----------
    packages : int
        CPU packages (sockets), 1..64; also the NUMA nodes memory is split across.
    cpus_per_package : int
        Logical CPUs per package, 1..256. CPU ``c`` is in package ``c // cpus_per_package``.
    memory : int
        Bytes of RAM: a multiple of ``packages * 4 KiB``, at least 4 MiB, below 16 TiB.
    tdx_keyids : int
        TDX private KeyIDs (the first is the global KeyID); < 2 is accepted and makes
        ``tdx.enable()`` fail detection.
    mktme_keyids : int
        MKTME KeyIDs before them (default 31, so with 32 TDX KeyIDs the 64 KeyIDs of a 6-bit
        partition: global KeyID 32).
    seed : int
        The run's one seed (RNG streams, the frame scramble key).
    cpu_erratum_pw_mce : bool
        The partial-write #MC erratum (SPR/EMR): reclaimed private pages must be cleared (6.18).
    seamrr : bool
        SEAMRR enabled by the BIOS (False: no module can load; ``enable()`` → ENODEV).
    booted_cpus : iterable of int, optional
        CPUs that booted (and are online); the others are present, offline and never booted
        (``maxcpus=``). Default: all. CPU 0 (the boot CPU) must be in it.

    Raises
    ------
    TdxTypeError, TdxValueError
        Any argument of the wrong type or out of range, naming it.
    """

    def __init__(self, packages: int = 2, cpus_per_package: int = 2, memory: int = 1 << 30,
                 tdx_keyids: int = 32, mktme_keyids: int = 31, seed: int = 0,
                 cpu_erratum_pw_mce: bool = False, *, seamrr: bool = True,
                 booted_cpus: Optional[Iterable[int]] = None) -> None:
        self.nr_packages = check_int("packages", packages, 1, 65)
        self.cpus_per_package = check_int("cpus_per_package", cpus_per_package, 1, 257)
        mem = check_int("memory", memory, 4 << 20, 1 << 44)
        if mem % (self.nr_packages * PAGE_SIZE):
            msg = f"memory={mem:#x} is not a multiple of packages * 4 KiB ({self.nr_packages * PAGE_SIZE:#x})"
            raise TdxValueError(msg, name="memory", value=mem)
        self.memory = mem
        self.seed = check_int("seed", seed, 0, 1 << 64)
        self.cpu_erratum_pw_mce = _bool("cpu_erratum_pw_mce", cpu_erratum_pw_mce)
        self.seamrr = _bool("seamrr", seamrr)
        self.nr_cpus = self.nr_packages * self.cpus_per_package
        if booted_cpus is None:
            booted = list(range(self.nr_cpus))
        else:
            if isinstance(booted_cpus, (str, bytes)) or not hasattr(booted_cpus, "__iter__"):
                msg = f"booted_cpus={booted_cpus!r} must be an iterable of CPU numbers"
                raise TdxTypeError(msg, name="booted_cpus", value=booted_cpus)
            booted = [check_int("booted_cpus", c, 0, self.nr_cpus) for c in booted_cpus]
            if len(set(booted)) != len(booted):
                msg = f"booted_cpus={booted!r} lists a CPU twice"
                raise TdxValueError(msg, name="booted_cpus", value=booted)
            if 0 not in booted:
                msg = f"booted_cpus={booted!r} must include CPU 0 (the boot CPU)"
                raise TdxValueError(msg, name="booted_cpus", value=booted)
        self.keyids = KeyIdPartition(mktme_keyids, tdx_keyids)
        self._booted = [c in set(booted) for c in range(self.nr_cpus)]
        self._online = list(self._booted)
        self.nr_frames = mem >> PAGE_SHIFT
        self._counters: Dict[str, int] = {n: 0 for n in HOST_COUNTERS}
        self._by_leaf: Dict[Any, int] = {}                 # Leaf -> SEAMCALLs issued
        self._vm_seq = 0                                   # next_vm_id()
        self._busy: Dict[Tuple[Any, int], int] = {}        # (leaf, operand) -> BUSY results
        self._rngs: Dict[str, random.Random] = {}
        self.events = EventLog()
        self.frames = FrameAllocator(self.nr_frames)
        self._contents = FrameContents(self.nr_frames, self._stream_seed("frame_scramble")[:32])
        self._contents.is_private = self.keyids.is_private   # host_private_reads (S6f)
        self.user = UserMemory(self.alloc_frame, self.free_frame, self._contents)
        self._pamt = Pamt(self.nr_frames)
        self._vms: List[Any] = []
        self._leaks: List[LeakRecord] = []
        self.tdx = TdxModule(self)

    # ------------------------------------------------------------------ CPUs
    def package_of(self, cpu: int) -> int:
        """Package of ``cpu``."""
        return check_int("cpu", cpu, 0, self.nr_cpus) // self.cpus_per_package

    def is_cpu_online(self, cpu: int) -> bool:
        """Whether ``cpu`` is online."""
        return self._online[check_int("cpu", cpu, 0, self.nr_cpus)]

    def is_cpu_booted(self, cpu: int) -> bool:
        """Whether ``cpu`` has booted at least once since power-on."""
        return self._booted[check_int("cpu", cpu, 0, self.nr_cpus)]

    @property
    def online_cpus(self) -> Tuple[int, ...]:
        """Online CPUs, ascending."""
        return tuple(c for c in range(self.nr_cpus) if self._online[c])

    def first_online_cpu(self, package: Optional[int] = None) -> int:
        """Lowest online CPU (of ``package`` if given); ``HostError(ENODEV)`` if there is none."""
        if package is None:
            cpus: Iterable[int] = range(self.nr_cpus)
        else:
            p = check_int("package", package, 0, self.nr_packages)
            cpus = range(p * self.cpus_per_package, (p + 1) * self.cpus_per_package)
        for c in cpus:
            if self._online[c]:
                return c
        msg = f"package {package} has no online CPU"
        raise HostError(_errno.ENODEV, msg)

    def cpu_offline(self, cpu: int) -> int:
        """Take ``cpu`` offline; return 0 (also if it already was).

        Raises
        ------
        HostError
            ``EBUSY``: it is the last online CPU, or the last online CPU of its package while
            an HKID is configured (``keyids.nr_configured``; 6.16 ``tdx_offline_cpu``).

        Notes
        -----
        tdx-facts §4.3: CACHE.WB and KEY.CONFIG need one CPU per package.
        """
        c = check_int("cpu", cpu, 0, self.nr_cpus)
        if not self._online[c]:
            return 0
        if sum(self._online) == 1:
            msg = f"cpu={c} is the last online CPU"
            raise HostError(_errno.EBUSY, msg)
        pkg = c // self.cpus_per_package
        others = [o for o in range(pkg * self.cpus_per_package, (pkg + 1) * self.cpus_per_package)
                  if o != c and self._online[o]]
        if not others and self.keyids.nr_configured:
            msg = (f"cpu={c} is the last online CPU of package {pkg} and "
                   f"{self.keyids.nr_configured} HKID(s) are configured")
            raise HostError(_errno.EBUSY, msg)
        self._online[c] = False
        self.count("nr_cpu_offline")
        self.events.emit("cpu", "host", c, pkg, 0)
        return 0

    def cpu_online(self, cpu: int) -> int:
        """Bring ``cpu`` online (booting it if it never was); return 0 (also if already online).

        Once the kernel ran TDH.SYS.INIT, a CPU without TDH.SYS.LP.INIT gets it here (KVM's
        hotplug "online" callback); if that fails the CPU stays offline (``HostError(EIO)``).
        """
        c = check_int("cpu", cpu, 0, self.nr_cpus)
        if self._online[c]:
            return 0
        self._online[c] = True
        tdx = self.tdx
        if tdx.kernel_sysinit_done and c not in tdx.kernel_lp_done:
            res = tdx.tdh_sys_lp_init(c, actor="cpuhp")
            if res.status != 0:
                self._online[c] = False
                msg = f"cpu={c}: TDH.SYS.LP.INIT failed with {res.status}"
                raise HostError(_errno.EIO, msg)
            tdx.kernel_lp_done[c] = None
        self._booted[c] = True
        self.count("nr_cpu_online")
        self.events.emit("cpu", "host", c, c // self.cpus_per_package, 1)
        return 0

    # ------------------------------------------------------------------ frames
    def alloc_frame(self) -> int:
        """Allocate the lowest free 4K frame (never one below 1 MiB); ``HostError(ENOMEM)``."""
        pfn = self.frames.alloc()
        self.count("nr_frames_allocated")
        return pfn

    def free_frame(self, pfn: int) -> None:
        """Free ``pfn`` (its contents stay: nothing is silently cleared)."""
        p = check_int("pfn", pfn, 0, self.nr_frames)
        self.frames.free(p)
        self.count("nr_frames_freed")

    def alloc_frame_runs(self, nr: int) -> List[Tuple[int, int]]:
        """Allocate ``nr`` frames as ``nr`` :meth:`alloc_frame` calls would; ``(first, count)`` runs.

        All or nothing (``HostError(ENOMEM)``). Batch callers (``kvm/tdx_batch.py``) use it so a
        16 M-page range costs a few runs, not 16 M Python ints.
        """
        n = check_int("nr", nr, 0, self.nr_frames + 1)
        runs = self.frames.alloc_runs(n) if n else []
        self.count("nr_frames_allocated", n)
        return runs

    def free_frame_range(self, pfn: int, nr: int) -> None:
        """Free ``[pfn, pfn + nr)`` (all allocated), as ``nr`` :meth:`free_frame` calls would."""
        p = check_int("pfn", pfn, 0, self.nr_frames)
        n = check_int("nr", nr, 0, self.nr_frames - p + 1)
        self.frames.free_range(p, n)
        self.count("nr_frames_freed", n)

    def frame_clear_range(self, pfn: int, nr: int) -> None:
        """:meth:`frame_clear` each frame of ``[pfn, pfn + nr)``."""
        self._contents.clear_range(pfn, pfn + nr)

    @property
    def free_frames(self) -> int:
        """Frames :meth:`alloc_frame` can still hand out."""
        return self.frames.nr_free

    def frame_write(self, pfn: int, offset: int, data: bytes, keyid: int) -> None:
        """Write ``data`` into frame ``pfn`` at ``offset`` under ``keyid`` (see FrameContents)."""
        k = self.keyids.check_keyid("keyid", keyid)
        self._contents.write(pfn, offset, data, k)

    def frame_read(self, pfn: int, offset: int, size: int, keyid: int) -> bytes:
        """Read ``size`` bytes of frame ``pfn`` as ``keyid`` sees them (scrambled if not the writer's)."""
        k = self.keyids.check_keyid("keyid", keyid)
        return self._contents.read(pfn, offset, size, k)

    def host_frame_read(self, pfn: int, offset: int, size: int, path: str) -> bytes:
        """Read frame ``pfn`` as host software through ``path`` (KeyID 0), logged if private (S6f)."""
        return self._contents.host_read(pfn, offset, size, path)

    @property
    def host_private_reads(self) -> List[Tuple[int, int, str]]:
        """``(pfn, writer KeyID, path)`` of every host read of a frame holding private-KeyID data."""
        return self._contents.host_private_reads

    def frame_clear(self, pfn: int) -> None:
        """Reset frame ``pfn`` to never-written (reads zero under every KeyID)."""
        self._contents.clear(pfn)

    def frame_keyid(self, pfn: int) -> Optional[int]:
        """Return the KeyID that last wrote ``pfn`` (None: never written or cleared)."""
        return self._contents.keyid_of(pfn)

    @property
    def pamt(self) -> Pamt:
        """The module's PAMT (one entry per host frame)."""
        return self._pamt

    def _reset_pamt(self) -> None:
        """Drop all PAMT metadata (bring-up failure freed the PAMT frames that held it)."""
        self._pamt = Pamt(self.nr_frames)

    # ------------------------------------------------------------------ user memory
    def mmap(self, size: int) -> int:
        """Map ``size`` bytes of anonymous user memory; return its page-aligned hva."""
        return self.user.mmap(size)

    def read(self, hva: int, size: int) -> bytes:
        """Read user memory (``HostError(EFAULT)`` outside every mapping)."""
        return self.user.read(hva, size)

    def write(self, hva: int, data: bytes) -> None:
        """Write user memory, backing pages on first touch (``EFAULT``, ``ENOMEM``)."""
        self.user.write(hva, data)

    def madvise_dontneed(self, hva: int, size: int) -> int:
        """``madvise(MADV_DONTNEED)``: notify MMU notifiers, drop backing frames; return #freed."""
        self.count("nr_madvise")
        return self.user.madvise_dontneed(hva, size)

    def madvise_dontneed_gen(self, hva: int, size: int) -> Any:
        """:meth:`madvise_dontneed` as a generator for an actor (MMU notifiers may wait)."""
        self.count("nr_madvise")
        return self.user.madvise_dontneed_gen(hva, size)

    def fault_in(self, hva: int) -> int:
        """``get_user_pages`` of one user page for writing: its backing frame (allocated if needed)."""
        return self.user.fault_in(hva)

    def add_mmu_notifier(self, notifier: Any) -> None:
        """Subscribe to user-memory invalidations (KVM registers here; the module never imports it)."""
        self.user.add_mmu_notifier(notifier)

    def remove_mmu_notifier(self, notifier: Any) -> None:
        """Unsubscribe a notifier."""
        self.user.remove_mmu_notifier(notifier)

    # ------------------------------------------------------------------ RNG, counters
    def _stream_seed(self, name: str) -> bytes:
        return hashlib.blake2b(struct.pack("<Q", self.seed) + name.encode(), digest_size=64,
                               person=b"tdxrng").digest()

    def rng(self, name: str) -> random.Random:
        """Return the named child RNG stream (same object on every call for ``name``).

        Seeded from blake2b(seed, name), so adding a consumer never shifts another's draws.
        """
        if not isinstance(name, str) or not name:
            msg = f"name={name!r} must be a non-empty str"
            raise TdxTypeError(msg, name="name", value=name)
        r = self._rngs.get(name)
        if r is None:
            r = self._rngs[name] = random.Random(int.from_bytes(self._stream_seed(name), "little"))
        return r

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (must start with ``nr_``; declared on first use)."""
        c = self._counters
        if name in c:                   # declared (checked) before: the hot case
            c[name] += n
            return
        if not isinstance(name, str) or not name.startswith("nr_"):
            msg = f"name={name!r} must be a str starting with 'nr_'"
            raise TdxValueError(msg, name="name", value=name)
        self._counters[name] = self._counters.get(name, 0) + n

    @property
    def stats(self) -> Stats:
        """Frozen snapshot of every counter."""
        return Stats(self._counters, {"nr_seamcalls": self._by_leaf, "nr_busy": self._busy})

    def count_seamcall(self, leaf: Any, n: int = 1) -> None:
        """Count ``n`` SEAMCALLs of ``leaf`` (total and per leaf; a batch op counts its pages)."""
        self._counters["nr_seamcalls_total"] += n
        self._by_leaf[leaf] = self._by_leaf.get(leaf, 0) + n

    def count_busy(self, leaf: Any, operand: int) -> None:
        """Count one BUSY result of ``leaf`` on ``operand`` (``nr_busy``)."""
        key = (leaf, operand)
        self._busy[key] = self._busy.get(key, 0) + 1

    # ------------------------------------------------------------------ VMs, leaks
    def next_vm_id(self) -> int:
        """Return a host-unique VM number (every ``Kvm`` on the host draws from it: ``vmN`` stays unique)."""
        self._vm_seq += 1
        return self._vm_seq - 1

    def register_vm(self, vm: Any) -> None:
        """Attach ``vm`` so tools can find it (``TdxValueError`` if already registered)."""
        if any(v is vm for v in self._vms):
            msg = "vm is already registered"
            raise TdxValueError(msg, name="vm", value=vm)
        self._vms.append(vm)

    def unregister_vm(self, vm: Any) -> None:
        """Detach ``vm`` (``TdxValueError`` if it is not registered)."""
        for i, v in enumerate(self._vms):
            if v is vm:
                del self._vms[i]
                return
        msg = "vm is not registered"
        raise TdxValueError(msg, name="vm", value=vm)

    @property
    def vms(self) -> Tuple[Any, ...]:
        """Registered VMs in registration order."""
        return tuple(self._vms)

    def record_leak(self, pfn: Optional[int], page_type: Optional[int], what: str, hkid: Optional[int],
                    reason: str, event_index: Optional[int] = None) -> LeakRecord:
        """Record something left unreclaimed on purpose; logs a ``leak`` event.

        ``event_index`` is the event that caused it (default: the new ``leak`` event).
        """
        p = None if pfn is None else check_int("pfn", pfn, 0, self.nr_frames)
        t = None if page_type is None else check_int("page_type", page_type, 0, 32)
        h = None if hkid is None else self.keyids.check_keyid("hkid", hkid)
        for n, v in (("what", what), ("reason", reason)):
            if not isinstance(v, str) or not v:
                msg = f"{n}={v!r} must be a non-empty str"
                raise TdxTypeError(msg, name=n, value=v)
        if event_index is not None:
            event_index = check_int("event_index", event_index, 0, len(self.events))
        idx = self.events.emit("leak", "host", p, t, what, h, reason)
        rec = LeakRecord(p, t, what, h, reason, idx if event_index is None else event_index)
        self._leaks.append(rec)
        self.count("nr_leaks")
        return rec

    @property
    def leaks(self) -> Tuple[LeakRecord, ...]:
        """Leak records in order."""
        return tuple(self._leaks)

    # ------------------------------------------------------------------ hashing
    def state_hash(self) -> int:
        """Stable 64-bit hash of all model state (same in every process / PYTHONHASHSEED).

        Serialization, in order: geometry ``<QQQQ``; CPU online/booted bytes; ``pamt.state_hash``;
        allocator; frame contents digest; user memory; KeyIDs; module; RNG stream names and
        states (sorted by name); counters (sorted); number of VMs; leaks; event-log digest.
        """
        h = hashlib.blake2b(digest_size=8, person=b"tdxhost")
        h.update(struct.pack("<QQQQ", self.nr_packages, self.cpus_per_package, self.memory, self.seed))
        h.update(bytes(self._online) + bytes(self._booted))
        h.update(struct.pack("<Q", self._pamt.state_hash()))
        h.update(self.frames.state_bytes())
        h.update(self._contents.digest())
        h.update(self.user.state_bytes())
        h.update(self.keyids.state_bytes())
        h.update(self.tdx.state_bytes())
        for name in sorted(self._rngs):
            st = self._rngs[name].getstate()
            h.update(name.encode() + struct.pack(f"<{len(st[1])}Q", *st[1]))
        for name in sorted(self._counters):
            h.update(name.encode() + struct.pack("<q", self._counters[name]))
        h.update(struct.pack("<Q", len(self._vms)))
        for r in self._leaks:
            h.update(repr((r.pfn, r.page_type, r.what, r.hkid, r.reason, r.event_index)).encode())
        h.update(struct.pack("<Q", self.events.digest()))
        return int.from_bytes(h.digest(), "little")

    def __repr__(self) -> str:
        return (f"Host(packages={self.nr_packages}, cpus_per_package={self.cpus_per_package}, "
                f"memory={self.memory:#x}, seed={self.seed}, tdx={self.tdx.status.name})")
