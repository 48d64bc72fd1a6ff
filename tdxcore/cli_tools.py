"""Command-line tools over recorded event logs and reports (tools layer; SPEC §8).

``tdxcore.cli`` calls :func:`register` to add five subcommands:

``tdxcore events FILE [--gfn N] [--pfn N] [--actor S] [--leaf NAME|NUM] [--kind K] [--limit N]``
    Print the events of a JSON Lines log (``--events``) that match every given filter, one per
    line, prefixed with their index. Exit 0 if some matched, 1 if none.
``tdxcore diff A B``
    The first divergence of two event logs (replay mismatch, policy A/B): its index and both
    events. Exit 0 if the logs are identical, 1 if they differ.
``tdxcore explain REPORT``
    For a report whose ``violation`` is set, every event that touched the violation's gfn or
    frame, in order, up to and including the violation's event. Exit 0.
``tdxcore campaign --seeds A:B --workers N [storm options] [--scheduler tcp://...]``
    One storm per seed (:mod:`tdxcore.storm.campaign`), a progress bar, a summary table and, per
    violation, the commands that reproduce it. Exit 0 if no violation, 1 otherwise.
``tdxcore shrink REPORT``
    Minimise a failing report (:mod:`tdxcore.storm.shrink`): write ``REPORT.min.json`` and print
    its replay command. Exit 0 when written, 1 if the report does not reproduce.

Any error (unreadable file, bad schema, bad option value) prints one line to stderr and
exits 2.

Matching rules: ``--gfn N`` matches an event whose ``gfn`` field is N, whose ``gpa`` field is
in gfn N (the shared bit, 47 or 51, ignored: a log does not record GPAW), or whose ``start`` /
``end`` gfn range (``set_memory_attributes``, ``invalidate_*``) contains N. ``--pfn N`` matches
a ``pfn`` field. Without ``--kind``/``--leaf``, a SEAMCALL/TDCALL whose end (or abort) edge
matches is shown with its begin edge too (the begin of an AUG does not know its gfn yet).
``--leaf`` takes a SEAMCALL or TDCALL name (``TDH.MEM.PAGE.AUG``,
``tdh_mem_page_aug``, ``TDG.MEM.PAGE.ACCEPT``), ``seamcall:N`` / ``tdcall:N``, or a bare number
(SEAMCALL space: the two spaces overlap, e.g. 6 is both AUG and ACCEPT) and matches kinds whose
``leaf`` field lives in that space. Numbers may be decimal or ``0x`` hex.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from tdxcore.eventlog import Event, EventLog
from tdxcore.status import Leaf, TdcallLeaf
from tdxcore.trace import format_event

__all__ = ["register", "event_matcher", "matching_indices", "parse_leaf", "load_events", "cmd_events",
           "cmd_diff",
           "cmd_explain", "cmd_campaign", "cmd_shrink", "ToolError"]

_PAGE_SHIFT = 12
_SHARED_BITS = (1 << 47) | (1 << 51)
Kinds = Any   # Mapping[str, Tuple[Tuple[str, ...], Optional[str]]]


class ToolError(Exception):
    """A user-facing error of a tool: printed as one line, exit status 2."""


def _int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        msg = f"invalid integer {text!r} (decimal or 0x hex)"
        raise argparse.ArgumentTypeError(msg) from None
    if v < 0:
        msg = f"{text!r} must be >= 0"
        raise argparse.ArgumentTypeError(msg)
    return v


def parse_leaf(text: str) -> Tuple[str, int]:
    """Return ``(leaf space, number)`` for ``--leaf`` (see the module docstring).

    Raises
    ------
    ToolError
        Unknown name or a bad number.
    """
    t = text.strip()
    low = t.lower()
    for prefix in ("seamcall:", "tdcall:"):
        if low.startswith(prefix):
            try:
                return prefix[:-1], int(t[len(prefix):], 0)
            except ValueError:
                msg = f"--leaf {text!r}: {t[len(prefix):]!r} is not a number"
                raise ToolError(msg) from None
    try:
        return "seamcall", int(t, 0)
    except ValueError:
        pass
    key = t.upper().replace(".", "_")
    if key in Leaf.__members__:
        return "seamcall", int(Leaf[key])
    if key in TdcallLeaf.__members__:
        return "tdcall", int(TdcallLeaf[key])
    msg = f"--leaf {text!r} is not a SEAMCALL (TDH.*) or TDCALL (TDG.*) leaf name, nor a number"
    raise ToolError(msg)


def _gfn_of_gpa(gpa: Any) -> Optional[int]:
    if isinstance(gpa, int) and not isinstance(gpa, bool):
        return (gpa & ~_SHARED_BITS) >> _PAGE_SHIFT
    return None


def event_matcher(kinds: Kinds, *, gfn: Optional[int] = None, pfn: Optional[int] = None,
                  actor: Optional[str] = None, leaf: Optional[Tuple[str, int]] = None,
                  kind: Optional[str] = None, any_of: bool = False) -> Callable[[Event], bool]:
    """Return a predicate over events of a log with kind table ``kinds``.

    With ``any_of=False`` every given criterion must hold; with ``any_of=True`` (``explain``)
    an event matches if it touched the gfn *or* the pfn (``actor``/``leaf``/``kind`` still
    restrict). Field positions are resolved once per kind.
    """
    plans: Dict[str, Optional[Tuple[int, int, int, int, int, int]]] = {}

    def plan(k: str) -> Optional[Tuple[int, int, int, int, int, int]]:
        spec = kinds.get(k)
        if spec is None:
            return None
        names, space = spec

        def pos(n: str) -> int:
            return 2 + names.index(n) if n in names else -1
        leaf_pos = pos("leaf")
        if leaf is not None and (space != leaf[0] or leaf_pos < 0):
            leaf_pos = -2                   # this kind cannot match the leaf filter
        return (pos("gfn"), pos("gpa"), pos("start"), pos("end"), pos("pfn"), leaf_pos)

    def touches_gfn(ev: Event, p: Tuple[int, int, int, int, int, int]) -> bool:
        g, a, s, e = p[0], p[1], p[2], p[3]
        if g >= 0 and ev[g] == gfn:
            return True
        if a >= 0 and _gfn_of_gpa(ev[a]) == gfn:
            return True
        if s >= 0 and e >= 0 and isinstance(ev[s], int) and isinstance(ev[e], int):
            return bool(ev[s] <= gfn < ev[e])  # type: ignore[operator]
        return False

    def pred(ev: Event) -> bool:
        if kind is not None and ev[0] != kind:
            return False
        if actor is not None and ev[1] != actor:
            return False
        k = ev[0]
        if k not in plans:
            plans[k] = plan(k)
        p = plans[k]
        if p is None:
            return gfn is None and pfn is None and leaf is None
        if leaf is not None and (p[5] < 0 or ev[p[5]] != leaf[1]):
            return False
        g_ok = gfn is None or touches_gfn(ev, p)
        f_ok = pfn is None or (p[4] >= 0 and ev[p[4]] == pfn)
        if any_of and gfn is not None and pfn is not None:
            return touches_gfn(ev, p) or (p[4] >= 0 and ev[p[4]] == pfn)
        return g_ok and f_ok

    return pred


_EDGES = {"seamcall_begin": ("seamcall", True), "tdcall_begin": ("tdcall", True),
          "seamcall_end": ("seamcall", False), "tdcall_end": ("tdcall", False),
          "seamcall_abort": ("seamcall", False), "tdcall_abort": ("tdcall", False)}


def matching_indices(log: EventLog, pred: Callable[[Event], bool], end: Optional[int] = None,
                     with_begins: bool = True) -> List[int]:
    """Return the indices ``< end`` of the events matching ``pred``, ascending.

    With ``with_begins``, the ``*_begin`` edge of a matching ``*_end``/``*_abort`` is included
    too (paired per actor and leaf, first open first closed, as in the trace): a SEAMCALL's
    begin edge often does not know its gfn/pfn yet (AUG resolves them), its end edge does.
    """
    stop = len(log) if end is None else min(end, len(log))
    out: List[int] = []
    extra: List[int] = []
    opened: Dict[Tuple[str, str, Any], List[int]] = {}
    for i in range(stop):
        ev = log[i]
        edge = _EDGES.get(ev[0]) if with_begins else None
        if edge is not None:
            key = (ev[1], edge[0], ev[2])
            if edge[1]:
                opened.setdefault(key, []).append(i)
            else:
                q = opened.get(key)
                b = q.pop(0) if q else None
                if b is not None and pred(ev):
                    extra.append(b)
        if pred(ev):
            out.append(i)
    if extra:
        out = sorted(set(out) | set(extra))
    return out


def load_events(path: str) -> EventLog:
    """Read a JSON Lines event log; any problem becomes a :class:`ToolError` naming the file."""
    try:
        return EventLog.from_jsonl(path)
    except OSError as e:
        msg = f"{path}: cannot read: {e.strerror or e}"
        raise ToolError(msg) from None
    except (ValueError, TypeError, KeyError) as e:
        msg = f"{path}: not a tdxcore event log: {e}"
        raise ToolError(msg) from None


# ---------------------------------------------------------------------------- commands
def cmd_events(args: argparse.Namespace) -> int:
    """``tdxcore events``: print the matching events; 0 if any matched, 1 if none."""
    log = load_events(args.file)
    leaf = parse_leaf(args.leaf) if args.leaf is not None else None
    pred = event_matcher(log.kinds, gfn=args.gfn, pfn=args.pfn, actor=args.actor, leaf=leaf, kind=args.kind)
    idx = matching_indices(log, pred, with_begins=args.kind is None and args.leaf is None)
    if args.limit is not None:
        idx = idx[:args.limit]
    for i in idx:
        print(format_event(log.kinds, i, log[i]))
    return 0 if idx else 1


def cmd_diff(args: argparse.Namespace) -> int:
    """``tdxcore diff``: 0 identical, 1 with the first divergence printed."""
    a, b = load_events(args.a), load_events(args.b)
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            print(f"first divergence at event {i} (A has {len(a)} events, B has {len(b)})")
            print("  A: " + format_event(a.kinds, i, a[i]).lstrip())
            print("  B: " + format_event(b.kinds, i, b[i]).lstrip())
            return 1
    if len(a) != len(b):
        longer, name = (a, "A") if len(a) > len(b) else (b, "B")
        print(f"first divergence at event {n}: {name} goes on ({len(a)} vs {len(b)} events)")
        print(f"  {name}: " + format_event(longer.kinds, n, longer[n]).lstrip())
        print(f"  {'B' if name == 'A' else 'A'}: (end of log)")
        return 1
    print(f"identical: {len(a)} events, digest {a.digest():#018x}")
    return 0


def _read_report(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            rep = json.load(fh)
    except OSError as e:
        msg = f"{path}: cannot read: {e.strerror or e}"
        raise ToolError(msg) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:      # bytes that are not UTF-8 are not JSON
        msg = f"{path}: not JSON: {e}"
        raise ToolError(msg) from None
    if not isinstance(rep, dict):
        msg = f"{path}: a report is a JSON object"
        raise ToolError(msg)
    return rep


def _opt_int(v: Any, what: str, path: str) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    msg = f"{path}: violation.{what}={v!r} is not a non-negative integer or null"
    raise ToolError(msg)


def cmd_explain(args: argparse.Namespace) -> int:
    """``tdxcore explain``: every event that touched the violation's gfn or frame, in order."""
    path = args.report
    rep = _read_report(path)
    viol = rep.get("violation")
    if not isinstance(viol, dict):
        msg = f"{path}: the report records no violation: nothing to explain"
        raise ToolError(msg)
    gfn = _opt_int(viol.get("gfn"), "gfn", path)
    pfn = _opt_int(viol.get("pfn"), "pfn", path)
    upto = _opt_int(viol.get("event_index"), "event_index", path)
    ev_file = rep.get("events_file")
    if not isinstance(ev_file, str) or not ev_file:
        msg = f"{path}: the report has no events_file (run the storm with --events FILE)"
        raise ToolError(msg)
    if not os.path.isabs(ev_file):
        ev_file = os.path.join(os.path.dirname(os.path.abspath(path)), ev_file)
    log = load_events(ev_file)
    if upto is not None and upto >= len(log):
        msg = f"{path}: violation.event_index={upto} but {ev_file} has {len(log)} events"
        raise ToolError(msg)
    digest = rep.get("events_digest")
    if isinstance(digest, str) and upto is None and digest != f"{log.digest():#018x}":
        print(f"tdxcore explain: warning: {ev_file} digest {log.digest():#018x} != report's {digest}",
              file=sys.stderr)
    print(f"violation {viol.get('invariant')}: {viol.get('message')}")
    where = [f"gfn {gfn:#x}" if gfn is not None else "gfn -", f"pfn {pfn:#x}" if pfn is not None else "pfn -",
             f"event {upto}" if upto is not None else "event -"]
    print("  " + ", ".join(where))
    if viol.get("replay"):
        print(f"  replay: {viol['replay']}")
    end = len(log) if upto is None else upto + 1
    pred = event_matcher(log.kinds, gfn=gfn, pfn=pfn, any_of=True)
    shown = 0
    if gfn is not None or pfn is not None:
        idx = matching_indices(log, pred, end)
        if upto is not None and (not idx or idx[-1] != upto):
            idx.append(upto)
        for i in idx:
            print(("> " if i == upto else "  ") + format_event(log.kinds, i, log[i]))
        shown = len(idx)
    elif upto is not None:
        print("> " + format_event(log.kinds, upto, log[upto]))
        shown = 1
    named = " or ".join(w for w in where[:2] if not w.endswith("-")) or "nothing named"
    print(f"{shown} event(s) touched {named}")
    return 0


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn :class:`ToolError` into one stderr line and status 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ToolError as e:
            print(f"tdxcore {args.command}: {e}", file=sys.stderr)
            return 2
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


# ---------------------------------------------------------------------------- campaign, shrink
def _campaign_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    return {"vcpus": args.vcpus, "steps": args.steps, "mix": args.mix, "busy": args.busy,
            "policy": args.policy, "interleave": not args.no_interleave, "check_every": args.check_every}


def cmd_campaign(args: argparse.Namespace) -> int:
    """``tdxcore campaign``: one storm per seed; 0 if no violation, 1 otherwise."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from tdxcore.storm.campaign import parse_seeds, run_campaign

    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        raise ToolError(str(e)) from None
    kw = _campaign_kwargs(args)
    console = Console()
    bar = Progress(TextColumn("[bold]campaign"), BarColumn(), MofNCompleteColumn(), TextColumn("seeds"),
                   TextColumn("{task.fields[found]}"), TimeElapsedColumn(), console=console,
                   transient=True, disable=args.quiet)
    task = bar.add_task("campaign", total=len(seeds), found="")
    bad: List[int] = []

    def progress(done: int, total: int, r: Dict[str, Any]) -> None:
        if r["violation"] is not None:
            bad.append(r["seed"])
        bar.update(task, completed=done, found=f"{len(bad)} violation(s)" if bad else "")

    try:
        rep = run_campaign(seeds, kw, workers=args.workers, scheduler=args.scheduler, progress=progress,
                           on_start=bar.start)
    except ImportError as e:
        raise ToolError(str(e)) from None
    except (ValueError, TypeError) as e:
        raise ToolError(str(e)) from None
    finally:
        bar.stop()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rep.to_dict(), fh, indent=1, sort_keys=True)
            fh.write("\n")
    where = f"Dask {rep.scheduler}" if rep.scheduler else f"{rep.workers} worker(s)"
    steps = sum(r["steps"] for r in rep.results)
    calls = sum(r["seamcalls"] for r in rep.results)
    table = Table(title=f"tdxcore campaign: {len(seeds)} seed(s) {args.seeds}, {kw['policy']}, "
                        f"mix {kw['mix']}, {kw['steps']:,} steps, {where}")
    table.add_column("what")
    table.add_column("figure")
    table.add_row("storms (clean / KVM_BUG / violation)",
                  f"{len(rep.results)} ({sum(r['clean'] for r in rep.results)} / {len(rep.bugged)} / "
                  f"{len(rep.violations)})")
    table.add_row("steps (storm + drain)", f"{steps:,}")
    table.add_row("SEAMCALLs", f"{calls:,}")
    rate = steps / max(rep.seconds, 1e-9)
    table.add_row("wall time", f"{rep.seconds:,.1f} s ({rate:,.0f} steps/s overall)")
    if rep.bugged:
        table.add_row("KVM_BUG seeds", ", ".join(str(r["seed"]) for r in rep.bugged[:20]))
    leaky = [r for r in rep.results if r["leaks"]]
    if leaky:
        table.add_row("leaking seeds", ", ".join(str(r["seed"]) for r in leaky[:20]))
    table.add_row("violations", "none" if rep.ok else ", ".join(str(r["seed"]) for r in rep.violations))
    console.print(table)
    for r in rep.violations:
        v = r["violation"]
        print(f"seed {r['seed']}: invariant {v['invariant']} at event {v['event_index']} (step {v['step']}): "
              f"{v['message']}")
        for line in rep.replay_commands(r["seed"]):
            print(f"  {line}")
    return 0 if rep.ok else 1


def _min_path(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.min{ext or '.json'}"


def cmd_shrink(args: argparse.Namespace) -> int:
    """``tdxcore shrink``: minimise a failing report; 0 when written, 1 if it does not reproduce."""
    from tdxcore.storm.shrink import ShrinkError, shrink

    rep = _read_report(args.report)
    out = args.output or _min_path(args.report)
    log: Optional[Callable[[str], None]] = None if args.quiet else (lambda m: print(m, file=sys.stderr))
    try:
        small = shrink(rep, max_runs=args.max_runs, log=log, report_name=os.path.basename(out))
    except ShrinkError as e:
        print(f"tdxcore shrink: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, KeyError) as e:
        msg = f"{args.report}: {e}"
        raise ToolError(msg) from None
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(small, fh, indent=1, sort_keys=True)
        fh.write("\n")
    s = small["shrink"]
    v = small["violation"]
    print(f"shrunk {s['from']['steps']:,} -> {small['config']['steps']:,} steps, mix {s['from']['mix']} -> "
          f"{small['config']['mix']}, vCPUs {s['from']['vcpus']} -> {small['config']['vcpus']} "
          f"({s['runs']} runs, {s['seconds']:.1f} s): invariant {v['invariant']} at event {v['event_index']}")
    print(f"wrote {out}")
    print(f"  replay: tdxcore replay {out}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``events``, ``diff``, ``explain``, ``campaign`` and ``shrink`` to ``subparsers``.

    Each sets ``func`` (``args.func(args) -> exit status``) and ``command``.
    """
    ev = subparsers.add_parser("events", help="filter a JSON Lines event log",
                               description="Print the events of FILE matching every filter, "
                                           "with their index.")
    ev.add_argument("file", metavar="FILE", help="JSON Lines event log (storm --events)")
    ev.add_argument("--gfn", type=_int,
                    help="events that touched this gfn (field gfn, gpa or start/end range; a SEAMCALL/"
                         "TDCALL begin edge is shown with its matching end edge)")
    ev.add_argument("--pfn", type=_int, help="events whose pfn field is this frame")
    ev.add_argument("--actor", help="exact actor name, e.g. vm0.vcpu1 or host")
    ev.add_argument("--leaf",
                    help="SEAMCALL/TDCALL leaf: name (TDH.MEM.PAGE.AUG), seamcall:N, tdcall:N or N")
    ev.add_argument("--kind", help="exact event kind, e.g. seamcall_end or lock_conflict")
    ev.add_argument("--limit", type=_int, help="print at most N events")
    ev.set_defaults(func=_guard(cmd_events), command="events")

    df = subparsers.add_parser("diff", help="first divergence of two event logs",
                               description="Print the first event where two logs differ (exit 1), "
                                           "or 'identical'.")
    df.add_argument("a", metavar="A", help="first JSON Lines event log")
    df.add_argument("b", metavar="B", help="second JSON Lines event log")
    df.set_defaults(func=_guard(cmd_diff), command="diff")

    ex = subparsers.add_parser("explain", help="events that touched a violation's gfn or frame",
                               description="For REPORT's violation, print every event that touched its gfn "
                                           "or frame, in order, up to the violation's event.")
    ex.add_argument("report", metavar="REPORT", help="report.json of a storm (with events_file)")
    ex.set_defaults(func=_guard(cmd_explain), command="explain")

    cp = subparsers.add_parser("campaign", help="one storm per seed, on local processes or Dask",
                               description="Run the storm for every seed of --seeds (A:B is half-open) and "
                                           "summarise; exit 1 if any seed violates an invariant.")
    cp.add_argument("--seeds", required=True, help="A:B (range(A, B)), N, or a comma list of both")
    cp.add_argument("--workers", type=_int, default=max(1, os.cpu_count() or 1),
                    help="local worker processes (default: the CPU count)")
    cp.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                    help="run on this Dask distributed scheduler (needs the dask extra)")
    cp.add_argument("--vcpus", type=int, default=8, help="vCPU actors (default 8)")
    cp.add_argument("--steps", type=int, default=20_000, help="scheduler steps per storm (default 20000)")
    cp.add_argument("--mix", default="all", choices=["punch", "convert", "slots", "all", "none"])
    cp.add_argument("--busy", type=float, default=0.05, help="BUSY injection probability (default 0.05)")
    cp.add_argument("--policy", default="LINUX_6_18", choices=["LINUX_6_18", "SERIES_2023"])
    cp.add_argument("--no-interleave", action="store_true", help="run each operation to completion")
    cp.add_argument("--check-every", type=int, default=1, metavar="N", help="invariants every N steps")
    cp.add_argument("--json", default=None, metavar="FILE", help="write the campaign summary as JSON")
    cp.add_argument("--quiet", action="store_true", help="no progress bar")
    cp.set_defaults(func=_guard(cmd_campaign), command="campaign")

    sh = subparsers.add_parser("shrink", help="minimise a failing report to a short replayable one",
                               description="Find the fewest steps, the smallest mix and the fewest vCPUs "
                                           "that still violate REPORT's invariant; write REPORT.min.json.")
    sh.add_argument("report", metavar="REPORT", help="report.json with a violation")
    sh.add_argument("-o", "--output", default=None, help="output file (default REPORT.min.json)")
    sh.add_argument("--max-runs", type=_int, default=200, help="bound on the storms run (default 200)")
    sh.add_argument("--quiet", action="store_true", help="no per-run log")
    sh.set_defaults(func=_guard(cmd_shrink), command="shrink")


def main(argv: Optional[List[str]] = None) -> int:
    """Run one of the tools standalone (``python -m tdxcore.cli_tools events FILE ...``)."""
    parser = argparse.ArgumentParser(prog="tdxcore")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
