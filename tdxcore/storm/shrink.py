"""``shrink``: minimise a failing storm to a short replayable report (issue 8 item 5).

A storm is a deterministic function of its :class:`~tdxcore.storm.config.StormConfig` (seed
included), so a failing run is shrunk by shrinking its *config*, never by editing a schedule:

1. **steps** — the violation was found at scheduler step ``s`` (``violation["step"]``); rerun
   with invariants after every step and ``steps = s`` to find the first step it is visible, then
   binary-search the smallest ``steps`` that still ends on the same invariant id (a shorter storm
   is the same schedule prefix followed by the drain, which may expose it sooner);
2. **mix** — try the smaller host mixes (``all`` → ``convert``, ``punch``, ``slots`` →
   ``none``), keeping the first that still fails with the same invariant once its steps are
   shrunk, if that run is no longer (in events up to the violation) than the best so far;
3. **vCPUs** — try fewer vCPU actors (1, 2, half, one less), the same way, until none helps.

A try with a smaller mix or fewer vCPUs is a different schedule from the first step (the
scheduler draws among other actors), so it is first run for the report's own ``steps`` and
``check_every`` and then shrunk as in 1.

The result is the ``tdxcore.report/1`` object of the smallest run (``replay`` re-runs it to the
same event-log hash) plus a ``shrink`` object recording where it started and what it cost.
Each try is one full storm; ``max_runs`` bounds them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from tdxcore.errors import TdxError, TdxTypeError, TdxValueError, check_int
from tdxcore.storm.campaign import storm_command
from tdxcore.storm.config import MIXES, StormConfig
from tdxcore.storm.report import report_dict
from tdxcore.storm.storm import StormReport, run_storm

__all__ = ["shrink", "ShrinkError", "SMALLER_MIXES"]

#: Mixes to try instead of each mix, smallest host activity last (``none`` has no host actor).
SMALLER_MIXES: Dict[str, Tuple[str, ...]] = {
    "all": ("convert", "punch", "slots", "none"),
    "convert": ("none",), "punch": ("none",), "slots": ("none",), "none": (),
}
assert set(SMALLER_MIXES) == set(MIXES)


class ShrinkError(TdxValueError):
    """The report's violation does not reproduce (or the run budget ran out before it did)."""


class _Budget(Exception):
    """``max_runs`` storms were run."""


class _Shrinker:
    def __init__(self, invariant: str, max_runs: int, log: Optional[Callable[[str], None]]) -> None:
        self.invariant = invariant
        self.max_runs = max_runs
        self.runs = 0
        self.log = log
        #: The last failing run :meth:`steps` found (kept when the budget runs out mid-search).
        self.current: Optional[Tuple[StormConfig, StormReport]] = None

    def run(self, cfg: StormConfig) -> Optional[StormReport]:
        """Run ``cfg``; return its report if it fails with the target invariant, else None."""
        if self.runs >= self.max_runs:
            raise _Budget
        self.runs += 1
        try:
            rep = run_storm(cfg)
        except (TdxError, AssertionError) as e:
            # a smaller config may break an actor's assumption: that candidate just does not count
            self._say(cfg, f"raised {type(e).__name__}")
            return None
        v = rep.violation
        hit = v is not None and v["invariant"] == self.invariant
        self._say(cfg, f"{v['invariant']} at step {v['step']}" if v else "clean")
        return rep if hit else None

    def _say(self, cfg: StormConfig, what: str) -> None:
        if self.log is not None:
            self.log(f"shrink run {self.runs}: steps {cfg.steps} mix {cfg.mix} vcpus {cfg.vcpus} "
                     f"check_every {cfg.check_every}: {what}")

    def steps(self, cfg: StormConfig, rep: StormReport) -> Tuple[StormConfig, StormReport]:
        """Smallest ``steps`` (invariants every step) failing like ``rep`` (a failing run of ``cfg``)."""
        s = min(cfg.steps, int(rep.violation["step"]))   # type: ignore[index]
        if cfg.check_every != 1 or s != cfg.steps:
            fine = dataclasses.replace(cfg, steps=s, check_every=1)
            again = self.run(fine)
            if again is not None:
                cfg, rep = fine, again
                s = min(s, int(again.violation["step"]))  # type: ignore[index]
                if s != cfg.steps:
                    cfg = dataclasses.replace(cfg, steps=s)
                    again = self.run(cfg)
                    if again is None:                       # cannot happen (same prefix): be safe
                        return fine, rep
                    rep = again
        lo, hi = -1, cfg.steps                               # hi fails, lo is "not known to fail"
        best = self.current = (cfg, rep)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = dataclasses.replace(cfg, steps=mid)
            r = self.run(c)
            if r is not None:
                hi, best = mid, (c, r)
                self.current = best
            else:
                lo = mid
        return best


def _size(rep: StormReport) -> int:
    """Events up to and including the violation: what a reader of the shrunk run must go through."""
    v = rep.violation or {}
    idx = v.get("event_index")
    return int(idx) + 1 if isinstance(idx, int) else rep.nr_events


def shrink(report: Dict[str, Any], *, max_runs: int = 200, log: Optional[Callable[[str], None]] = None,
           report_name: str = "report.min.json") -> Dict[str, Any]:
    """Minimise the failing storm of a ``report.json`` object; return the small report's object.

    Parameters
    ----------
    report : dict
        A ``tdxcore.report/1`` object whose ``violation`` is set (``config`` and
        ``violation.invariant`` are what is used).
    max_runs : int
        Bound on the storms run (each try is one storm). The best config found so far is
        returned when it runs out.
    log : callable, optional
        Called with one line per storm run.
    report_name : str
        File name the result will be written to (for its ``violation.replay`` command).

    Returns
    -------
    dict
        The ``tdxcore.report/1`` object of the smallest failing run, with ``violation.replay``
        naming ``report_name`` and an added ``shrink`` object: ``from`` (steps, mix, vcpus,
        check_every, events_digest of the input), ``runs``, ``seconds``, ``storm`` (the
        ``tdxcore storm`` line that rewrites it).

    Raises
    ------
    TdxTypeError, TdxValueError
        Not a report object, or no violation in it.
    ShrinkError
        Rerunning the report's config does not fail with the same invariant (was the model
        fixed, or the report edited?).
    """
    if not isinstance(report, dict) or not isinstance(report.get("config"), dict):
        msg = "report must be a report.json object with a config"
        raise TdxTypeError(msg, name="report", value=type(report).__name__)
    viol = report.get("violation")
    if not isinstance(viol, dict) or not isinstance(viol.get("invariant"), str):
        msg = "the report records no violation: nothing to shrink"
        raise TdxValueError(msg, name="report", value=viol)
    check_int("max_runs", max_runs, 1, 1 << 20)
    cfg0 = StormConfig.from_dict(report["config"])
    if cfg0.seconds is not None:
        cfg0 = dataclasses.replace(cfg0, seconds=None, steps=max(cfg0.steps, int(report.get("steps", 0))))
    t0 = time.perf_counter()
    sh = _Shrinker(viol["invariant"], max_runs, log)
    rep0 = sh.run(cfg0)
    if rep0 is None:
        msg = (f"the report's storm (seed {cfg0.seed}) no longer fails with {viol['invariant']}: "
               "nothing to shrink")
        raise ShrinkError(msg, name="report", value=viol["invariant"])
    best = (cfg0, rep0)

    def smaller(c: StormConfig) -> bool:
        # a try with fewer actors counts only if its shrunk run is no longer to read (events up
        # to the violation) than the best so far: 5 vCPUs for 38 steps is not simpler than 8 for 9
        nonlocal best
        r = sh.run(dataclasses.replace(c, steps=cfg0.steps, check_every=cfg0.check_every))
        if r is None:
            return False
        cand = sh.steps(dataclasses.replace(c, steps=cfg0.steps, check_every=cfg0.check_every), r)
        if _size(cand[1]) > _size(best[1]):
            return False
        best = cand
        return True

    try:
        best = sh.steps(cfg0, rep0)
        for mix in SMALLER_MIXES[best[0].mix]:
            if smaller(dataclasses.replace(best[0], mix=mix)):
                break
        tried: List[int] = []
        while True:
            v = best[0].vcpus
            cands = sorted({n for n in (1, 2, v // 2, v - 1) if 1 <= n < v and n not in tried})
            tried += cands
            if not any(smaller(dataclasses.replace(best[0], vcpus=n)) for n in cands):
                break
    except _Budget:
        if sh.current is not None and _size(sh.current[1]) <= _size(best[1]):
            best = sh.current
        if log is not None:
            log(f"shrink: max_runs={max_runs} storms run; keeping the smallest failing config so far")
    cfg, rep = best
    obj = report_dict(rep)
    obj["violation"] = dict(obj["violation"], replay=f"tdxcore replay {report_name}")
    obj["shrink"] = {"from": {"steps": cfg0.steps, "mix": cfg0.mix, "vcpus": cfg0.vcpus,
                              "check_every": cfg0.check_every, "events_digest": report.get("events_digest")},
                     "runs": sh.runs, "seconds": round(time.perf_counter() - t0, 3),
                     "storm": storm_command(cfg, report_name)}
    return obj
