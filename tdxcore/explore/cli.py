"""``tdxcore explore``: run the exhaustive explorer from the command line (issue 11 item 2).

``tdxcore explore SCENARIO [--policy P] [--max-steps N] [--preemption-bound K] [--no-reduce]
[--compare] [--workers N] [--report FILE] [--trace FILE] [--json FILE]`` explores one catalogue
scenario (``--list`` prints the catalogue and the policies); prints schedules, states, pruned
transitions and states/s; on a violation prints the shortest violating schedule and writes it as
a report ``tdxcore replay`` runs, with its Perfetto trace. Exit status: 0 proven within the
bounds, 1 violated, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, List, Optional

__all__ = ["register", "cmd_explore"]


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        msg = f"{text!r} is not an integer"
        raise argparse.ArgumentTypeError(msg) from None


def _rows(res: Any) -> List[Any]:
    return [("verdict", f"{res.verdict} within max-steps {res.max_steps}"
             + ("" if res.preemption_bound is None else f", preemption bound {res.preemption_bound}")),
            ("reduction", "sleep sets" if res.reduce else "none"),
            ("schedules (complete / truncated / violating)",
             f"{res.schedules:,} ({res.complete:,} / {res.truncated:,} / {res.violations:,})"),
            ("states", f"{res.states:,}"),
            ("transitions (pruned by the state cache)", f"{res.transitions:,} ({res.pruned:,})"),
            ("choices skipped by sleep sets / the preemption bound",
             f"{res.sleep_skipped:,} / {res.bound_skipped:,}"),
            ("re-executions from the start", f"{res.executions:,}"),
            ("wall time",
             f"{res.seconds:,.2f} s ({res.states_per_s:,.0f} states/s, {res.workers} worker(s))")]


def _print_list() -> None:
    from tdxcore.explore.scenarios import SCENARIOS
    from tdxcore.explore.variants import VARIANTS

    print("scenarios (default max-steps / long):")
    for s in SCENARIOS.values():
        catches = f"; catches {', '.join(s.catches)}" if s.catches else ""
        print(f"  {s.name:32s} {s.max_steps:3d} / {s.long_max_steps:3d}  {s.race}{catches}")
    print("policies (--policy):")
    for v in VARIANTS.values():
        print(f"  {v.name:20s} {'broken: ' if v.broken else ''}{v.doc}")


def cmd_explore(args: argparse.Namespace) -> int:
    """``tdxcore explore``: 0 proven, 1 violated, 2 usage error."""
    from rich.console import Console
    from rich.table import Table

    from tdxcore.explore.engine import ExploreConfig, explore
    from tdxcore.explore.report import write_counterexample

    if args.list:
        _print_list()
        return 0
    if args.scenario is None:
        print("tdxcore explore: give a SCENARIO (see --list)", file=sys.stderr)
        return 2
    try:
        cfg = ExploreConfig(args.scenario, args.policy, max_steps=args.max_steps,
                            preemption_bound=args.preemption_bound, reduce=not args.no_reduce,
                            stop_at_first=args.stop_at_first)
        res = explore(cfg, workers=args.workers, scheduler=args.scheduler)
        other = None
        if args.compare:
            other = explore(ExploreConfig(args.scenario, args.policy, max_steps=args.max_steps,
                                          preemption_bound=args.preemption_bound, reduce=args.no_reduce,
                                          stop_at_first=args.stop_at_first),
                            workers=args.workers, scheduler=args.scheduler)
    except (ValueError, TypeError, ImportError) as e:
        print(f"tdxcore explore: {e}", file=sys.stderr)
        return 2
    console = Console()
    table = Table(title=f"tdxcore explore {args.scenario} ({args.policy})")
    table.add_column("what")
    table.add_column("figure")
    for k, v in _rows(res):
        table.add_row(k, v)
    if other is not None:
        red, un = (res, other) if res.reduce else (other, res)
        table.add_row("unreduced states / transitions (same verdict)",
                      f"{un.states:,} / {un.transitions:,} ({un.verdict})")
        table.add_row("reduction factor (states, transitions, re-executions)",
                      f"{un.states / max(red.states, 1):.2f}x, "
                      f"{un.transitions / max(red.transitions, 1):.2f}x, "
                      f"{un.executions / max(red.executions, 1):.2f}x")
    console.print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"schema": "tdxcore.explore-run/1", "result": res.to_dict(),
                       "compare": None if other is None else other.to_dict()}, fh, indent=1, sort_keys=True)
            fh.write("\n")
    v = res.violation
    if v is None:
        return 0
    print(f"violation: {v['kind']} {v['id']}: {v['message']}")
    print(f"shortest violating schedule ({v['depth']} steps): {' '.join(v['schedule'])}")
    obj = write_counterexample(res, args.report, trace=args.trace)
    print(f"wrote {args.report}" + (f" and {args.trace}" if args.trace else ""))
    print(f"  replay: {obj['replay']}")
    return 1


def register(subparsers: Any) -> None:
    """Add ``explore`` to the ``tdxcore`` subcommands (``func`` and ``command`` set)."""
    ex = subparsers.add_parser("explore", help="prove a small scenario race-free over every schedule",
                               description="Explore every interleaving of a catalogue scenario within the "
                                           "bounds; print the shortest violating schedule if any.")
    ex.add_argument("scenario", nargs="?", default=None, metavar="SCENARIO",
                    help="catalogue scenario (see --list)")
    ex.add_argument("--list", action="store_true", help="print the scenarios and policies, then exit")
    ex.add_argument("--policy", default="LINUX_6_18",
                    help="a built-in policy or a broken variant (default LINUX_6_18; see --list)")
    ex.add_argument("--max-steps", type=_int, default=None, metavar="N",
                    help="bound on a schedule's length (default: the scenario's)")
    ex.add_argument("--preemption-bound", type=_int, default=None, metavar="K",
                    help="CHESS preemption bound (default none; turns the reduction off)")
    ex.add_argument("--no-reduce", action="store_true", help="no partial-order reduction")
    ex.add_argument("--compare", action="store_true",
                    help="also run the other search (reduced/unreduced) and print the reduction factor")
    ex.add_argument("--stop-at-first", action="store_true",
                    help="stop at the first violation (not necessarily the shortest)")
    ex.add_argument("--workers", type=_int, default=1, help="split the tree over N local processes")
    ex.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                    help="run the subtrees on this Dask distributed scheduler (needs the dask extra)")
    ex.add_argument("--report", default="counterexample.json",
                    help="where a violation's report goes (default counterexample.json)")
    ex.add_argument("--trace", default=None, help="also write the counterexample's Perfetto trace")
    ex.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON")
    ex.set_defaults(func=cmd_explore, command="explore")


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``explore`` standalone (``python -m tdxcore.explore.cli SCENARIO``)."""
    parser = argparse.ArgumentParser(prog="tdxcore")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["explore", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
