"""tdx.Host: validation, CPUs, frames, keyed contents, user memory, RNG, stats, registry, hash."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from tdxcore.constants import PAGE_SIZE, PageType
from tdxcore.errors import HostError, TdxTypeError, TdxValueError
from tdxcore.module import Host
from tdxcore.module.frames import HVA_BASE, LOW_RESERVED_FRAMES

SMALL = dict(memory=8 << 20)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"packages": 0}, TdxValueError, "packages=0x0"),
        ({"packages": "2"}, TdxTypeError, "packages="),
        ({"cpus_per_package": 0}, TdxValueError, "cpus_per_package"),
        ({"memory": 1 << 20}, TdxValueError, "memory=0x100000"),
        ({"memory": (8 << 20) + 1}, TdxValueError, "memory=0x800001 is not a multiple"),
        ({"memory": 3 * (4 << 20) + 4096, "packages": 2}, TdxValueError, "multiple of packages"),
        ({"memory": 1 << 44}, TdxValueError, "memory="),
        ({"tdx_keyids": -1}, TdxValueError, "tdx_keyids"),
        ({"mktme_keyids": 1.0}, TdxTypeError, "mktme_keyids"),
        ({"seed": -1}, TdxValueError, "seed"),
        ({"cpu_erratum_pw_mce": 1}, TdxTypeError, "cpu_erratum_pw_mce"),
        ({"seamrr": None}, TdxTypeError, "seamrr"),
        ({"booted_cpus": 3}, TdxTypeError, "booted_cpus"),
        ({"booted_cpus": [0, 9]}, TdxValueError, "booted_cpus=0x9"),
        ({"booted_cpus": [0, 1, 1]}, TdxValueError, "twice"),
        ({"booted_cpus": [1, 2]}, TdxValueError, "must include CPU 0"),
    ],
)
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        Host(**{**SMALL, **kw})


def test_defaults_and_geometry():
    h = Host()
    assert (h.nr_packages, h.cpus_per_package, h.nr_cpus, h.memory) == (2, 2, 4, 1 << 30)
    assert h.keyids.global_keyid == 32 and h.cpu_erratum_pw_mce is False
    assert h.online_cpus == (0, 1, 2, 3) and [h.package_of(c) for c in range(4)] == [0, 0, 1, 1]
    assert h.nr_frames == (1 << 30) // PAGE_SIZE and h.pamt.nr_frames == h.nr_frames
    assert h.tdx.host is h and "Host(" in repr(h)


# ---------------------------------------------------------------- CPUs
def test_cpu_offline_online_events():
    h = Host(**SMALL)
    assert h.cpu_offline(1) == 0 and not h.is_cpu_online(1)
    assert h.cpu_offline(1) == 0  # already offline: no-op
    assert h.cpu_online(1) == 0 and h.is_cpu_online(1)
    assert [e[2:] for _, e in h.events.filter(kind="cpu")] == [(1, 0, 0), (1, 0, 1)]
    assert h.stats.nr_cpu_offline == 1 and h.stats.nr_cpu_online == 1


def test_offline_last_cpu_of_package_refused_while_hkid_configured():
    h = Host(**SMALL)
    h.cpu_offline(3)
    hkid = h.keyids.alloc()
    h.keyids.note_configured(hkid)
    with pytest.raises(HostError) as ei:
        h.cpu_offline(2)
    assert ei.value.errno == errno.EBUSY and "package 1" in str(ei.value)
    assert h.is_cpu_online(2)
    h.cpu_offline(1)  # package 0 still has cpu 0
    h.keyids.note_unconfigured(hkid)
    assert h.cpu_offline(2) == 0


def test_offline_last_online_cpu_refused():
    h = Host(packages=1, cpus_per_package=1, **SMALL)
    with pytest.raises(HostError, match="last online CPU") as ei:
        h.cpu_offline(0)
    assert ei.value.errno == errno.EBUSY


def test_cpu_bad_numbers():
    h = Host(**SMALL)
    for f in (h.cpu_offline, h.cpu_online, h.is_cpu_online, h.package_of):
        with pytest.raises(TdxValueError, match="cpu=0x4"):
            f(4)
    with pytest.raises(TdxValueError, match="package"):
        h.first_online_cpu(2)


def test_never_booted_cpu_boots_when_onlined():
    h = Host(booted_cpus=[0, 1, 2], **SMALL)
    assert not h.is_cpu_booted(3) and not h.is_cpu_online(3)
    h.cpu_online(3)
    assert h.is_cpu_booted(3)


# ---------------------------------------------------------------- frames
def test_allocator_lowest_first_reuse_and_exhaustion():
    h = Host(**SMALL)
    first = h.alloc_frame()
    assert first == LOW_RESERVED_FRAMES
    nxt = h.alloc_frame()
    h.free_frame(first)
    assert h.alloc_frame() == first
    total = h.free_frames
    got = [h.alloc_frame() for _ in range(total)]
    assert len(set(got)) == total and h.free_frames == 0 and min(got) > nxt
    with pytest.raises(HostError) as ei:
        h.alloc_frame()
    assert ei.value.errno == errno.ENOMEM
    h.free_frame(got[5])
    assert h.alloc_frame() == got[5]


def test_free_frame_rules():
    h = Host(**SMALL)
    with pytest.raises(TdxValueError, match="not an allocated"):
        h.free_frame(LOW_RESERVED_FRAMES)
    with pytest.raises(TdxValueError, match="not an allocated"):
        h.free_frame(3)
    p = h.alloc_frame()
    h.free_frame(p)
    with pytest.raises(TdxValueError, match="double free"):
        h.free_frame(p)
    with pytest.raises(TdxValueError, match="pfn"):
        h.free_frame(h.nr_frames)


def test_frame_contents_keyed():
    h = Host(**SMALL)
    p = h.alloc_frame()
    assert h.frame_read(p, 0, 16, 0) == bytes(16) == h.frame_read(p, 0, 16, 40)  # fresh: zeros
    secret = bytes(range(200)) * 5
    h.frame_write(p, 100, secret, 40)
    assert h.frame_keyid(p) == 40
    assert h.frame_read(p, 100, len(secret), 40) == secret
    for k in (0, 1, 32, 41):
        other = h.frame_read(p, 100, len(secret), k)
        assert other != secret and len(other) == len(secret)
        assert all(other[i:i + 64] != secret[i:i + 64] for i in range(0, len(secret) - 64, 64))
        assert other == h.frame_read(p, 100, len(secret), k)  # deterministic
    # same seed, same scramble in another host; other seed differs
    h2, h3 = Host(**SMALL), Host(seed=1, **SMALL)
    for hh in (h2, h3):
        hh.frame_write(p, 100, secret, 40)
    assert h2.frame_read(p, 0, 4096, 0) == h.frame_read(p, 0, 4096, 0) != h3.frame_read(p, 0, 4096, 0)
    # a host write under KeyID 0 re-tags the frame; the private data never comes back as plaintext
    h.frame_write(p, 0, b"host", 0)
    assert h.frame_keyid(p) == 0 and secret not in h.frame_read(p, 0, 4096, 40)
    assert h.frame_read(p, 0, 4, 0) == b"host"
    h.frame_clear(p)
    assert h.frame_keyid(p) is None and h.frame_read(p, 0, 4096, 40) == bytes(4096)


def test_frame_io_bad_input():
    h = Host(**SMALL)
    with pytest.raises(TdxValueError, match="crosses the end"):
        h.frame_write(300, 4090, b"12345678", 0)
    with pytest.raises(TdxValueError, match="keyid"):
        h.frame_read(300, 0, 1, 64)
    with pytest.raises(TdxTypeError, match="data"):
        h.frame_write(300, 0, "str", 0)  # type: ignore[arg-type]
    with pytest.raises(TdxValueError, match="size"):
        h.frame_read(300, 0, 4097, 0)
    with pytest.raises(TdxValueError, match="pfn"):
        h.frame_read(h.nr_frames, 0, 1, 0)


# ---------------------------------------------------------------- user memory
def test_mmap_read_write_lazy_backing():
    h = Host(**SMALL)
    hva = h.mmap(3 * PAGE_SIZE - 5)
    assert hva == HVA_BASE and hva % PAGE_SIZE == 0
    free0 = h.free_frames
    assert h.read(hva, 10) == bytes(10) and h.free_frames == free0  # zero page, no frame
    h.write(hva + PAGE_SIZE - 2, b"abcd")  # crosses pages 0 and 1
    assert h.free_frames == free0 - 2
    assert h.read(hva + PAGE_SIZE - 2, 4) == b"abcd"
    pfn = h.user.backing(hva)
    assert pfn is not None and h.frame_keyid(pfn) == 0
    hva2 = h.mmap(PAGE_SIZE)
    assert hva2 >= hva + 4 * PAGE_SIZE  # guard page between mappings


@pytest.mark.parametrize("op", ["read", "write"])
def test_bad_hva_efault(op):
    h = Host(**SMALL)
    hva = h.mmap(PAGE_SIZE)
    for bad in (hva - 1, hva + PAGE_SIZE, 0x1000):
        with pytest.raises(HostError) as ei:
            h.read(bad, 1) if op == "read" else h.write(bad, b"x")
        assert ei.value.errno == errno.EFAULT
    with pytest.raises(HostError) as ei:  # runs off the end of the mapping
        h.read(hva + PAGE_SIZE - 1, 2) if op == "read" else h.write(hva + PAGE_SIZE - 1, b"xy")
    assert ei.value.errno == errno.EFAULT


def test_mmap_errors():
    h = Host(**SMALL)
    with pytest.raises(HostError) as ei:
        h.mmap(0)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(TdxValueError, match="size"):
        h.mmap(-1)
    with pytest.raises(TdxTypeError, match="data"):
        h.write(h.mmap(10), [1])  # type: ignore[arg-type]


def test_write_enomem_leaves_nothing():
    h = Host(**SMALL)
    hva = h.mmap(4 * PAGE_SIZE)
    while h.free_frames > 1:
        h.alloc_frame()
    with pytest.raises(HostError) as ei:
        h.write(hva, bytes(2 * PAGE_SIZE))
    assert ei.value.errno == errno.ENOMEM and h.free_frames == 1 and h.user.nr_backed == 0


class _Rec:
    def __init__(self, log):
        self.log = log

    def invalidate_range_start(self, s, e):
        self.log.append(("start", s, e))

    def invalidate_range_end(self, s, e):
        self.log.append(("end", s, e))


def test_madvise_dontneed_notifies_then_frees():
    h = Host(**SMALL)
    hva = h.mmap(4 * PAGE_SIZE)
    h.write(hva, b"x" * (3 * PAGE_SIZE))
    log = []
    seen_backed = []
    h.add_mmu_notifier(lambda s, e: (log.append(("fn", s, e)), seen_backed.append(h.user.nr_backed)))
    h.add_mmu_notifier(_Rec(log))
    free0 = h.free_frames
    assert h.madvise_dontneed(hva + PAGE_SIZE, 2 * PAGE_SIZE) == 2
    rng = (hva + PAGE_SIZE, hva + 3 * PAGE_SIZE)
    assert log == [("fn", *rng), ("start", *rng), ("end", *rng)]
    assert seen_backed == [3]  # notifiers run before the frames are dropped
    assert h.free_frames == free0 + 2
    assert h.read(hva + PAGE_SIZE, 4) == bytes(4) and h.read(hva, 1) == b"x"
    assert h.stats.nr_madvise == 1


def test_madvise_errors_and_notifier_rules():
    h = Host(**SMALL)
    hva = h.mmap(PAGE_SIZE)
    with pytest.raises(HostError) as ei:
        h.madvise_dontneed(hva + 1, 10)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(HostError) as ei:
        h.madvise_dontneed(hva, 2 * PAGE_SIZE)
    assert ei.value.errno == errno.ENOMEM
    assert h.madvise_dontneed(hva, 0) == 0
    with pytest.raises(TdxTypeError, match="notifier"):
        h.add_mmu_notifier(42)
    with pytest.raises(TdxValueError, match="not subscribed"):
        h.remove_mmu_notifier(print)
    f = lambda s, e: None  # noqa: E731
    h.add_mmu_notifier(f)
    h.remove_mmu_notifier(f)


# ---------------------------------------------------------------- rng, stats, vms, leaks
def test_rng_streams_independent_and_stable():
    a, b = Host(**SMALL), Host(**SMALL)
    xa = [a.rng("sched").random() for _ in range(3)]
    b.rng("inject").random()  # another consumer does not shift "sched"
    xb = [b.rng("sched").random() for _ in range(3)]
    assert xa == xb and a.rng("sched") is a.rng("sched")
    assert Host(seed=7, **SMALL).rng("sched").random() != xa[0]
    with pytest.raises(TdxTypeError, match="name"):
        a.rng("")


def test_stats_snapshot_frozen():
    h = Host(**SMALL)
    s = h.stats
    h.count("nr_custom", 3)
    assert h.stats.nr_custom == 3 and s.nr_seamcalls_total == 0
    with pytest.raises(AttributeError):
        _ = s.nr_custom  # not in the older snapshot
    with pytest.raises(AttributeError):
        s.nr_seamcalls_total = 5
    with pytest.raises(TdxValueError, match="nr_"):
        h.count("busy")
    assert h.stats.as_dict()["nr_custom"] == 3 and "nr_custom=3" in repr(h.stats)


def test_vm_registry():
    h = Host(**SMALL)
    v1, v2 = object(), object()
    h.register_vm(v1)
    h.register_vm(v2)
    assert h.vms == (v1, v2)
    with pytest.raises(TdxValueError, match="already registered"):
        h.register_vm(v1)
    h.unregister_vm(v1)
    assert h.vms == (v2,)
    with pytest.raises(TdxValueError, match="not registered"):
        h.unregister_vm(v1)


def test_record_leak():
    h = Host(**SMALL)
    r = h.record_leak(300, int(PageType.PT_REG), "private page", 33, "RECLAIM failed")
    assert h.leaks == (r,) and h.events[r.event_index][0] == "leak"
    r2 = h.record_leak(None, None, "tdr", None, "x", event_index=0)
    assert r2.event_index == 0 and h.stats.nr_leaks == 2
    with pytest.raises(TdxValueError, match="event_index"):
        h.record_leak(None, None, "tdr", None, "x", event_index=99)
    with pytest.raises(TdxTypeError, match="reason"):
        h.record_leak(None, None, "tdr", None, "")
    with pytest.raises(TdxValueError, match="pfn"):
        h.record_leak(-1, None, "tdr", None, "x")


# ---------------------------------------------------------------- state hash
def _build(seed=0):
    h = Host(memory=64 << 20, seed=seed)
    h.tdx.enable()
    hva = h.mmap(8192)
    h.write(hva, b"hello")
    p = h.alloc_frame()
    h.frame_write(p, 0, b"secret", 40)
    h.keyids.alloc()
    h.cpu_offline(3)
    h.rng("sched").random()
    return h


def test_state_hash_tracks_state():
    a, b = _build(), _build()
    assert a.state_hash() == b.state_hash()
    before = a.state_hash()
    a.frame_write(a.alloc_frame(), 0, b"x", 0)
    assert a.state_hash() != before
    assert _build(seed=1).state_hash() != b.state_hash()


_SCRIPT = "from tests.module.test_host import _build; print(_build().state_hash())"


def test_state_hash_same_across_processes_and_hash_seeds():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    outs = []
    for seed in ("0", "987"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=root)
        outs.append(subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, check=True,
                                   capture_output=True, text=True).stdout.strip())
    assert outs[0] == outs[1] == str(_build().state_hash())
