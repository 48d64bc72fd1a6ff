"""Scaling curves for issue 9's plots (``tdxcore bench --plot``): one group per curve.

Every row records in ``extra_info`` what a plot needs, so the plots come from the JSON alone:
``series`` (the line: a backend, baseline or path), ``x`` (the x value) with ``x_unit``,
``per_round`` (how many operations one timed round does), ``y_kind`` (``time_per_op``: seconds
per operation = timing / per_round; ``rate``: operations per second = per_round / timing;
``value``: ``extra_info["value"]``, not a time) and ``extrapolated`` (the point is computed from
a smaller measured one). Groups:

* ``scaling.set_size`` — one attribute-store set vs conversion size (4 KiB → 1 GiB), per backend
  (``ranges``, ``xarray``) and baseline (pyroaring ``add_range``/``remove_range``, dict stores up to
  ``DICT_MAX`` gfns). Alternating values: each round is set-to-shared then set-to-private.
* ``scaling.memory_size`` — ``nbytes`` of an all-private guest vs guest size (1 GiB → 1 TiB) per
  backend: ``ranges`` built at every size, ``xarray`` built up to ``XARRAY_MAX`` and extrapolated
  linearly beyond (its cost is per gfn), pyroaring's serialized size, dict's ``sys.getsizeof`` plus
  its key ints at 1 GiB, extrapolated. Timed: building the store.
* ``scaling.lookup_fragmentation`` — a point lookup vs the number of runs in a 4 GiB guest
  (1 → 2^20 runs of alternating private/shared), ``ranges``, ``xarray``, pyroaring on the same set.
* ``scaling.fault_vcpus`` — private faults per second vs vCPU count (1, 2, 4, 8): ``FAULTS`` fresh
  private pages per round split among the vCPUs, each vCPU a ``vcpu.run_gen`` actor on the seeded
  scheduler (EPT violation → AUG → re-entry → #VE → ACCEPT per page). Baseline: 1 vCPU.
* ``scaling.storm_vcpus`` — default storm steps per second vs vCPU count (1, 8, 16, 64),
  invariants every 1,000 steps; ``extra_info`` has the storm loop's own rates (build excluded).
  Baseline: 8 vCPUs (the default storm).
* ``scaling.teardown`` — teardown time vs private memory for both reclaim paths (``dynamic``:
  6.18's per-page BLOCK/TRACK/kick/REMOVE; ``terminate``: KVM_TDX_TERMINATE_VM then one RECLAIM per
  page), TDs built page by page with KVM_TDX_INIT_MEM_REGION; sizes double from 4 MiB to
  ``TDXCORE_BENCH_SCALING_TEARDOWN_PAGES`` pages (default 8192, 32 MiB, a few seconds; 262144
  measures 1 GiB). ``terminate_batch``: TDs mapped in bulk (``tdx_batch.map_private_range``) and
  reclaimed by the batch path after KVM_TDX_TERMINATE_VM, 4 MiB → 1 GiB.

Setup (stores, TDs, keys) is outside the timed body and cached; results are checked after timing.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List

import numpy as np
import pytest

from tdxcore import guest
from tdxcore._xarray import AttributeStore
from tdxcore.constants import PAGE_SHIFT, MemAttr

pyroaring = pytest.importorskip("pyroaring")
BitMap = pyroaring.BitMap

P = int(MemAttr.PRIVATE)
SEED = 20261122
GIB = 1 << 18                         # gfns per GiB
NR_KEYS = 1000
DICT_MAX = 1 << 13                    # dict stores up to 32 MiB conversions (1 GiB: ≈ 20 ms a set)
XARRAY_MAX = 1 << 22                  # xarray built up to 16 GiB (≈ 38 MB), extrapolated beyond
_CACHE: Dict[Any, Any] = {}


def _cached(key: Any, build: Any) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _stat(benchmark: Any) -> Any:
    return None if benchmark.stats is None else benchmark.stats.stats


def _info(benchmark: Any, series: str, x: float, x_unit: str, per_round: float, y_kind: str,
          **extra: Any) -> None:
    benchmark.extra_info.update({"series": series, "x": x, "x_unit": x_unit, "per_round": per_round,
                                 "y_kind": y_kind, "seed": SEED, **extra})
    st = _stat(benchmark)
    if st is not None and y_kind == "time_per_op":
        benchmark.extra_info["ns_per_op_min"] = st.min / per_round * 1e9
    elif st is not None and y_kind == "rate":
        benchmark.extra_info["per_s_min_time"] = per_round / st.min


# ------------------------------------------------------------------ scaling.set_size
SET_SIZES = [1, 16, 512, 1 << 13, 1 << 18]             # 4 KiB, 64 KiB, 2 MiB, 32 MiB, 1 GiB
SET_IMPLS = ["ranges", "xarray", "pyroaring", "dict"]
SET_CASES = [(i, n) for n in SET_SIZES for i in SET_IMPLS if not (i == "dict" and n > DICT_MAX)]
SET_AT = 4 * GIB                                        # conversions at 16 GiB in a 32 GiB guest


def _set_store(impl: str) -> Any:
    def build() -> Any:
        if impl == "pyroaring":
            b = BitMap()
            b.add_range(0, 8 * GIB)
            return b
        if impl == "dict":
            return dict.fromkeys(range(SET_AT - 16, SET_AT + DICT_MAX + 16), P)
        s = AttributeStore(impl)
        s.set_range(0, 8 * GIB, P)
        return s
    return _cached(("set", impl), build)


def _set_round(impl: str, s: Any, n: int, pairs: int) -> Any:
    a, b = SET_AT, SET_AT + n
    if impl == "pyroaring":
        def run() -> None:
            for _ in range(pairs):
                s.remove_range(a, b)
                s.add_range(a, b)
    elif impl == "dict":
        def run() -> None:
            for _ in range(pairs):
                for g in range(a, b):
                    s[g] = 0
                for g in range(a, b):
                    s[g] = P
    else:
        def run() -> None:
            for _ in range(pairs):
                s.set_range(a, b, 0)
                s.set_range(a, b, P)
    return run


@pytest.mark.benchmark(group="scaling.set_size")
@pytest.mark.parametrize("impl,n", SET_CASES, ids=[f"{i}-{n}" for i, n in SET_CASES])
def test_set_size(benchmark: Any, impl: str, n: int) -> None:
    """One set of ``n`` gfns (alternating values) per backend / baseline."""
    s = _set_store(impl)
    slow = impl == "dict" or (impl == "xarray" and n >= 1 << 13)
    pairs = 1 if slow else 50
    benchmark.pedantic(_set_round(impl, s, n, pairs), rounds=3 if slow else 10, iterations=1,
                       warmup_rounds=1)
    if impl == "pyroaring":
        assert SET_AT + n - 1 in s and SET_AT in s
    else:
        assert s[SET_AT + n - 1] == P
    _info(benchmark, impl, n << PAGE_SHIFT, "bytes", 2 * pairs, "time_per_op", backend=impl, nr_gfns=n)


# ------------------------------------------------------------------ scaling.memory_size
MEM_SIZES = [GIB << k for k in range(0, 11, 2)]         # 1 GiB, 4, 16, 64, 256 GiB, 1 TiB
MEM_IMPLS = ["ranges", "xarray", "pyroaring", "dict"]
MEM_CASES = [(i, n) for i in MEM_IMPLS for n in MEM_SIZES]


def _nbytes(impl: str, n: int) -> Any:
    if impl in ("ranges", "xarray"):
        s = AttributeStore(impl)
        s.set_range(0, n, P)
        return s, s.nbytes
    if impl == "pyroaring":
        s = BitMap()
        s.add_range(0, n)
        return s, len(s.serialize())
    d = dict.fromkeys(range(n), P)
    return d, sys.getsizeof(d) + sum(sys.getsizeof(k) for k in range(256, n))   # keys < 256 are cached


@pytest.mark.benchmark(group="scaling.memory_size")
@pytest.mark.parametrize("impl,n", MEM_CASES, ids=[f"{i}-{n}" for i, n in MEM_CASES])
def test_memory_size(benchmark: Any, impl: str, n: int) -> None:
    """``nbytes`` of an all-private guest of ``n`` gfns (xarray and dict extrapolated when large)."""
    limit = {"xarray": XARRAY_MAX, "dict": GIB}.get(impl, n)
    built = min(n, limit)
    if built < n and (impl, built) in _CACHE:
        nbytes = _CACHE[(impl, built)]                  # the measured point, reused, not re-timed
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    else:
        res: List[Any] = []
        benchmark.pedantic(lambda: res.append(_nbytes(impl, built)), rounds=1, iterations=1)
        s, nbytes = res[-1]
        _CACHE[(impl, built)] = nbytes
        if impl in ("ranges", "xarray"):
            assert s[built - 1] == P and s.has_range(0, built, P, P)
        del s, res
    value = nbytes * (n // built)
    _info(benchmark, impl, n << PAGE_SHIFT, "bytes", 1, "value", value=value, value_unit="bytes",
          backend=impl, nr_gfns=n, measured_gfns=built, extrapolated=built != n)
    if impl == "ranges":
        assert nbytes <= 64 * 1024


# ------------------------------------------------------------------ scaling.lookup_fragmentation
FRAG_RUNS = [1 << k for k in range(0, 21, 4)]           # 1, 16, 256, 4096, 65536, 2^20 runs
FRAG_IMPLS = ["ranges", "xarray", "pyroaring"]
FRAG_CASES = [(i, r) for r in FRAG_RUNS for i in FRAG_IMPLS]
N4G = 4 * GIB


def _frag_private(runs: int) -> np.ndarray:
    """Start gfns of the private runs: ``runs`` runs of equal length, private first, alternating."""
    length = N4G // runs
    return np.arange(0, N4G, 2 * length, dtype=np.uint64), length


def _frag_store(impl: str, runs: int) -> Any:
    def build() -> Any:
        starts, length = _frag_private(runs)
        if impl == "pyroaring":
            if runs == 1:
                b = BitMap()
                b.add_range(0, N4G)
                return b
            idx = (starts[:, None] + np.arange(length, dtype=np.uint64)[None, :]).ravel()
            return BitMap(idx)
        s = AttributeStore(impl)
        if runs == 1:
            s.set_range(0, N4G, P)
        else:
            for g in starts.tolist():
                s.set_range(g, g + length, P)
        return s
    return _cached(("frag", impl, runs), build)


@pytest.fixture(scope="module")
def frag_keys() -> List[int]:
    """NR_KEYS seeded gfns of a 4 GiB guest."""
    rng = np.random.default_rng(np.random.SeedSequence(SEED).spawn(2)[1])
    return rng.integers(0, N4G, NR_KEYS).tolist()


@pytest.mark.benchmark(group="scaling.lookup_fragmentation")
@pytest.mark.parametrize("impl,runs", FRAG_CASES, ids=[f"{i}-{r}" for i, r in FRAG_CASES])
def test_lookup_fragmentation(benchmark: Any, impl: str, runs: int, frag_keys: List[int]) -> None:
    """NR_KEYS point lookups in a 4 GiB guest made of ``runs`` alternating runs."""
    s = _frag_store(impl, runs)
    keys = frag_keys
    if impl == "pyroaring":
        def run() -> None:
            for k in keys:
                k in s  # noqa: B015
    else:
        def run() -> None:
            for k in keys:
                s[k]
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=1)
    length = N4G // runs
    expect = [P if (k // length) % 2 == 0 else 0 for k in keys[:50]]
    got = [P if k in s else 0 for k in keys[:50]] if impl == "pyroaring" else [s[k] for k in keys[:50]]
    assert got == expect
    _info(benchmark, impl, runs, "runs", NR_KEYS, "time_per_op", backend=impl, nr_runs=runs,
          guest_gfns=N4G, nbytes=getattr(s, "nbytes", None))


# ------------------------------------------------------------------ scaling.fault_vcpus
FAULT_VCPUS = [1, 2, 4, 8]
FAULTS = 256                                            # fresh private pages per round
FAULT_ROUNDS = 4
BASE = 4 << 30


def _fault_td(vcpus: int) -> Any:
    from tdxcore.kvm import Kvm, helpers
    from tdxcore.module.host import Host

    pages = FAULTS * (FAULT_ROUNDS + 2) + 1
    host = Host(packages=1, cpus_per_package=max(2, vcpus), memory=(pages << PAGE_SHIFT) + (64 << 20),
                seed=SEED)
    return helpers.td_create(Kvm(host), vcpus=vcpus, memory=pages << PAGE_SHIFT, gpa=BASE, initial_pages=1)


@pytest.mark.benchmark(group="scaling.fault_vcpus")
@pytest.mark.parametrize("vcpus", FAULT_VCPUS, ids=[str(v) for v in FAULT_VCPUS])
def test_fault_vcpus(benchmark: Any, vcpus: int) -> None:
    """FAULTS private faults per round, split among ``vcpus`` actors on the seeded scheduler."""
    from tdxcore.storm.scheduler import Scheduler

    td = _fault_td(vcpus)
    nxt = iter(range(1, FAULTS * (FAULT_ROUNDS + 2) + 1))    # page 0 is the initial (mapped) page
    per = FAULTS // vcpus
    results: List[Any] = []

    def setup() -> Any:
        s = Scheduler(seed=SEED)
        for v in td.vcpus:
            ops = [guest.read(BASE + (next(nxt) << PAGE_SHIFT)) for _ in range(per)]
            s.add(v.run_gen(ops), f"vcpu{v.vcpu_id}")
        return (s,), {}

    def run(s: Any) -> None:
        s.run()
        results.append(s.results)

    benchmark.pedantic(run, setup=setup, rounds=FAULT_ROUNDS, iterations=1, warmup_rounds=0)
    # checked after timing: every actor succeeded, every page faulted in once, no VM bug
    assert all(r[0] == 0 for res in results for r in res.values()), results[-1]
    faults = sum(v.stats.get("nr_ept_violations", 0) for v in td.vcpus)
    assert faults == per * vcpus * len(results)
    assert len(td.vm.mmu.leaves) == 1 + faults and not td.vm.is_bugged
    _info(benchmark, "faults", vcpus, "vCPUs", per * vcpus, "rate", vcpus=vcpus, faults_per_round=per * vcpus)
    td.close()


# ------------------------------------------------------------------ scaling.storm_vcpus
STORM_VCPUS = [1, 8, 16, 64]
STORM_STEPS = 2000


@pytest.mark.benchmark(group="scaling.storm_vcpus")
@pytest.mark.parametrize("vcpus", STORM_VCPUS, ids=[str(v) for v in STORM_VCPUS])
def test_storm_vcpus(benchmark: Any, vcpus: int) -> None:
    """The default storm (invariants every 1,000 steps) with ``vcpus`` vCPUs, STORM_STEPS steps."""
    from tdxcore.storm import StormConfig, run_storm

    cfg = StormConfig(vcpus=vcpus, steps=STORM_STEPS, seed=SEED, check_every=1000)
    reps: List[Any] = []
    # 64 vCPUs: one round (≈ 4 s: 19,000 drain steps after the 2,000 storm steps)
    benchmark.pedantic(lambda: reps.append(run_storm(cfg)), rounds=1 if vcpus > 16 else 2, iterations=1)
    rep = reps[-1]
    assert rep.violation is None and rep.clean
    assert len({r.events_digest for r in reps}) == 1              # deterministic
    steps = rep.steps + rep.drain_steps
    calls = int(rep.counters.get("nr_seamcalls_total", 0))
    loop = min(r.seconds for r in reps)
    # y: the storm loop's own rate (the report's seconds exclude building the host and TD)
    _info(benchmark, "steps", vcpus, "vCPUs", steps, "value", value=steps / loop, value_unit="steps/s",
          steps=steps, seamcalls=calls, vcpus=vcpus, loop_steps_per_s=round(steps / loop),
          loop_seamcalls_per_s=round(calls / loop), us_per_step_loop=loop / steps * 1e6)


# ------------------------------------------------------------------ scaling.teardown
TEARDOWN_MAX = int(os.environ.get("TDXCORE_BENCH_SCALING_TEARDOWN_PAGES", "8192"))
TEARDOWN_SIZES = [n for n in (1024 << k for k in range(12)) if n <= max(TEARDOWN_MAX, 1024)]
#: the batch reclaim (BATCH's ``tdx_batch``): cheap enough to go to 1 GiB by default
BATCH_SIZES = [1024 << k for k in range(0, 9, 2)]       # 4 MiB, 16, 64, 256 MiB, 1 GiB
TEARDOWN_CASES = ([(p, n) for n in TEARDOWN_SIZES for p in ("dynamic", "terminate")]
                  + [("terminate_batch", n) for n in BATCH_SIZES])


@pytest.mark.benchmark(group="scaling.teardown")
@pytest.mark.parametrize("path,pages", TEARDOWN_CASES, ids=[f"{p}-{n}" for p, n in TEARDOWN_CASES])
def test_teardown_size(benchmark: Any, path: str, pages: int) -> None:
    """Tear down a TD with ``pages`` private pages mapped, by ``path`` (one round: building is slow)."""
    from tdxcore.constants import VmType
    from tdxcore.kvm import Kvm, tdx_batch
    from tdxcore.kvm.helpers import td_create
    from tdxcore.module.host import Host

    state: Dict[str, Any] = {}

    def setup() -> Any:
        size = pages << PAGE_SHIFT
        host = Host(packages=2, cpus_per_package=2, memory=size + size // 256 + (64 << 20), seed=SEED)
        kvm = Kvm(host, terminate_vm=True)
        kvm.create_vm(VmType.TDX).close()
        state.update(host=host, free=host.free_frames)
        if path == "terminate_batch":          # mapped in bulk (AUGed, not accepted), batch reclaim
            td = td_create(kvm, vcpus=2, memory=size, initial_pages=0, measure=False)
            tdx_batch.map_private_range(td.vm, 4 << 30, size, accept=False)
        else:
            td = td_create(kvm, vcpus=2, memory=size, initial_pages=pages, measure=False)
        return (td,), {}

    def teardown(td: Any) -> Any:
        if path != "dynamic":
            td.vm.terminate_vm()
        for v in td.vcpus:
            v.close()
        td.gmem.close()
        td.vm.close()
        return td

    td = benchmark.pedantic(teardown, setup=setup, rounds=1, iterations=1)
    host = state["host"]
    assert td.vm.is_destroyed and host.leaks == () and host.free_frames == state["free"]
    _info(benchmark, path, pages << PAGE_SHIFT, "bytes", 1, "time_per_op", path=path, private_pages=pages)
