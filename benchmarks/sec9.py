"""SPEC §9 as data: each performance row, the benchmark groups that measure it, its baselines, its target.

Read by ``benchmarks/check_baselines.py`` (the table and the "every §9 row has its baseline in the
same run" check) and by ``docs/performance.rst``. A row is a tuple of :class:`Check`; a check names
one or more :class:`Source` (group, subject row, baseline row, metric), tried in order: the first
whose group is in the JSON is used. An opt-in source (a row only a larger run produces, e.g. the
real 64 GiB teardown) therefore comes first and the default run's row after it; a check whose
sources are all absent, or whose group lacks its subject or baseline row, fails the script.

Row names are the pytest parameter ids (``benchmark["param"]``, e.g. ``ranges`` in
``test_lookup_uniform[ranges]``). Metrics:

* ``time`` — the timing statistic (min by default) divided by ``per`` (an ``extra_info`` key or
  a number) times ``scale``;
* ``rate`` — ``extra_info[per]`` (or the number ``per``) divided by the timing statistic;
* ``extra`` — ``extra_info[key]`` as recorded (absolute figures the benchmark computed itself).

Check kinds: ``le_ratio``/``ge_ratio`` judge subject/baseline; ``ge_speedup`` judges
baseline/subject (for "N× faster than"); ``le_abs``/``ge_abs``/``lt_abs`` judge the subject's
figure, with the ratio shown for information (``ratio`` says which way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

__all__ = ["Metric", "Source", "Check", "Row", "ROWS", "ISSUE_ROWS", "SCALING_GROUPS"]


@dataclass(frozen=True)
class Metric:
    """How a figure is read from one benchmark entry."""

    kind: str                                   # "time", "rate" or "extra"
    unit: str
    per: Union[str, float, None] = None          # extra_info key or constant (time: divisor; rate: numerator)
    scale: float = 1.0
    key: Optional[str] = None                    # extra: the extra_info key


@dataclass(frozen=True)
class Source:
    """Where a check's figure and baseline come from."""

    group: str
    subject: str
    baseline: str
    metric: Metric
    baseline_metric: Optional[Metric] = None     # default: the same metric
    opt_in: bool = False                          # produced only by an opt-in run (env var, marker)
    minus_baseline: bool = False                  # also show figure − baseline (e.g. the fault alone)
    note: str = ""


@dataclass(frozen=True)
class Check:
    """One judged figure of a §9 row."""

    label: str                                   # what the figure is, e.g. "vs pyroaring"
    kind: str                                    # le_ratio, ge_ratio, ge_speedup, le_abs, ge_abs, lt_abs
    target: float
    sources: Tuple[Source, ...]
    ratio: str = "subject/baseline"               # orientation of the informational ratio (abs kinds)


@dataclass(frozen=True)
class Row:
    """One row of SPEC §9 (or of issue 9's scale goals)."""

    id: str
    what: str
    target: str
    checks: Tuple[Check, ...] = field(default_factory=tuple)


NS_LOOKUP = Metric("time", "ns/lookup", per="nr_keys", scale=1e9)
NS_SET = Metric("time", "ns/set", per="sets_per_round", scale=1e9)
US = Metric("time", "µs", scale=1e6)
PAGES_S = Metric("rate", "pages/s", per="nr_pages")
GIB64_PAGES = 1 << 24

ROWS: Tuple[Row, ...] = (
    Row("9.1", "attribute point lookup, seeded random keys, 4 GiB all private",
        "≤ 1.5× gfn in BitMap and ≤ 1.5× dict[gfn]", (
            Check("vs pyroaring", "le_ratio", 1.5,
                  (Source("xarray.lookup_uniform", "ranges", "pyroaring", NS_LOOKUP),)),
            Check("vs dict", "le_ratio", 1.5,
                  (Source("xarray.lookup_uniform", "ranges", "dict", NS_LOOKUP),)),
        )),
    Row("9.2", "set 2 MiB (512 gfns), alternating values, \"ranges\"",
        "≤ 1.5× BitMap.add_range; ≥ 50× faster than 512 dict stores; ≥ 5× faster than \"xarray\"", (
            Check("vs pyroaring", "le_ratio", 1.5,
                  (Source("xarray.set_2m", "ranges", "pyroaring", NS_SET),)),
            Check("vs dict", "ge_speedup", 50.0,
                  (Source("xarray.set_2m", "ranges", "dict", NS_SET),)),
            Check("vs xarray", "ge_speedup", 5.0,
                  (Source("xarray.set_2m", "ranges", "xarray", NS_SET),)),
        )),
    Row("9.3", "1 TiB guest (2^28 gfns) all private, \"ranges\"",
        "nbytes ≤ 64 KiB (upstream per-gfn ≈ 2.3 GiB)", (
            Check("nbytes", "le_abs", 64 * 1024,
                  (Source("xarray.memory_1t", "ranges", "xarray", Metric("extra", "B", key="nbytes_1t"),
                          note="xarray at 4 GiB, ×256"),),
                  ratio="baseline/subject"),
        )),
    Row("9.4", "fragmented: 4 GiB alternating 4K private/shared (2^20 runs), seeded random keys",
        "lookup ≤ 1.5× pyroaring on the same set; a 4K set ≤ 3× the uniform case", (
            Check("lookup vs pyroaring", "le_ratio", 1.5,
                  (Source("xarray.lookup_fragmented", "ranges", "pyroaring", NS_LOOKUP),)),
            Check("4K set vs uniform", "le_ratio", 3.0,
                  (Source("xarray.set_4k_fragmented", "set_4k_fragmented", "set_4k_uniform", NS_SET),)),
        )),
    Row("9.5", "S-EPT leaf cycle AUG → ACCEPT → BLOCK → TRACK → REMOVE, core batch API",
        "≥ 3 M 4K pages/s on one core", (
            Check("pages/s", "ge_abs", 3e6,
                  (Source("sept.leaf_cycle", "cython", "reference", PAGES_S),)),
        )),
    Row("9.6", "one private fault through vcpu.run (EPT violation → AUG → re-entry → ACCEPT)",
        "≤ 5 µs per fault", (
            Check("µs/fault", "le_abs", 5.0,
                  (Source("memory.private_fault", "private_fault", "bare_run", US, minus_baseline=True,
                          note="whole vcpu.run"),)),
        )),
    Row("9.7", "deterministic storm, invariants every 1,000 steps",
        "≥ 50,000 steps/s and ≥ 20,000 SEAMCALLs/s", (
            Check("steps/s", "ge_abs", 50_000,
                  (Source("storm.default", "every_1000", "no_interleave",
                          Metric("extra", "steps/s", key="loop_steps_per_s")),)),
            Check("SEAMCALLs/s", "ge_abs", 20_000,
                  (Source("storm.default", "every_1000", "no_interleave",
                          Metric("extra", "SEAMCALLs/s", key="loop_seamcalls_per_s")),)),
        )),
    Row("9.8", "threaded batch operations on two TDs, 2 threads vs 1",
        "≥ 1.6× throughput", (
            Check("2 threads / 1", "ge_ratio", 1.6,
                  (Source("sept.threads", "two_threads", "one_thread",
                          Metric("rate", "pages/s", per="pages_per_td", scale=2),
                          note="leaf cycles of 2 TDs"),)),
        )),
    Row("9.9", "64 GiB TD (16 M private pages) teardown, terminate-first via core batch ops",
        "< 60 s; dynamic path reported with its ratio (upstream ≈ 12× at 400 GB)", (
            Check("s @ 64 GiB", "lt_abs", 60.0, (
                Source("teardown.scale", "terminate_batch", "dynamic_per_page",
                       Metric("extra", "s @64 GiB", key="s_64GiB"),
                       note="TDXCORE_BENCH_TEARDOWN_PAGES=16777216 runs the real 64 GiB"),
                Source("teardown.private", "terminate", "dynamic",
                       Metric("time", "s @64 GiB", per="private_pages", scale=GIB64_PAGES),
                       note="both paths measured small, extrapolated per page to 64 GiB"),
            ), ratio="baseline/subject"),
        )),
)

#: Issue 9's floor (item 2) and scale goals (item 3) that are not §9 rows (judged, never required).
ISSUE_ROWS: Tuple[Row, ...] = (
    Row("i9.2", "CPython floor of one private fault (FASTPATH's memory.fault_floor)",
        "≤ 5 µs, or the floor that prevents it", (
            Check("floor µs/fault", "le_abs", 5.0,
                  (Source("memory.fault_floor", "floor", "private_fault", US,
                          note="irreducible steps, events and leaves only"),)),
        )),
    Row("i9.3", "storm per-step cost, 64 vCPUs vs 8", "≤ 2× the per-step cost of 8 vCPUs", (
        Check("64 / 8 vCPUs", "le_ratio", 2.0, (
            Source("storm.vcpus", "vcpus_64", "vcpus_8", Metric("extra", "µs/step", key="us_per_step_storm"),
                   note="storm phase: build and drain excluded"),
            Source("scaling.storm_vcpus", "64", "8", Metric("extra", "µs/step", key="us_per_step_loop"),
                   note="storm loop, build excluded"),
        )),
    )),
)

#: The scaling curves of ``bench_scaling.py`` (one plot each; not §9 rows).
SCALING_GROUPS = ("scaling.set_size", "scaling.memory_size", "scaling.lookup_fragmentation",
                  "scaling.fault_vcpus", "scaling.storm_vcpus", "scaling.teardown")
