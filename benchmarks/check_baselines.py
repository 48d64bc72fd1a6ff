"""Check a saved pytest-benchmark JSON against SPEC §9 and print the §9 table.

Usage::

    python3 -m pytest benchmarks --benchmark-only --benchmark-json=bench.json
    python3 benchmarks/check_baselines.py bench.json [--stat min|median] [--format text|markdown|rst]
                                                     [--strict] [--output FILE]

Exit status 1 when a §9 row's group is missing from the run, or its group lacks the subject or the
named baseline row (SPEC §9: "each group with its named baseline row in the same run"); with
``--strict`` also when a target is not met. Groups outside §9 with a single row are listed as a
warning. Figures use the ``min`` timing statistic by default (the least noisy on a shared 2-core
machine). The rows, baselines and metrics are data: ``benchmarks/sec9.py``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sec9 import ISSUE_ROWS, ROWS, Check, Metric, Row, Source  # noqa: E402

from tdxcore.benchplot import load_json  # noqa: E402

__all__ = ["Result", "load", "index", "figure", "evaluate", "single_row_groups", "format_table", "main"]


@dataclass
class Result:
    """The outcome of one check."""

    row: Row
    check: Check
    source: Optional[Source]
    value: Optional[float] = None
    base_value: Optional[float] = None
    ratio: Optional[float] = None
    met: Optional[bool] = None
    error: str = ""
    measured: str = ""                 # "from N pages, extrapolated" when the row says it extrapolated

    @property
    def status(self) -> str:
        """``met``, ``NOT MET`` or ``MISSING: ...``."""
        if self.error:
            return f"MISSING: {self.error}"
        return "met" if self.met else "NOT MET"


#: Read a ``--benchmark-json`` file (``ValueError`` if it is not one): the plots' reader.
load = load_json


def row_name(bench: Dict[str, Any]) -> str:
    """Return the row's name: its parameter id (``ranges`` in ``test_x[ranges]``), else the test name."""
    if bench.get("param") is not None:
        return str(bench["param"])
    name = str(bench.get("name", ""))
    return name[name.index("[") + 1:-1] if "[" in name else name


def index(benchmarks: Iterable[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """``{group: {row name: benchmark}}``."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for b in benchmarks:
        out.setdefault(str(b.get("group")), {})[row_name(b)] = b
    return out


def figure(bench: Dict[str, Any], metric: Metric, stat: str = "min") -> float:
    """Return the figure ``metric`` reads from one benchmark entry (``KeyError`` when it is not there)."""
    extra = bench.get("extra_info") or {}
    if metric.kind == "extra":
        return float(extra[metric.key]) * metric.scale
    stats = bench.get("stats") or {}
    t = float(stats[stat])
    per = metric.per
    n = 1.0 if per is None else float(extra[per] if isinstance(per, str) else per)
    if metric.kind == "time":
        return t / n * metric.scale
    if metric.kind == "rate":
        return n / t * metric.scale
    msg = f"unknown metric kind {metric.kind!r}"
    raise ValueError(msg)


_OPS = {"le_ratio": lambda r, v, t: r <= t, "ge_ratio": lambda r, v, t: r >= t,
        "ge_speedup": lambda r, v, t: r >= t, "le_abs": lambda r, v, t: v <= t,
        "ge_abs": lambda r, v, t: v >= t, "lt_abs": lambda r, v, t: v < t}


def _ratio(check: Check, value: float, base: float) -> Optional[float]:
    if check.kind == "ge_speedup" or (check.kind.endswith("_abs") and check.ratio == "baseline/subject"):
        return base / value if value else None
    return value / base if base else None


def _one(row: Row, check: Check, groups: Dict[str, Dict[str, Dict[str, Any]]], stat: str) -> Result:
    present = [s for s in check.sources if s.group in groups]
    if not present:
        names = " or ".join(s.group for s in check.sources)
        return Result(row, check, None, error=f"group {names} not in this run")
    src = present[0]
    rows = groups[src.group]
    for name in (src.subject, src.baseline):
        if name not in rows:
            what = "baseline" if name == src.baseline else "subject"
            return Result(row, check, src, error=f"{src.group} has no {what} row {name!r} "
                                                 f"(rows: {', '.join(sorted(rows))})")
    try:
        value = figure(rows[src.subject], src.metric, stat)
        base = figure(rows[src.baseline], src.baseline_metric or src.metric, stat)
    except (KeyError, TypeError, ValueError) as e:
        return Result(row, check, src, error=f"{src.group}: no figure ({e!r}; run with --benchmark-only)")
    ratio = _ratio(check, value, base)
    op = _OPS[check.kind]
    met = bool(op(ratio if ratio is not None else float("nan"), value, check.target))
    info = rows[src.subject].get("extra_info") or {}
    measured = f"minus {src.baseline}: {_fmt(value - base, src.metric.unit)}" if src.minus_baseline else ""
    if info.get("extrapolated_64GiB") or info.get("extrapolated"):
        n = info.get("private_pages") or info.get("nr_gfns")
        measured = f"extrapolated from {n:,} pages" if isinstance(n, int) else "extrapolated"
    return Result(row, check, src, value, base, ratio, met, measured=measured)


def evaluate(data: Dict[str, Any], rows: Sequence[Row] = ROWS, stat: str = "min") -> List[Result]:
    """Evaluate every check of ``rows`` on a loaded JSON."""
    groups = index(data["benchmarks"])
    return [_one(row, check, groups, stat) for row in rows for check in row.checks]


def single_row_groups(data: Dict[str, Any]) -> List[str]:
    """Return the groups of the run with one row only (no baseline row in the same group)."""
    return sorted(g for g, rows in index(data["benchmarks"]).items() if len(rows) < 2)


def _fmt(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "—"
    if unit == "B":
        for u, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if abs(x) >= 1 << shift:
                return f"{x / (1 << shift):.3g} {u}"
        return f"{x:.0f} B"
    ax = abs(x)
    if ax >= 1e7:
        s = f"{x / 1e6:,.0f} M"
    elif ax >= 1e6:
        s = f"{x / 1e6:.2f} M"
    elif ax >= 1e4:
        s = f"{x:,.0f}"
    elif ax >= 100:
        s = f"{x:.0f}"
    elif ax >= 1:
        s = f"{x:.2f}"
    else:
        s = f"{x:.3g}"
    return f"{s} {unit}".strip()


def _target(check: Check, unit: str) -> str:
    sym = {"le_ratio": "≤ {t}×", "ge_ratio": "≥ {t}×", "ge_speedup": "≥ {t}× faster",
           "le_abs": "≤ {t}", "ge_abs": "≥ {t}", "lt_abs": "< {t}"}[check.kind]
    t = _fmt(check.target, unit if check.kind.endswith("_abs") else "")
    return sym.format(t=t)


def _orientation(check: Check) -> str:
    if check.kind == "ge_speedup":
        return "baseline/subject"
    return check.ratio if check.kind.endswith("_abs") else "subject/baseline"


def table_rows(results: Sequence[Result]) -> List[Tuple[str, ...]]:
    """``(row, check, figure, baseline, ratio, target, status)`` strings per result."""
    out = []
    for r in results:
        src = r.source
        unit = src.metric.unit if src else ""
        bunit = (src.baseline_metric or src.metric).unit if src else ""
        base = f"{src.baseline}: {_fmt(r.base_value, bunit)}" if src else "—"
        fig = f"{src.subject}: {_fmt(r.value, unit)}" if src else "—"
        notes = [n for n in (r.measured, src.note if src else "") if n]
        if notes:
            fig += f" ({'; '.join(notes)})"
        rs = "—" if r.ratio is None else (f"{r.ratio:.2f}" if abs(r.ratio) < 100 else _fmt(r.ratio))
        ratio = "—" if r.ratio is None else f"{rs}× ({_orientation(r.check)})"
        out.append((r.row.id, r.check.label, fig, base, ratio, _target(r.check, unit), r.status))
    return out


HEAD = ("§9", "check", "figure", "baseline", "ratio", "target", "status")


def format_table(results: Sequence[Result], fmt: str = "text") -> str:
    """Return the table as aligned text, Markdown or an RST list-table."""
    rows = table_rows(results)
    if fmt == "markdown":
        lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(lines)
    if fmt == "rst":
        lines = [".. list-table::", "   :header-rows: 1", ""]
        for r in (HEAD, *rows):
            lines.append("   * - " + r[0])
            lines += [f"     - {c}" for c in r[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in (HEAD, *rows)) for i in range(len(HEAD))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (HEAD, *rows)]
    return "\n".join(lines)


def machine(data: Dict[str, Any]) -> str:
    """One line describing the run's machine (from pytest-benchmark's ``machine_info``)."""
    mi = data.get("machine_info") or {}
    cpu = mi.get("cpu") or {}
    text = (f"{cpu.get('brand_raw', mi.get('processor', '?'))}, {cpu.get('count', '?')} cores, "
            f"{mi.get('python_implementation', 'Python')} {mi.get('python_version', '?')}, "
            f"{mi.get('system', '')} {mi.get('release', '')}").strip()
    if mi.get("loadavg_start") and mi.get("loadavg_end"):
        start, end = mi["loadavg_start"][0], mi["loadavg_end"][0]
        text += f", load average {start:.1f} at the start, {end:.1f} at the end"
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the table; return 1 when a §9 row has no group or baseline row (or, --strict, misses)."""
    p = argparse.ArgumentParser(prog="check_baselines.py", description=__doc__.splitlines()[0])
    p.add_argument("json", help="a pytest-benchmark --benchmark-json file")
    p.add_argument("--stat", default="min", choices=["min", "median", "mean"],
                   help="timing statistic (default min)")
    p.add_argument("--format", default="text", choices=["text", "markdown", "rst"])
    p.add_argument("--strict", action="store_true", help="also fail when a target is not met")
    p.add_argument("--output", metavar="FILE", help="also write the table (with the machine line) to FILE, "
                                                   "e.g. --format rst --output docs/performance-table.inc")
    args = p.parse_args(argv)
    try:
        data = load(args.json)
    except (OSError, ValueError) as e:
        print(f"check_baselines: {e}", file=sys.stderr)
        return 2
    results = evaluate(data, ROWS, args.stat)
    extra = evaluate(data, ISSUE_ROWS, args.stat)
    print(f"SPEC §9 on {machine(data)} (statistic: {args.stat})\n")
    print(format_table(results + [r for r in extra if not r.error], args.format))
    missing = [r for r in results if r.error]
    unmet = [r for r in results if not r.error and not r.met]
    if args.output:
        stamp = str(data.get("datetime", ""))[:16].replace("T", " ")
        Path(args.output).write_text(
            f"Measured {stamp} on {machine(data)} (statistic: {args.stat}; "
            f"{len(results) - len(missing) - len(unmet)} of {len(results)} checks met, "
            f"{len(missing)} missing).\n\n" + format_table(results + [r for r in extra if not r.error],
                                                            args.format) + "\n", encoding="utf-8")
    lonely = [g for g in single_row_groups(data)]
    if lonely:
        print(f"\nwarning: groups with no baseline row: {', '.join(lonely)}")
    print(f"\n{len(results) - len(missing) - len(unmet)} met, {len(unmet)} not met, {len(missing)} missing"
          f" of {len(results)} §9 checks")
    if missing:
        for r in missing:
            print(f"FAIL §{r.row.id} {r.check.label}: {r.error}", file=sys.stderr)
        return 1
    return 1 if args.strict and unmet else 0


if __name__ == "__main__":
    sys.exit(main())
