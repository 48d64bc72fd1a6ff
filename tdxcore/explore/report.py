"""A counterexample as a file ``tdxcore replay`` runs, and its Perfetto trace (issue 11 item 2).

The report (schema ``tdxcore.explore/1``) names the scenario, the policy or broken variant, the
bounds, the explorer's figures, the violation and the **schedule** (actor names, one per step).
:func:`replay_counterexample` re-builds the scenario, forces the schedule step by step with the
checks of the search, and verifies that the same violation comes back at the last step with the
same event-log digest (:class:`~tdxcore.storm.storm.ReplayMismatch` otherwise). It returns a
:class:`~tdxcore.storm.storm.StormReport` so ``tdxcore replay`` prints and exits as for a storm
(``storm.replay`` hands a report of this schema here; its ``config`` is a placeholder
:class:`~tdxcore.storm.config.StormConfig` with ``steps`` = the schedule's length).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

from tdxcore.errors import TdxValueError
from tdxcore.explore.engine import Execution, ExploreResult
from tdxcore.explore.scenarios import get_scenario
from tdxcore.explore.variants import get_variant

__all__ = ["EXPLORE_SCHEMA", "counterexample_dict", "write_counterexample", "replay_counterexample",
           "run_schedule", "validate_counterexample"]

EXPLORE_SCHEMA = "tdxcore.explore/1"


def run_schedule(scenario: str, policy: str,
                 schedule: Any) -> Tuple[Execution, Optional[Dict[str, Any]], int]:
    """Force ``schedule`` on a fresh build; return the execution, the first violation and its step.

    The checks are the search's (after each step: the step's exception, invariants, the
    scenario property, livelock, deadlock; once all actors are done: the final check). The
    execution is left open (its host holds the event log); close it when done.
    """
    if not isinstance(schedule, (list, tuple)) or not all(isinstance(n, str) for n in schedule):
        msg = f"schedule={schedule!r} must be a list of actor names"
        raise TdxValueError(msg, name="schedule", value=schedule)
    ex = Execution(get_scenario(scenario), get_variant(policy))
    for i, name in enumerate(schedule):
        if name not in ex.enabled():
            ex.close()
            msg = f"schedule[{i}]={name!r} is not runnable at its turn (runnable: {ex.enabled()})"
            raise TdxValueError(msg, name="schedule", value=name)
        v = ex.step(name) or ex.check()
        if v is None and ex.all_done:
            v = ex.final()
        if v is not None:
            return ex, v, i + 1
    return ex, None, len(schedule)


_KEYS: Dict[str, type] = {
    "schema": str, "scenario": str, "race": str, "policy": str, "max_steps": int, "reduce": bool,
    "stats": dict, "violation": dict, "schedule": list, "steps": int, "events_digest": str,
    "nr_events": int, "reproduced": bool, "replay": str}


def validate_counterexample(obj: Any) -> None:
    """Check a ``tdxcore.explore/1`` object; ``ValueError`` naming the bad key (``cx.steps: ...``).

    Required keys and types: ``schema`` (the constant), ``scenario``, ``race``, ``policy``,
    ``replay``, ``events_digest`` (``0x`` hex) strings; ``max_steps``, ``steps``, ``nr_events``
    integers ≥ 0; ``reduce``, ``reproduced`` booleans; ``stats`` object; ``violation`` object
    with ``kind``, ``id``, ``message`` strings and ``depth`` = ``steps``; ``schedule`` a list of
    ``steps`` actor names; ``preemption_bound`` integer or null; ``trace_file`` string or null.
    """
    if not isinstance(obj, dict):
        msg = f"cx: {type(obj).__name__} is not an object"
        raise ValueError(msg)
    for k, t in _KEYS.items():
        if k not in obj:
            msg = f"cx.{k}: missing"
            raise ValueError(msg)
        v = obj[k]
        if not isinstance(v, t) or (isinstance(v, int) and t is int and (isinstance(v, bool) or v < 0)):
            msg = f"cx.{k}: {v!r} is not a {t.__name__}" + (" >= 0" if t is int else "")
            raise ValueError(msg)
    if obj["schema"] != EXPLORE_SCHEMA:
        msg = f"cx.schema: {obj['schema']!r} is not {EXPLORE_SCHEMA!r}"
        raise ValueError(msg)
    for k in ("preemption_bound", "trace_file"):
        v = obj.get(k)
        if v is not None and not isinstance(v, int if k == "preemption_bound" else str):
            msg = f"cx.{k}: {v!r} has the wrong type"
            raise ValueError(msg)
    if not str(obj["events_digest"]).startswith("0x"):
        msg = f"cx.events_digest: {obj['events_digest']!r} is not 0x-hex"
        raise ValueError(msg)
    viol = obj["violation"]
    for k in ("kind", "id", "message"):
        if not isinstance(viol.get(k), str):
            msg = f"cx.violation.{k}: {viol.get(k)!r} is not a string"
            raise ValueError(msg)
    if viol.get("depth") != obj["steps"] or len(obj["schedule"]) != obj["steps"]:
        msg = (f"cx.schedule: {len(obj['schedule'])} steps, violation depth {viol.get('depth')}, "
               f"steps {obj['steps']}")
        raise ValueError(msg)
    if not all(isinstance(n, str) for n in obj["schedule"]):
        msg = "cx.schedule: every entry must be an actor name"
        raise ValueError(msg)


def counterexample_dict(result: ExploreResult, *, trace_file: Optional[str] = None) -> Dict[str, Any]:
    """Build the report of ``result``'s violation (replaying it once for the event digest)."""
    v = result.violation
    if v is None:
        msg = f"{result.scenario} under {result.policy} has no violation to report"
        raise TdxValueError(msg, name="result", value=result.verdict)
    ex, again, _ = run_schedule(result.scenario, result.policy, v["schedule"])
    try:
        host = ex.world.host
        obj: Dict[str, Any] = {
            "schema": EXPLORE_SCHEMA,
            "scenario": result.scenario,
            "race": get_scenario(result.scenario).race,
            "policy": result.policy,
            "max_steps": result.max_steps,
            "preemption_bound": result.preemption_bound,
            "reduce": result.reduce,
            "stats": {k: val for k, val in result.to_dict().items() if k != "violation"},
            "violation": {k: val for k, val in v.items() if k != "schedule"},
            "schedule": list(v["schedule"]),
            "steps": len(v["schedule"]),
            "events_digest": f"{host.events.digest():#x}",
            "nr_events": len(host.events),
            "reproduced": again is not None and again["kind"] == v["kind"],
            "trace_file": trace_file,
            "replay": "tdxcore replay REPORT",
        }
        if trace_file is not None:
            from tdxcore.trace import write_trace

            write_trace(host, trace_file)
    finally:
        ex.close()
    return obj


def write_counterexample(result: ExploreResult, path: str, *, trace: Optional[str] = None) -> Dict[str, Any]:
    """Write the counterexample report to ``path`` (and the Perfetto trace to ``trace``); return it."""
    obj = counterexample_dict(result, trace_file=trace)
    if trace is not None:
        base = os.path.dirname(os.path.abspath(path))
        obj["trace_file"] = os.path.relpath(os.path.abspath(trace), base)
    obj["replay"] = f"tdxcore replay {os.path.basename(path)}"
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")
    return obj


def replay_counterexample(report: Dict[str, Any]) -> Any:
    """Re-run a ``tdxcore.explore/1`` report; return a StormReport (``ReplayMismatch`` if it diverges)."""
    from tdxcore.storm.config import StormConfig
    from tdxcore.storm.storm import ReplayMismatch, StormReport

    if not isinstance(report, dict) or report.get("schema") != EXPLORE_SCHEMA:
        msg = f"report must be a {EXPLORE_SCHEMA} object"
        raise TdxValueError(msg, name="report", value=type(report).__name__)
    try:
        validate_counterexample(report)
    except ValueError as e:
        raise TdxValueError(str(e), name="report", value=EXPLORE_SCHEMA) from None
    schedule = report["schedule"]
    ex, v, steps = run_schedule(report["scenario"], report["policy"], schedule)
    try:
        host = ex.world.host
        digest = host.events.digest()
        want = int(str(report["events_digest"]), 0)
        if digest != want:
            msg = f"replay diverged: event digest {digest:#018x} != {want:#018x}"
            raise ReplayMismatch(msg, name="report", value=want)
        if v is None or v["kind"] != report["violation"]["kind"] or steps != len(schedule):
            msg = (f"replay did not reproduce the {report['violation']['kind']} violation at step "
                   f"{len(schedule)} (got {v and v['kind']} at step {steps})")
            raise ReplayMismatch(msg, name="report", value=report["violation"]["kind"])
        rep = StormReport(StormConfig(steps=len(schedule), mix="none", busy=0.0), steps=steps,
                          events_digest=digest, schedule=list(schedule), host=host,
                          violation=dict(v, step=steps, event_index=len(host.events) - 1,
                                         invariant=v["id"], replay="tdxcore replay REPORT"))
        rep.state_hash = host.state_hash()
    finally:
        ex.close()
    return rep
