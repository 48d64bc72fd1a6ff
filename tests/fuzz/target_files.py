"""Target ``files``: mutated ``report.json`` and JSON Lines event logs through the file commands.

The input is the file contents themselves (so libFuzzer's mutations edit JSON text), split at
``SEP`` into a report and an event log. The first byte picks the consumer: ``tdxcore replay``,
``explain``, ``shrink``, ``events`` (with random filters) or ``diff`` — run in-process through
``tdxcore.cli.main`` — or the library calls ``replay(dict)`` and ``EventLog.from_jsonl``. The
commands must end with an exit status (0, 1 or 2, a message on stderr), never a traceback; the
library calls must return or raise ``TdxTypeError``/``TdxValueError`` (SPEC §7). A report whose
storm is legal but long (> 300 steps) is not run: only its validation is fuzzed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Any, List, Tuple

from tdxcore.eventlog import EventLog

from .common import ALLOWED, Finding
from .fdp import Fdp

SEP = b"\n%%\n"
MAX_STEPS = 300
COMMANDS = ("replay", "explain", "shrink", "events", "diff", "api-replay", "api-events")


def _split(data: bytes) -> Tuple[int, bytes, bytes]:
    mode = data[0] if data else 0
    body = data[1:]
    report, _, events = body.partition(SEP)
    return mode, report, events


def _runnable(report: bytes) -> bool:
    """Whether the report's storm is short enough to run inside one fuzz iteration."""
    try:
        obj = json.loads(report.decode("utf-8", "replace"))
        cfg = obj["config"]
        steps, vcpus, pages = cfg.get("steps", 20_000), cfg.get("vcpus", 8), cfg.get("area_pages", 512)
        busy = cfg.get("busy", 0.05)
    except Exception:       # noqa: BLE001 - not even a dict with a config: replay will refuse it
        return True
    ints = all(type(x) is int for x in (steps, vcpus, pages))
    return not ints or (steps <= MAX_STEPS and vcpus <= 8 and pages <= 1024
                        and not (isinstance(busy, (int, float)) and busy > 0.5)
                        and not cfg.get("seconds") and not cfg.get("threads"))


def _cli(argv: List[str]) -> int:
    from tdxcore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:         # argparse usage errors (a filter value it cannot parse)
            rc = e.code if isinstance(e.code, int) else 2
    return rc


def target(data: bytes) -> None:
    """Fuzz target ``files`` (see the module docstring)."""
    mode, report, events = _split(data)
    cmd = COMMANDS[mode % len(COMMANDS)]
    f = Fdp(bytes([mode]))
    with tempfile.TemporaryDirectory(prefix="tdxfuzz") as tmp:
        rp, ep = os.path.join(tmp, "report.json"), os.path.join(tmp, "events.jsonl")
        with open(rp, "wb") as fh:
            fh.write(report)
        with open(ep, "wb") as fh:
            fh.write(events)
        try:
            _one(cmd, f, report, rp, ep, tmp)
        except Finding:
            raise
        except Exception as e:
            msg = f"{cmd}: {type(e).__name__}: {e}"
            raise Finding(msg) from e


def _one(cmd: str, f: Fdp, report: bytes, rp: str, ep: str, tmp: str) -> None:
    if cmd in ("replay", "shrink", "api-replay") and not _runnable(report):
        return
    if cmd == "replay":
        rc = _cli(["replay", rp])
    elif cmd == "explain":
        rc = _cli(["explain", rp])
    elif cmd == "shrink":
        rc = _cli(["shrink", rp, "--quiet", "--max-runs", "3", "-o", os.path.join(tmp, "min.json")])
    elif cmd == "events":
        argv = ["events", ep]
        for opt, val in (("--gfn", "0x100000"), ("--pfn", "5"), ("--actor", "host"), ("--leaf", "PAGE.AUG"),
                         ("--kind", "seamcall_end"), ("--limit", "3")):
            if f.bool():
                argv += [opt, val]
        rc = _cli(argv)
    elif cmd == "diff":
        rc = _cli(["diff", ep, ep if report[:1] == b"" else rp])
    elif cmd == "api-replay":
        from tdxcore.storm import replay

        try:
            obj: Any = json.loads(report)
        except ValueError:
            return
        try:
            replay(obj)
        except ALLOWED:
            pass
        return
    else:
        try:
            EventLog.from_jsonl(ep)
        except ALLOWED:
            pass
        return
    if rc not in (0, 1, 2):
        msg = f"tdxcore {cmd} exited {rc}"
        raise Finding(msg)
