"""Event-log exports: JSON Lines and Chrome/Perfetto trace-event JSON (tools layer; SPEC §3.5, §8).

:func:`write_events` writes the log as JSON Lines (:meth:`EventLog.to_jsonl`, schema
``tdxcore.events/1``). :func:`chrome_trace` turns a log into the trace-event format that
``ui.perfetto.dev`` and ``chrome://tracing`` open (schema ``tdxcore.trace/1`` in ``otherData``):

* one track (``tid``) per actor, named by a ``thread_name`` metadata event; vCPU actors
  (``"vm0.vcpu1"``) live in one process per VM (``"vm0"``, also home of the VM's own actor
  ``"vm0"``: kicks, invalidations), every other actor in the process ``"host"``;
* SEAMCALLs and TDCALLs are complete slices (``ph: "X"``) from their ``*_begin`` to their
  ``*_end`` edge, matched per actor and leaf in order (first open, first closed); an
  ``*_abort`` closes the slice too (``args.aborted``); an edge left open at the end of the log
  closes there (``args.unterminated``);
* guest mode (``td_enter`` → ``td_exit``, or the end/abort of the enclosing VP.ENTER) is a
  slice named ``guest``;
* exits (``td_exit`` reasons, ``memory_fault_exit``, ``tdvmcall``), ``lock_conflict``,
  ``kick``, ``fault`` (its ``RET_PF_*`` result, so retries show), ``inject`` and every other kind
  are instants (``ph: "i"``) with the event's fields as ``args``; ``vm_bug``, ``vm_dead`` and
  ``leak`` are global instants (a line across every track).

Time is the event index: event *i* is at ``ts = i`` (trace time unit µs), so a trace is a pure
function of the log and two equal logs give byte-identical files. Slices of one track must nest
for the viewers; an actor whose slices overlap without nesting (several generators sharing a
name) gets extra lanes (``"host #2"``) rather than a malformed track.

Integers that JavaScript cannot hold exactly (> 2**53) and register values are written as hex
strings; statuses and leaves also carry their names.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from tdxcore.eventlog import Event, EventLog
from tdxcore.status import Leaf, TdcallLeaf, status_name

__all__ = ["TRACE_SCHEMA", "write_events", "chrome_trace", "write_trace", "event_args", "format_event",
           "leaf_name", "EXIT_REASON_NAMES"]

#: Schema tag of the trace file (``otherData.schema``).
TRACE_SCHEMA = "tdxcore.trace/1"

#: Basic VMX exit reasons a TD exit reports (SDM Vol. 3C, appendix C), for display only.
EXIT_REASON_NAMES: Mapping[int, str] = {
    0: "EXCEPTION_NMI", 1: "EXTERNAL_INTERRUPT", 2: "TRIPLE_FAULT", 7: "INTERRUPT_WINDOW",
    10: "CPUID", 12: "HLT", 18: "VMCALL", 30: "IO", 31: "MSR_READ", 32: "MSR_WRITE",
    48: "EPT_VIOLATION", 49: "EPT_MISCONFIG", 52: "PREEMPTION_TIMER", 77: "TDCALL",
}

#: ``RET_PF_*`` values of the ``fault`` event's ``result`` (kvm/fault.py), for display only.
_RET_PF = {0: "CONTINUE", 1: "RETRY", 2: "EMULATE", 3: "WRITE_PROTECTED", 4: "INVALID", 5: "FIXED",
           6: "SPURIOUS"}

#: Fields shown in hex (addresses, frames, registers, statuses).
_HEX_FIELDS = frozenset({"gfn", "pfn", "gpa", "start", "end", "args", "out", "status", "operand", "tdvpr",
                         "r10", "r11", "hkid"})
_JS_SAFE = (1 << 53) - 1
_VCPU_ACTOR = re.compile(r"^(vm\d+)(?:\.|$)")
_GLOBAL_KINDS = frozenset({"vm_bug", "vm_dead", "leak"})

LogLike = Union[EventLog, Any]   # an EventLog, or anything with an ``events`` EventLog (a Host)


def _log_of(host_or_log: LogLike) -> EventLog:
    if isinstance(host_or_log, EventLog):
        return host_or_log
    ev = getattr(host_or_log, "events", None)
    if isinstance(ev, EventLog):
        return ev
    msg = f"host_or_log={host_or_log!r} must be an EventLog or have an EventLog in .events"
    from tdxcore.errors import TdxTypeError
    raise TdxTypeError(msg, name="host_or_log", value=host_or_log)


def leaf_name(leaf: Any, space: Optional[str]) -> str:
    """Dotted name of ``leaf`` in its leaf space (``"TDH.MEM.PAGE.AUG"``), or ``str(leaf)``."""
    if isinstance(leaf, int) and not isinstance(leaf, bool):
        try:
            if space == "seamcall":
                return str(Leaf(leaf))
            if space == "tdcall":
                return str(TdcallLeaf(leaf))
        except ValueError:
            return f"{space}:{leaf}"
    return str(leaf)


def _hexed(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [_hexed(y) for y in x]
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{int(x):#x}"
    return x


def _json_safe(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [_json_safe(y) for y in x]
    if isinstance(x, int) and not isinstance(x, bool) and not -_JS_SAFE <= x <= _JS_SAFE:
        return f"{int(x):#x}"
    if isinstance(x, int) and not isinstance(x, bool):
        return int(x)
    return x


def event_args(kinds: Mapping[str, Tuple[Tuple[str, ...], Optional[str]]], ev: Event) -> Dict[str, Any]:
    """Return ``{field: value}`` of ``ev`` for display: hex for addresses/registers, names added.

    ``leaf`` becomes its dotted name (in the kind's leaf space), ``status`` its hex value plus
    ``status_name``, ``reason`` of ``td_exit`` and ``result`` of ``fault`` gain ``*_name``.
    Unknown kinds (not in ``kinds``) give ``{"fields": [...]}``.
    """
    spec = kinds.get(ev[0])
    if spec is None:
        return {"fields": _json_safe(list(ev[2:]))}
    names, space = spec
    out: Dict[str, Any] = {}
    for name, value in zip(names, ev[2:], strict=False):
        if name == "leaf" and value is not None:
            out[name] = leaf_name(value, space)
        elif name in _HEX_FIELDS and value is not None:
            out[name] = _hexed(value)
            if name == "status" and isinstance(value, int):
                out["status_name"] = status_name(int(value))
        else:
            out[name] = _json_safe(value)
    if ev[0] == "td_exit" and isinstance(out.get("reason"), int):
        out["reason_name"] = EXIT_REASON_NAMES.get(out["reason"], f"reason {out['reason']}")
    if ev[0] == "fault" and isinstance(out.get("result"), int):
        out["result_name"] = "RET_PF_" + _RET_PF.get(out["result"], str(out["result"]))
    return out


def format_event(kinds: Mapping[str, Tuple[Tuple[str, ...], Optional[str]]], index: int, ev: Event) -> str:
    """One line for a terminal: ``index kind actor field=value ...`` (same values as :func:`event_args`)."""
    parts = [f"{index:>8}", ev[0], ev[1]]
    for k, v in event_args(kinds, ev).items():
        if isinstance(v, list):
            v = "(" + ",".join(str(x) for x in v) + ")"
        parts.append(f"{k}={v}")
    return " ".join(parts)


# ---------------------------------------------------------------------------- JSON Lines
def write_events(host_or_log: LogLike, path: Union[str, "os.PathLike[str]"]) -> int:
    """Write the event log to ``path`` as JSON Lines (schema line first); return the event count.

    Parameters
    ----------
    host_or_log : EventLog or Host
        The log, or an object whose ``events`` is one.
    path : str or path-like
        Output file (overwritten).
    """
    log = _log_of(host_or_log)
    log.to_jsonl(path)
    return len(log)


# ---------------------------------------------------------------------------- trace
def _instant_name(kinds: Mapping[str, Any], ev: Event, args: Dict[str, Any]) -> Tuple[str, str]:
    """``(name, category)`` of an event drawn as an instant."""
    k = ev[0]
    if k == "td_exit":
        return f"exit {args.get('reason_name', '?')}", "exit"
    if k == "memory_fault_exit":
        return "KVM_EXIT_MEMORY_FAULT", "exit"
    if k == "tdvmcall":
        return f"TDVMCALL {args.get('r11', '?')}", "exit"
    if k == "lock_conflict":
        res = ev[2][0] if isinstance(ev[2], tuple) and ev[2] else ev[2]
        return f"conflict {res}", "conflict"
    if k == "fault":
        return f"fault {args.get('result_name', '?')}", "fault"
    if k == "ioctl":
        return f"ioctl {ev[2]}", "ioctl"
    if k == "inject":
        return f"inject {args.get('leaf', '?')}", "inject"
    return k, "bug" if k in _GLOBAL_KINDS else "event"


class _Slice:
    __slots__ = ("start", "end", "name", "cat", "args")

    def __init__(self, start: int, name: str, cat: str, args: Dict[str, Any]) -> None:
        self.start, self.end, self.name, self.cat, self.args = start, -1, name, cat, args


def _lanes(slices: List[_Slice]) -> List[List[_Slice]]:
    """Split one actor's slices into lanes in which every pair nests or is disjoint."""
    lanes: List[Tuple[List[_Slice], List[int]]] = []       # (slices, stack of open ends)
    for s in sorted(slices, key=lambda s: (s.start, -s.end)):
        for members, stack in lanes:
            while stack and stack[-1] <= s.start:
                stack.pop()
            if not stack or s.end <= stack[-1]:
                members.append(s)
                stack.append(s.end)
                break
        else:
            lanes.append(([s], [s.end]))
    return [m for m, _ in lanes]


def chrome_trace(log: LogLike) -> Dict[str, Any]:
    """Return the Chrome/Perfetto trace-event JSON object of ``log`` (see the module docstring).

    Returns
    -------
    dict
        ``{"traceEvents": [...], "displayTimeUnit": "ns", "otherData": {"schema":
        "tdxcore.trace/1", "nr_events": N, "events_digest": "0x…", "time": ...}}``.
    """
    log = _log_of(log)
    kinds = log.kinds
    actors: Dict[str, int] = {}                    # actor -> first index (track order)
    slices: Dict[str, List[_Slice]] = {}
    instants: List[Tuple[str, int, Dict[str, Any]]] = []   # (actor, index, event json)
    open_calls: Dict[Tuple[str, str, Any], List[_Slice]] = {}
    open_guest: Dict[str, _Slice] = {}
    n = len(log)

    def close(s: _Slice, at: int, extra: Dict[str, Any]) -> None:
        s.end = at
        s.args.update(extra)

    for i, ev in enumerate(log):
        kind, actor = ev[0], ev[1]
        if actor not in actors:
            actors[actor] = i
        spec = kinds.get(kind)
        if kind in ("seamcall_begin", "tdcall_begin"):
            space = "seamcall" if kind == "seamcall_begin" else "tdcall"
            args = event_args(kinds, ev)
            args["begin_index"] = i
            s = _Slice(i, leaf_name(ev[2], space), space, args)
            slices.setdefault(actor, []).append(s)
            open_calls.setdefault((actor, space, ev[2]), []).append(s)
            continue
        if kind in ("seamcall_end", "tdcall_end", "seamcall_abort", "tdcall_abort"):
            space = "seamcall" if kind.startswith("seamcall") else "tdcall"
            pending = open_calls.get((actor, space, ev[2]))
            end_args = {f"end_{k}": v for k, v in event_args(kinds, ev).items() if k not in ("leaf", "cpu")}
            end_args["end_index"] = i
            if kind.endswith("_abort"):
                end_args["aborted"] = True
            if pending:
                close(pending.pop(0), i, end_args)
            else:
                instants.append((actor, i, {"name": f"unmatched {kind}", "cat": space, "args": end_args}))
            if space == "seamcall" and ev[2] == Leaf.TDH_VP_ENTER and actor in open_guest:
                close(open_guest.pop(actor), i, {"closed_by": kind})
            continue
        if kind == "td_enter":
            g = _Slice(i, "guest", "guest", event_args(kinds, ev))
            slices.setdefault(actor, []).append(g)
            prev = open_guest.pop(actor, None)
            if prev is not None:
                close(prev, i, {"closed_by": "td_enter"})
            open_guest[actor] = g
            continue
        args = event_args(kinds, ev) if spec is not None else {"fields": _json_safe(list(ev[2:]))}
        if kind == "td_exit" and actor in open_guest:
            close(open_guest.pop(actor), i, {"exit_reason": args.get("reason_name"), "exit_index": i})
        name, cat = _instant_name(kinds, ev, args)
        args["index"] = i
        instants.append((actor, i, {"name": name, "cat": cat, "args": args,
                                    "s": "g" if kind in _GLOBAL_KINDS else "t"}))

    for s_list in open_calls.values():
        for s in s_list:
            close(s, n, {"unterminated": True})
    for g in open_guest.values():
        close(g, n, {"unterminated": True})

    # Processes: one per VM for its vCPUs (and the VM's own actor), one for everything else.
    procs: Dict[str, int] = {"host": 1}
    tracks: Dict[str, Tuple[int, List[int]]] = {}
    out: List[Dict[str, Any]] = []
    next_tid = 1
    for actor in sorted(actors, key=lambda a: (actors[a], a)):
        m = _VCPU_ACTOR.match(actor)
        pname = m.group(1) if m else "host"
        if pname not in procs:
            procs[pname] = len(procs) + 1
        pid = procs[pname]
        lanes = _lanes(slices.get(actor, [])) or [[]]
        tids = []
        for k, lane in enumerate(lanes):
            tid = next_tid
            next_tid += 1
            tids.append(tid)
            tname = actor if k == 0 else f"{actor} #{k + 1}"
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "ts": 0,
                        "args": {"name": tname}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "ts": 0,
                        "args": {"sort_index": tid}})
            for s in lane:
                out.append({"ph": "X", "name": s.name, "cat": s.cat, "pid": pid, "tid": tid, "ts": s.start,
                            "dur": s.end - s.start, "args": s.args})
        tracks[actor] = (pid, tids)
    for pname, pid in procs.items():
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "ts": 0,
                    "args": {"name": pname}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "ts": 0,
                    "args": {"sort_index": pid}})
    for actor, i, body in instants:
        pid, tids = tracks[actor]
        body.setdefault("s", "t")
        out.append({"ph": "i", "pid": pid, "tid": tids[0], "ts": i, **body})
    # Stable order: metadata first, then by time; within a time, slices before instants.
    out.sort(key=lambda e: (e["ph"] != "M", e["ts"], e["ph"] != "X", -e.get("dur", 0), e["tid"]))
    return {
        "traceEvents": out,
        "displayTimeUnit": "ns",
        "otherData": {
            "schema": TRACE_SCHEMA,
            "nr_events": n,
            "events_digest": f"{log.digest():#018x}",
            "time": "event index (1 trace us = 1 event)",
            "actors": len(actors),
        },
    }


def write_trace(host_or_log: LogLike, path: Union[str, "os.PathLike[str]"]) -> int:
    """Write :func:`chrome_trace` of the log to ``path``; return the number of trace events.

    Open the file in ``ui.perfetto.dev`` ("Open trace file") or ``chrome://tracing`` ("Load").
    """
    obj = chrome_trace(_log_of(host_or_log))
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, separators=(",", ":"))
        fh.write("\n")
    return len(obj["traceEvents"])

