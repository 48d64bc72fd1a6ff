"""A storm's report: ``report.json`` (schema ``tdxcore.report/1``), BUSY by cause, the summary table.

BUSY results are classified from the event log, edge by edge: the event an actor logged just
before its BUSY end edge says why — ``inject`` (an armed injection), ``lock_conflict`` on the S-EPT
tree held by a vCPU (zero-step: VP.ENTER holds it only then), ``lock_conflict`` answered
``OPERAND_BUSY_HOST_PRIORITY`` (the entry's host-priority bit), any other ``lock_conflict``
(a real conflict between in-flight operations).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any, Dict, Optional

from tdxcore.constants import EXIT_REASON_EPT_VIOLATION, EXIT_REASON_EXTERNAL_INTERRUPT, EXIT_REASON_TDCALL
from tdxcore.status import (  # type: ignore[attr-defined]
    TDX_OPERAND_BUSY,
    TDX_OPERAND_BUSY_HOST_PRIORITY,
    TDX_PREVIOUS_TLB_EPOCH_BUSY,
    Leaf,
    TdcallLeaf,
    TdxStatus,
)

__all__ = ["busy_by_cause", "report_dict", "write_report", "summary_rows", "REPORT_SCHEMA"]

REPORT_SCHEMA = "tdxcore.report/1"
_BUSY = (TDX_OPERAND_BUSY, TDX_OPERAND_BUSY_HOST_PRIORITY, TDX_PREVIOUS_TLB_EPOCH_BUSY)
_EXIT_NAMES = {EXIT_REASON_EPT_VIOLATION: "EPT_VIOLATION", EXIT_REASON_TDCALL: "TDCALL",
               EXIT_REASON_EXTERNAL_INTERRUPT: "EXTERNAL_INTERRUPT"}


def _leaf_name(kind: str, leaf: int) -> str:
    try:
        return (TdcallLeaf(leaf) if kind == "tdcall_end" else Leaf(leaf)).name
    except ValueError:
        return str(leaf)


def busy_by_cause(events: Any) -> Dict[str, Dict[str, int]]:
    """``{cause: {"LEAF|STATUS": n}}`` for every BUSY-class result in the log.

    Causes: ``injected``, ``zero_step``, ``host_priority``, ``conflict``, ``other`` (no edge says).
    """
    last: Dict[str, Any] = {}
    out: Dict[str, Dict[str, int]] = {}
    for ev in events:
        kind, actor = ev[0], ev[1]
        if kind in ("seamcall_end", "tdcall_end"):
            status = ev[4]
            base = status & 0xFFFFFFFF00000000
            if base in _BUSY:
                prev = last.get(actor)
                if prev is not None and prev[0] == "inject":
                    cause = "injected"
                elif prev is not None and prev[0] == "lock_conflict":
                    res, holder = prev[2][0] if isinstance(prev[2], tuple) else prev[2], prev[4]
                    if base == TDX_OPERAND_BUSY_HOST_PRIORITY:
                        cause = "host_priority"
                    elif res == "sept_tree" and isinstance(holder, str) and ".vcpu" in holder:
                        cause = "zero_step"
                    else:
                        cause = "conflict"
                else:
                    cause = "other"
                key = f"{_leaf_name(kind, ev[2])}|{TdxStatus(status).name}"
                d = out.setdefault(cause, {})
                d[key] = d.get(key, 0) + 1
        last[actor] = ev
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def _exits(events: Any, vm_counters: Dict[str, int]) -> Dict[str, Dict[str, int]]:
    td: Dict[str, int] = {}
    for ev in events.filter(kind="td_exit"):
        reason = ev[1][6]
        name = _EXIT_NAMES.get(reason, str(reason))
        td[name] = td.get(name, 0) + 1
    kvm = {k[3:]: v for k, v in vm_counters.items()
           if k in ("nr_memory_fault_exits", "nr_mmio_exits", "nr_signal_exits", "nr_kick_exits")}
    return {"td_exit": dict(sorted(td.items())), "kvm": dict(sorted(kvm.items()))}


def report_dict(rep: Any, *, events_file: Optional[str] = None,
                trace_file: Optional[str] = None) -> Dict[str, Any]:
    """Build the ``tdxcore.report/1`` object of a :class:`~tdxcore.storm.storm.StormReport`."""
    import tdxcore

    host = rep.host
    cfg = rep.config
    counters = dict(rep.counters)
    for k, v in rep.vm_counters.items():
        counters[f"kvm.{k}"] = v
    return {
        "schema": REPORT_SCHEMA,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "policy": cfg.policy,
        "steps": rep.steps,
        "replayable": rep.replayable,
        "drain_steps": rep.drain_steps,
        "seconds": round(rep.seconds, 6),
        "hash": f"{rep.events_digest:#x}",
        "events_digest": f"{rep.events_digest:#x}",
        "state_hash": f"{rep.state_hash:#x}",
        "nr_events": len(host.events),
        "counters": counters,
        "seamcalls": rep.seamcalls,
        "exits": _exits(host.events, rep.vm_counters),
        "busy": busy_by_cause(host.events),
        "mixes": rep.mixes,
        "leaks": rep.leaks,
        "vm_bugged": rep.vm_bugged,
        "vm_dead": rep.vm_dead,
        "invariants_checked": rep.invariants_checked,
        "violation": rep.violation,
        "versions": {"tdxcore": tdxcore.__version__, "python": platform.python_version(),
                     "platform": sys.platform},
        "events_file": events_file,
        "trace_file": trace_file,
    }


def write_report(rep: Any, path: str, **files: Optional[str]) -> Dict[str, Any]:
    """Write ``report.json`` (paths of the other files relative to its directory) and return it."""
    base = os.path.dirname(os.path.abspath(path))
    rel = {k: (None if v is None else os.path.relpath(os.path.abspath(v), base)) for k, v in files.items()}
    obj = report_dict(rep, **rel)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")
    return obj


def summary_rows(obj: Dict[str, Any]) -> list:
    """Return the ``(what, figure)`` rows of the summary table (SPEC §8) from a report object."""
    secs = max(obj["seconds"], 1e-9)
    total = obj["steps"] + obj.get("drain_steps", 0)
    nsc = obj["counters"].get("nr_seamcalls_total", 0)
    rows = [("steps (storm + drain)", f"{obj['steps']:,} + {obj.get('drain_steps', 0):,}"),
            ("steps/s", f"{total / secs:,.0f}"),
            ("SEAMCALLs (/s)", f"{nsc:,} ({nsc / secs:,.0f}/s)")]
    for k, v in obj["exits"]["td_exit"].items():
        rows.append((f"TD exits: {k}", f"{v:,}"))
    for k, v in obj["exits"]["kvm"].items():
        rows.append((f"KVM exits: {k}", f"{v:,}"))
    top = sorted(obj["seamcalls"].items(), key=lambda kv: -kv[1])[:8]
    rows.append(("SEAMCALLs by leaf (top 8)", ", ".join(f"{k} {v:,}" for k, v in top)))
    for cause, d in obj["busy"].items():
        rows.append((f"BUSY ({cause})", ", ".join(f"{k} {v}" for k, v in d.items())))
    c = obj["counters"]
    rows.append(("zero-step entries", f"{c.get('nr_zero_step_entries', 0):,}"))
    for k in ("kvm.nr_local_retries", "kvm.nr_fault_retries", "kvm.nr_zap_busy_retries",
              "kvm.nr_sept_busy_retries", "kvm.nr_track_busy_retries", "kvm.nr_kicks"):
        if k in c:
            rows.append((k[7:], f"{c[k]:,}"))
    rows.append(("mixes", ", ".join(f"{k} {v}" for k, v in obj["mixes"].items()) or "-"))
    rows.append(("leaks", str(len(obj["leaks"]))))
    rows.append(("VM bugged / dead", f"{obj['vm_bugged']} / {bool(obj['vm_dead'])}"))
    rows.append(("invariant checks", f"{obj['invariants_checked']:,}"))
    v = obj["violation"]
    rows.append(("violation", "none" if v is None else f"{v['invariant']} at event {v['event_index']}"))
    rows.append(("event-log hash", obj["hash"]))
    return rows
