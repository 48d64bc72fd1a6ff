"""The ``tdxcore`` command line (tools layer).

Subcommands
-----------
``tdxcore storm``
    The default fault storm (SPEC §8): progress bar, summary table, ``report.json``, events, trace,
    map; ``--compare-policies`` runs the same seed under both retry policies.
``tdxcore replay REPORT``
    Re-run a report's storm and verify its event-log hash.
``tdxcore events FILE`` / ``diff A B`` / ``explain REPORT``
    Filter an event log, find the first divergence of two, explain a violation
    (:mod:`tdxcore.cli_tools`).
``tdxcore demo``
    A short seeded tour of the cores with printed figures.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional


def _cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tdxcore.demo import run_demo

    rep = run_demo(seed=args.seed, nr_pages=args.pages)
    table = Table(title=f"tdxcore core demo (seed {args.seed})")
    table.add_column("what")
    table.add_column("figure", justify="right")
    for name, value in rep.figures:
        table.add_row(name, value)
    Console().print(table)
    return 0


def _storm_config(args: argparse.Namespace, policy: Optional[str] = None) -> Any:
    from tdxcore.storm import StormConfig, parse_inject

    return StormConfig(vcpus=args.vcpus, steps=args.steps, seconds=args.seconds, seed=args.seed,
                       mix=args.mix, busy=args.busy,
                       inject=tuple(parse_inject(t) for t in args.inject),
                       policy=policy or args.policy, store=args.store, interleave=not args.no_interleave,
                       threads=args.threads, check_every=args.check_every)


def _run_one(args: argparse.Namespace, cfg: Any, console: Any, write_files: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from tdxcore.storm import run_storm

    maps: list = []

    def draw_map(vm: Any) -> None:
        if write_files and args.map:
            from tdxcore.storm.memmap import render_map

            render_map(vm, args.map, title=f"seed {cfg.seed} {cfg.policy} {cfg.mix}")
            maps.append(args.map)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:,}/"
                  "{task.total:,} steps"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=args.quiet) as bar:
        task = bar.add_task(f"storm {cfg.policy} seed {cfg.seed}", total=cfg.steps, rate="")
        import time

        t0 = time.perf_counter()

        def progress(done: int, total: int) -> None:
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=done, rate=f"{done / dt:,.0f} steps/s")

        rep = run_storm(cfg, progress=progress, before_teardown=draw_map)
    return rep


def _cmd_storm(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tdxcore.storm.report import report_dict, summary_rows, write_report

    console = Console(stderr=False)
    try:
        policies = ["LINUX_6_18", "SERIES_2023"] if args.compare_policies else [args.policy]
        cfgs = [_storm_config(args, p) for p in policies]
    except (ValueError, TypeError) as e:
        print(f"tdxcore storm: {e}", file=sys.stderr)
        return 2
    objs = []
    status = 0
    for i, cfg in enumerate(cfgs):
        rep = _run_one(args, cfg, console, write_files=(i == 0))
        ev_file = tr_file = None
        if i == 0 and args.events:
            from tdxcore.trace import write_events

            write_events(rep.host, args.events)
            ev_file = args.events
        if i == 0 and args.trace:
            from tdxcore.trace import write_trace

            write_trace(rep.host, args.trace)
            tr_file = args.trace
        if i == 0 and args.report:
            obj = write_report(rep, args.report, events_file=ev_file, trace_file=tr_file)
        else:
            obj = report_dict(rep, events_file=ev_file, trace_file=tr_file)
        objs.append(obj)
        if rep.violation is not None:
            status = 1
            v = rep.violation
            print(f"tdxcore storm: invariant {v['invariant']} violated at event {v['event_index']} "
                  f"(seed {cfg.seed}): {v['message']}\n"
                  f"  replay: tdxcore replay {args.report or 'report.json'}", file=sys.stderr)
    if len(objs) == 1:
        table = Table(title=f"tdxcore storm: seed {cfgs[0].seed}, {cfgs[0].policy}, mix {cfgs[0].mix}, "
                      f"{cfgs[0].vcpus} vCPUs")
        table.add_column("what")
        table.add_column("figure")
        for what, fig in summary_rows(objs[0]):
            table.add_row(what, fig)
    else:
        table = Table(title=f"tdxcore storm --compare-policies: seed {cfgs[0].seed}, mix {cfgs[0].mix}")
        table.add_column("what")
        for c in cfgs:
            table.add_column(c.policy)
        rows = [dict(summary_rows(o)) for o in objs]
        keys: list = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        for k in keys:
            table.add_row(k, *(r.get(k, "-") for r in rows))
    console.print(table)
    return status


def _cmd_replay(args: argparse.Namespace) -> int:
    import json

    from tdxcore.storm import ReplayMismatch, replay

    try:
        with open(args.report, encoding="utf-8") as fh:
            obj = json.load(fh)
        again = replay(obj)
    except ReplayMismatch as e:
        print(f"tdxcore replay: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"tdxcore replay: {e}", file=sys.stderr)
        return 2
    print(f"replayed {again.steps:,} steps: event-log hash {again.events_digest:#x} matches")
    return 1 if again.violation is not None else 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(prog="tdxcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a short seeded demo of the cores")
    demo.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    demo.add_argument("--pages", type=int, default=1 << 16,
                      help="4K pages in the S-EPT map/unmap cycle (default 65536)")
    demo.set_defaults(func=_cmd_demo)

    st = sub.add_parser("storm", help="run the seeded fault storm (the main job)")
    st.add_argument("--vcpus", type=int, default=8, help="vCPU actors (default 8)")
    st.add_argument("--steps", type=int, default=20_000, help="scheduler steps (default 20000)")
    st.add_argument("--seconds", type=float, default=None, help="run for this long instead (not replayable)")
    st.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    st.add_argument("--mix", default="all", choices=["punch", "convert", "slots", "all", "none"],
                    help="host actors (default all)")
    st.add_argument("--busy", type=float, default=0.05, help="BUSY injection probability (default 0.05)")
    st.add_argument("--inject", action="append", default=[], metavar="LEAF=STATUS@P",
                    help="an extra injection (repeatable)")
    st.add_argument("--policy", default="LINUX_6_18", choices=["LINUX_6_18", "SERIES_2023"])
    st.add_argument("--store", default="ranges", choices=["ranges", "xarray"])
    st.add_argument("--threads", action="store_true", help="one OS thread per actor (not replayable)")
    st.add_argument("--no-interleave", action="store_true", help="run each operation to completion")
    st.add_argument("--check-every", type=int, default=1, metavar="N", help="invariants every N steps")
    st.add_argument("--compare-policies", action="store_true", help="the same seed under both policies")
    st.add_argument("--report", default="report.json", help="report file (default report.json)")
    st.add_argument("--events", default=None, help="write the event log (JSON Lines)")
    st.add_argument("--trace", default=None, help="write a Chrome/Perfetto trace")
    st.add_argument("--map", default=None, metavar="FILE.png", help="draw the memory map (matplotlib)")
    st.add_argument("--quiet", action="store_true", help="no progress bar")
    st.set_defaults(func=_cmd_storm)

    rp = sub.add_parser("replay", help="re-run a report's storm and verify its hash")
    rp.add_argument("report", help="report.json")
    rp.set_defaults(func=_cmd_replay)

    from tdxcore import benchplot, cli_tools
    from tdxcore.explore import cli as explore_cli

    cli_tools.register(sub)
    explore_cli.register(sub)
    benchplot.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit status (0 clean, 1 violation, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "pages", 1) <= 0 or getattr(args, "pages", 1) > 1 << 20:
        parser.error("--pages must be in [1, 1048576]")
    from tdxcore.errors import InvariantViolation

    try:
        return int(args.func(args))
    except InvariantViolation as exc:
        print(f"tdxcore: invariant violated: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (``tdxcore events ... | head``): stop quietly, as Unix tools do;
        # point stdout at /dev/null so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
