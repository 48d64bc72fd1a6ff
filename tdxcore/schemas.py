"""Dependency-free validators of the tool outputs' file formats (tools layer; SPEC §3.5, §8).

Each validator raises ``ValueError`` whose message starts with the path of the bad key
(``report.violation.gfn: ...``, ``events line 7: ...``, ``trace.traceEvents[12].dur: ...``) and
returns None for a valid object. Unknown extra keys are allowed everywhere (forward
compatibility within a schema version); the listed keys are required.

``tdxcore.report/1`` (``report.json``) — a JSON object with:

==================  ==========================================================================
key                 value
==================  ==========================================================================
schema              ``"tdxcore.report/1"``
config              object (the storm configuration as run)
seed                integer
policy              string (``"LINUX_6_18"``, ``"SERIES_2023"``)
steps               integer ≥ 0
hash                string, ``0x`` + 1–16 hex digits (the event-log digest the replay checks)
events_digest       same form
counters            object: string → integer
exits, busy, mixes  object: string → integer, or (nested) object of such
leaks               array (one entry per leak) or integer ≥ 0
invariants_checked  integer ≥ 0
violation           null, or object {invariant: str, message: str, gfn: int|null, pfn: int|null,
                    event_index: int ≥ 0|null, replay: str}
versions            object: string → string
events_file         string or null (may be relative to the report's directory)
trace_file          string or null
==================  ==========================================================================

``tdxcore.events/1`` — :meth:`tdxcore.eventlog.EventLog.to_jsonl`: a header object
``{schema, nr_events, digest, kinds: {kind: {fields: [str], leaf_space: null|"seamcall"|"tdcall"}}}``
then one array ``[kind, actor, field...]`` per line; fields are integers, strings, null or arrays
of those; the count and the digest must match the header.

``tdxcore.trace/1`` — :func:`tdxcore.trace.chrome_trace`: ``{traceEvents: [...], displayTimeUnit:
"ns"|"ms", otherData: {schema, nr_events, events_digest, ...}}``; every event has ``ph`` (M, X,
i/I, B, E), ``name``, integer ``pid``/``tid``, number ``ts`` ≥ 0; X has ``dur`` ≥ 0; instants a
scope ``s`` in g/p/t; every track with events is named by a ``thread_name`` metadata event and
complete slices on one track nest (what the timeline viewers require).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, NoReturn, Tuple, Union

__all__ = ["REPORT_SCHEMA", "EVENTS_SCHEMA", "TRACE_SCHEMA", "validate_report", "validate_events_file",
           "validate_trace"]

REPORT_SCHEMA = "tdxcore.report/1"
EVENTS_SCHEMA = "tdxcore.events/1"
TRACE_SCHEMA = "tdxcore.trace/1"

_HEX = re.compile(r"^0x[0-9a-f]{1,16}$")


def _bad(where: str, what: str) -> NoReturn:
    """Raise the ValueError ``"<where>: <what>"`` (its context suppressed)."""
    msg = f"{where}: {what}"
    raise ValueError(msg) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(obj: Dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        _bad(f"{where}.{key}", "missing")
    return obj[key]


def _check_int(v: Any, where: str, lo: int = 0, nullable: bool = False) -> None:
    if v is None and nullable:
        return
    if not _is_int(v) or v < lo:
        _bad(where, f"{v!r} is not an integer >= {lo}" + (" or null" if nullable else ""))


def _check_str(v: Any, where: str, nullable: bool = False) -> None:
    if v is None and nullable:
        return
    if not isinstance(v, str):
        _bad(where, f"{v!r} is not a string" + (" or null" if nullable else ""))


def _check_counts(v: Any, where: str, depth: int = 0) -> None:
    """Object of str → int, or (up to 3 levels) str → such objects."""
    if not isinstance(v, dict):
        _bad(where, f"{type(v).__name__} is not an object")
    for k, x in v.items():
        if _is_int(x):
            continue
        if isinstance(x, dict) and depth < 3:
            _check_counts(x, f"{where}.{k}", depth + 1)
            continue
        _bad(f"{where}.{k}", f"{x!r} is not an integer (or an object of integers)")


# ---------------------------------------------------------------------------- report
def validate_report(obj: Any) -> None:
    """Validate a parsed ``report.json`` (``tdxcore.report/1``); raise ValueError naming the bad key."""
    w = "report"
    if not isinstance(obj, dict):
        _bad(w, f"{type(obj).__name__} is not an object")
    if _need(obj, "schema", w) != REPORT_SCHEMA:
        _bad(f"{w}.schema", f"{obj['schema']!r} is not {REPORT_SCHEMA!r}")
    if not isinstance(_need(obj, "config", w), dict):
        _bad(f"{w}.config", "is not an object")
    _check_int(_need(obj, "seed", w), f"{w}.seed", lo=-(1 << 63))
    _check_str(_need(obj, "policy", w), f"{w}.policy")
    _check_int(_need(obj, "steps", w), f"{w}.steps")
    for key in ("hash", "events_digest"):
        v = _need(obj, key, w)
        if not isinstance(v, str) or not _HEX.match(v):
            _bad(f"{w}.{key}", f"{v!r} is not a 0x-prefixed lower-case hex digest")
    _check_counts(_need(obj, "counters", w), f"{w}.counters", depth=3)
    for key in ("exits", "busy", "mixes"):
        _check_counts(_need(obj, key, w), f"{w}.{key}")
    leaks = _need(obj, "leaks", w)
    if not isinstance(leaks, list):
        _check_int(leaks, f"{w}.leaks")
    _check_int(_need(obj, "invariants_checked", w), f"{w}.invariants_checked")
    viol = _need(obj, "violation", w)
    if viol is not None:
        vw = f"{w}.violation"
        if not isinstance(viol, dict):
            _bad(vw, f"{type(viol).__name__} is neither null nor an object")
        _check_str(_need(viol, "invariant", vw), f"{vw}.invariant")
        _check_str(_need(viol, "message", vw), f"{vw}.message")
        _check_int(_need(viol, "gfn", vw), f"{vw}.gfn", nullable=True)
        _check_int(_need(viol, "pfn", vw), f"{vw}.pfn", nullable=True)
        _check_int(_need(viol, "event_index", vw), f"{vw}.event_index", nullable=True)
        _check_str(_need(viol, "replay", vw), f"{vw}.replay")
    versions = _need(obj, "versions", w)
    if not isinstance(versions, dict):
        _bad(f"{w}.versions", "is not an object")
    for k, v in versions.items():
        _check_str(v, f"{w}.versions.{k}")
    for key in ("events_file", "trace_file"):
        _check_str(_need(obj, key, w), f"{w}.{key}", nullable=True)


# ---------------------------------------------------------------------------- events
def _check_field(x: Any, where: str) -> None:
    if x is None or isinstance(x, str) or isinstance(x, int):    # bool is an int here, as in the log
        return
    if isinstance(x, list):
        for k, y in enumerate(x):
            _check_field(y, f"{where}[{k}]")
        return
    _bad(where, f"{x!r} ({type(x).__name__}) is not an integer, string, null or array")


def validate_events_file(path: Union[str, "os.PathLike[str]"]) -> None:
    """Validate a JSON Lines event log (``tdxcore.events/1``), including its count and digest."""
    from tdxcore.eventlog import EventLog, _tuples  # the digest is the log's own (no second encoder)

    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    if not lines:
        _bad("events header", "the file is empty")
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError as e:
        _bad("events header", f"not JSON: {e}")
    w = "events header"
    if not isinstance(head, dict):
        _bad(w, "is not an object")
    if _need(head, "schema", w) != EVENTS_SCHEMA:
        _bad(f"{w}.schema", f"{head['schema']!r} is not {EVENTS_SCHEMA!r}")
    _check_int(_need(head, "nr_events", w), f"{w}.nr_events")
    digest = _need(head, "digest", w)
    if not isinstance(digest, str) or not _HEX.match(digest):
        _bad(f"{w}.digest", f"{digest!r} is not a 0x-prefixed hex digest")
    kinds = _need(head, "kinds", w)
    if not isinstance(kinds, dict):
        _bad(f"{w}.kinds", "is not an object")
    log = EventLog()
    nfields: Dict[str, int] = {}
    for k, spec in kinds.items():
        kw = f"{w}.kinds.{k}"
        if not isinstance(spec, dict):
            _bad(kw, "is not an object")
        fields = _need(spec, "fields", kw)
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            _bad(f"{kw}.fields", f"{fields!r} is not an array of strings")
        space = _need(spec, "leaf_space", kw)
        if space not in (None, "seamcall", "tdcall"):
            _bad(f"{kw}.leaf_space", f"{space!r} is not null, 'seamcall' or 'tdcall'")
        try:
            log.register_kind(k, tuple(fields), space)
        except ValueError as e:
            _bad(kw, str(e))
        nfields[k] = len(fields)
    for n, line in enumerate(lines[1:], start=2):
        lw = f"events line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            _bad(lw, f"not JSON: {e}")
        if not isinstance(row, list) or len(row) < 2:
            _bad(lw, "is not an array [kind, actor, field...]")
        if not isinstance(row[0], str) or row[0] not in nfields:
            _bad(f"{lw}.kind", f"{row[0]!r} is not a kind declared in the header")
        if not isinstance(row[1], str):
            _bad(f"{lw}.actor", f"{row[1]!r} is not a string")
        if len(row) - 2 != nfields[row[0]]:
            _bad(lw, f"kind {row[0]!r} has {nfields[row[0]]} fields, the line {len(row) - 2}")
        for k, x in enumerate(row[2:]):
            _check_field(x, f"{lw}.{kinds[row[0]]['fields'][k]}")
        ev = _tuples(row)
        log.emit(ev[0], ev[1], *ev[2:])
    if len(log) != head["nr_events"]:
        _bad(f"{w}.nr_events", f"says {head['nr_events']}, the file has {len(log)} events")
    if f"{log.digest():#018x}" != digest:
        _bad(f"{w}.digest", f"says {digest}, the events hash to {log.digest():#018x}")


# ---------------------------------------------------------------------------- trace
_PHASES = frozenset({"M", "X", "i", "I", "B", "E", "C"})
_META = frozenset({"thread_name", "process_name", "thread_sort_index", "process_sort_index"})


def validate_trace(obj: Any) -> None:
    """Validate a parsed trace (``tdxcore.trace/1``, Chrome/Perfetto trace-event JSON)."""
    w = "trace"
    if not isinstance(obj, dict):
        _bad(w, f"{type(obj).__name__} is not an object")
    other = _need(obj, "otherData", w)
    if not isinstance(other, dict):
        _bad(f"{w}.otherData", "is not an object")
    if _need(other, "schema", f"{w}.otherData") != TRACE_SCHEMA:
        _bad(f"{w}.otherData.schema", f"{other['schema']!r} is not {TRACE_SCHEMA!r}")
    _check_int(_need(other, "nr_events", f"{w}.otherData"), f"{w}.otherData.nr_events")
    unit = _need(obj, "displayTimeUnit", w)
    if unit not in ("ns", "ms"):
        _bad(f"{w}.displayTimeUnit", f"{unit!r} is not 'ns' or 'ms'")
    evs = _need(obj, "traceEvents", w)
    if not isinstance(evs, list):
        _bad(f"{w}.traceEvents", "is not an array")
    named: set = set()
    used: set = set()
    slices: Dict[Tuple[int, int], List[Tuple[float, float, int]]] = {}
    for k, e in enumerate(evs):
        ew = f"{w}.traceEvents[{k}]"
        if not isinstance(e, dict):
            _bad(ew, "is not an object")
        ph = _need(e, "ph", ew)
        if ph not in _PHASES:
            _bad(f"{ew}.ph", f"{ph!r} is not one of {sorted(_PHASES)}")
        _check_str(_need(e, "name", ew), f"{ew}.name")
        for key in ("pid", "tid"):
            _check_int(_need(e, key, ew), f"{ew}.{key}")
        ts = _need(e, "ts", ew)
        if not isinstance(ts, int | float) or isinstance(ts, bool) or ts < 0:
            _bad(f"{ew}.ts", f"{ts!r} is not a number >= 0")
        if "args" in e and not isinstance(e["args"], dict):
            _bad(f"{ew}.args", "is not an object")
        track = (e["pid"], e["tid"])
        if ph == "M":
            if e["name"] not in _META:
                _bad(f"{ew}.name", f"{e['name']!r} is not a metadata name {sorted(_META)}")
            args = _need(e, "args", ew)
            if e["name"].endswith("_name"):
                _check_str(_need(args, "name", f"{ew}.args"), f"{ew}.args.name")
            else:
                _check_int(_need(args, "sort_index", f"{ew}.args"), f"{ew}.args.sort_index", lo=-(1 << 31))
            if e["name"] == "thread_name":
                named.add(track)
            continue
        used.add((track, k))
        if ph == "X":
            dur = _need(e, "dur", ew)
            if not isinstance(dur, int | float) or isinstance(dur, bool) or dur < 0:
                _bad(f"{ew}.dur", f"{dur!r} is not a number >= 0")
            slices.setdefault(track, []).append((ts, ts + dur, k))
        elif ph in ("i", "I") and e.get("s", "t") not in ("g", "p", "t"):
            _bad(f"{ew}.s", f"{e['s']!r} is not 'g', 'p' or 't'")
    for track, k in sorted(used):
        if track not in named:
            _bad(f"{w}.traceEvents[{k}].tid", f"track pid={track[0]} tid={track[1]} has no thread_name")
    for track, ss in slices.items():
        stack: List[Tuple[float, float, int]] = []
        for s in sorted(ss, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1][1] <= s[0]:
                stack.pop()
            if stack and s[1] > stack[-1][1]:
                _bad(f"{w}.traceEvents[{s[2]}]",
                           f"slice [{s[0]}, {s[1]}) overlaps traceEvents[{stack[-1][2]}] on track {track} "
                           "without nesting")
            stack.append(s)
