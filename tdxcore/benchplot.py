"""``tdxcore bench``: run the benchmark suite, check SPEC §9, and draw the scaling plots (issue 9).

``tdxcore bench --plot FILE.json [--out DIR]`` reads a saved pytest-benchmark JSON and writes six
PNG files into ``DIR`` (default ``bench-plots``), one per ``scaling.*`` group of
``benchmarks/bench_scaling.py``:

========================== ================================ ==========================================
file                       group                            curve
========================== ================================ ==========================================
attr_set_vs_size.png       scaling.set_size                 ns per set vs conversion size, per backend
memory_vs_guest.png        scaling.memory_size              nbytes vs guest size (1 GiB → 1 TiB)
lookup_vs_fragmentation.png scaling.lookup_fragmentation    ns per lookup vs runs in a 4 GiB guest
faults_vs_vcpus.png        scaling.fault_vcpus              private faults/s vs vCPU count
storm_vs_vcpus.png         scaling.storm_vcpus              storm steps/s vs vCPU count
teardown_vs_memory.png     scaling.teardown                 teardown seconds vs private memory, per path
========================== ================================ ==========================================

Each benchmark row carries ``series``, ``x``, ``per_round``, ``y_kind`` (``time_per_op``, ``rate`` or
``value``) and ``extrapolated`` in its ``extra_info``, so nothing but the JSON is needed; extrapolated
points are drawn hollow on a dashed line. ``tdxcore bench`` without ``--plot`` runs
``python3 -m pytest BENCHMARKS --benchmark-only --benchmark-json=JSON`` (in a subprocess, from a
source checkout: the benchmarks are not installed), then ``BENCHMARKS/check_baselines.py JSON`` (the
§9 table) and draws the plots. matplotlib (the ``plot`` extra) is imported lazily, Agg canvas only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["PlotSpec", "PLOTS", "load_json", "series_points", "render", "cmd_bench", "register"]

Point = Tuple[float, float, bool]          # (x, y, extrapolated)


@dataclass(frozen=True)
class PlotSpec:
    """One PNG: the group it reads and how its axes look."""

    file: str
    group: str
    title: str
    xlabel: str
    ylabel: str
    y_scale: float = 1.0                    # applied to time_per_op / rate / value
    x_bytes: bool = False                   # x is a size in bytes: binary tick labels, log2 axis
    logx: bool = True
    logy: bool = True
    hline: Optional[Tuple[float, str]] = None
    extrapolate_to: Tuple[float, ...] = ()   # x values a series' last point is extended to (∝ x)


PLOTS: Tuple[PlotSpec, ...] = (
    PlotSpec("attr_set_vs_size.png", "scaling.set_size",
             "Attribute-store set vs conversion size (alternating values)", "conversion size",
             "ns per set", y_scale=1e9, x_bytes=True),
    PlotSpec("memory_vs_guest.png", "scaling.memory_size", "Attribute-store memory, all-private guest",
             "guest size", "bytes (hollow: extrapolated)", x_bytes=True,
             hline=(64 * 1024, "SPEC §9: 64 KiB")),
    PlotSpec("lookup_vs_fragmentation.png", "scaling.lookup_fragmentation",
             "Point lookup vs fragmentation (4 GiB guest)", "runs (alternating private/shared)",
             "ns per lookup", y_scale=1e9, logy=False),
    PlotSpec("faults_vs_vcpus.png", "scaling.fault_vcpus", "Private faults through vcpu.run vs vCPUs",
             "vCPUs (seeded scheduler)", "faults/s",
             hline=(200_000, "SPEC §9: 5 µs/fault")),
    PlotSpec("storm_vs_vcpus.png", "scaling.storm_vcpus", "Default storm (invariants every 1,000 steps)",
             "vCPUs", "steps/s (storm loop)", logy=False,
             hline=(50_000, "SPEC §9: 50,000 steps/s")),
    PlotSpec("teardown_vs_memory.png", "scaling.teardown", "Teardown vs private memory",
             "private memory", "seconds (hollow: linear extrapolation)", x_bytes=True,
             hline=(60, "SPEC §9: 64 GiB terminate-first < 60 s"), extrapolate_to=(1 << 30, 64 << 30)),
)


def load_json(path: str) -> Dict[str, Any]:
    """Read a pytest-benchmark ``--benchmark-json`` file (``ValueError`` if it is not one)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        msg = f"{path}: not a pytest-benchmark JSON (no 'benchmarks' list)"
        raise ValueError(msg)
    return data


def _y(bench: Dict[str, Any], stat: str) -> Optional[float]:
    info = bench.get("extra_info") or {}
    kind = info.get("y_kind")
    if kind == "value":
        v = info.get("value")
        return None if v is None else float(v)
    t = (bench.get("stats") or {}).get(stat)
    per = float(info.get("per_round", 1) or 1)
    if t is None or not t:
        return None
    return float(t) / per if kind == "time_per_op" else per / float(t)


def series_points(data: Dict[str, Any], group: str, stat: str = "min") -> Dict[str, List[Point]]:
    """``{series: [(x, y, extrapolated), ...]}`` of one group, sorted by x (rows without y skipped)."""
    out: Dict[str, List[Point]] = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info") or {}
        if b.get("group") != group or "series" not in info or "x" not in info:
            continue
        y = _y(b, stat)
        if y is None:
            continue
        out.setdefault(str(info["series"]), []).append((float(info["x"]), y, bool(info.get("extrapolated"))))
    for pts in out.values():
        pts.sort()
    return out


def _extrapolate(pts: List[Point], to: Sequence[float]) -> List[Point]:
    """Extend ``pts`` with points at ``to`` proportional to the last measured point (cost ∝ x)."""
    meas = [p for p in pts if not p[2]]
    if not meas or not to:
        return pts
    x0, y0, _ = meas[-1]
    return pts + [(x, y0 * x / x0, True) for x in to if x > max(p[0] for p in pts)]


def _binary(v: float, _pos: Any = None) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if v >= 1 << shift:
            q = v / (1 << shift)
            return f"{q:.0f} {unit}" if q == int(q) else f"{q:.1f} {unit}"
    return f"{v:.0f} B"


def _draw(spec: PlotSpec, pts: Dict[str, List[Point]], path: str, subtitle: str, dpi: int = 110) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7.5, 4.8), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, p) in enumerate(sorted(pts.items())):
        color = f"C{i % 10}"
        p = _extrapolate(p, spec.extrapolate_to)
        meas = [(x, y * spec.y_scale) for x, y, e in p if not e]
        extra = [(x, y * spec.y_scale) for x, y, e in p if e]
        if meas:
            ax.plot([x for x, _ in meas], [y for _, y in meas], "o-", color=color, label=name)
        if extra:
            line = ([meas[-1]] if meas else []) + extra
            ax.plot([x for x, _ in line], [y for _, y in line], "--", color=color)
            ax.plot([x for x, _ in extra], [y for _, y in extra], "o", color=color, mfc="none",
                    label=None if meas else f"{name} (extrapolated)")
    if spec.hline is not None:
        ax.axhline(spec.hline[0], color="grey", ls=":", lw=1)
        ax.annotate(spec.hline[1], (0.01, spec.hline[0]), xycoords=("axes fraction", "data"),
                    fontsize=8, color="grey", va="bottom")
    if spec.logx:
        ax.set_xscale("log", base=10 if spec.group.endswith("fragmentation") else 2)
    if spec.logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.minorticks_off()                      # hundreds of log minor ticks make drawing slow
    if spec.x_bytes:
        ax.xaxis.set_major_formatter(FuncFormatter(_binary))
    elif spec.logx:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    ax.set_title(spec.title, fontsize=11)
    fig.text(0.99, 0.01, subtitle, ha="right", va="bottom", fontsize=7, color="grey")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.11, right=0.97, top=0.92, bottom=0.13)   # fixed: tight_layout is slow
    fig.savefig(path)


def _machine(data: Dict[str, Any]) -> str:
    mi = data.get("machine_info") or {}
    cpu = mi.get("cpu") or {}
    load = mi.get("loadavg_end")
    return (f"{cpu.get('brand_raw', mi.get('processor', ''))} × {cpu.get('count', '?')}, "
            f"Python {mi.get('python_version', '?')}, {str(data.get('datetime', ''))[:19]}"
            + (f", load {load[0]:.1f}" if isinstance(load, list) and load else ""))


def render(data: Dict[str, Any], out_dir: str, stat: str = "min",
           plots: Sequence[PlotSpec] = PLOTS, dpi: int = 110) -> Tuple[List[str], List[str]]:
    """Draw every plot whose group has data; return (files written, groups missing)."""
    os.makedirs(out_dir, exist_ok=True)
    written, missing = [], []
    sub = f"{_machine(data)}; statistic: {stat}"
    for spec in plots:
        pts = series_points(data, spec.group, stat)
        if not pts:
            missing.append(spec.group)
            continue
        path = os.path.join(out_dir, spec.file)
        _draw(spec, pts, path, sub, dpi)
        written.append(path)
    return written, missing


def _plot(json_path: str, out_dir: str, stat: str, dpi: int = 110) -> int:
    try:
        data = load_json(json_path)
    except (OSError, ValueError) as e:
        print(f"tdxcore bench: {e}", file=sys.stderr)
        return 2
    try:
        written, missing = render(data, out_dir, stat, dpi=dpi)
    except ImportError:
        print("tdxcore bench: --plot needs matplotlib: pip install 'tdxcore[plot]'", file=sys.stderr)
        return 2
    for w in written:
        print(f"wrote {w}")
    for g in missing:
        print(f"tdxcore bench: no {g} rows in {json_path} (run benchmarks/bench_scaling.py)", file=sys.stderr)
    return 1 if missing else 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``tdxcore bench``: plot a saved JSON (``--plot``), or run the suite, check §9 and plot."""
    if args.plot is not None:
        return _plot(args.plot, args.out, args.stat, args.dpi)
    bench_dir = args.benchmarks
    if not os.path.isdir(bench_dir):
        print(f"tdxcore bench: no benchmark directory {bench_dir!r} (run from a source checkout, "
              "or pass --benchmarks DIR)", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "pytest", bench_dir, "--benchmark-only", f"--benchmark-json={args.json}",
           "-q", "-p", "no:cacheprovider"]
    if args.k:
        cmd += ["-k", args.k]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0 or not os.path.isfile(args.json):
        print(f"tdxcore bench: the benchmark run failed (pytest exit {rc})", file=sys.stderr)
        return 1
    status = 0
    check = os.path.join(bench_dir, "check_baselines.py")
    if os.path.isfile(check):
        status = 1 if subprocess.call([sys.executable, check, args.json, "--stat", args.stat]) else 0
    if not args.no_plot:
        plot = _plot(args.json, args.out, args.stat, args.dpi)
        status = status or (1 if plot == 2 else 0)
    return status


def register(subparsers: Any) -> None:
    """Add ``bench`` to ``subparsers`` (sets ``func`` and ``command``)."""
    p = subparsers.add_parser(
        "bench", help="run the benchmarks, check SPEC §9, draw the scaling plots",
        description="Without --plot: run the pytest-benchmark suite into --json, print the SPEC §9 "
                    "table (benchmarks/check_baselines.py) and draw the plots. With --plot FILE.json: "
                    "only draw the six PNG plots from a saved run.")
    p.add_argument("--plot", metavar="FILE.json", default=None,
                   help="draw the plots of this saved --benchmark-json file and exit")
    p.add_argument("--out", metavar="DIR", default="bench-plots", help="PNG directory (default bench-plots)")
    p.add_argument("--json", metavar="FILE", default="bench.json",
                   help="where the run writes its JSON (default bench.json)")
    p.add_argument("--benchmarks", metavar="DIR", default="benchmarks",
                   help="the benchmark directory (default ./benchmarks)")
    p.add_argument("-k", metavar="EXPR", default=None, help="only benchmarks matching EXPR (pytest -k)")
    p.add_argument("--stat", default="min", choices=["min", "median", "mean"],
                   help="timing statistic for the table and the plots (default min)")
    p.add_argument("--dpi", type=int, default=110, help="PNG resolution (default 110)")
    p.add_argument("--no-plot", action="store_true", help="run and check only")
    p.set_defaults(func=cmd_bench, command="bench")
