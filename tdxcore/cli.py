"""The ``tdxcore`` command line (tools layer).

Subcommands
-----------
``tdxcore demo``
    A short seeded tour of the cores with printed figures (the main job until ``storm`` lands).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


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


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(prog="tdxcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a short seeded demo of the cores")
    demo.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    demo.add_argument("--pages", type=int, default=1 << 16,
                      help="4K pages in the S-EPT map/unmap cycle (default 65536)")
    demo.set_defaults(func=_cmd_demo)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
