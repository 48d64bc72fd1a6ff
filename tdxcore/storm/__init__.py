"""Seeded storms and scenario scheduling (tools layer; SPEC §3.5, §5, §8).

:class:`Scheduler` forces or draws the interleaving of actors (generators yielding
``sched.PREEMPT``/``Wait``/``WaitOutOfGuest``); :func:`run_storm` runs the default fault storm
of SPEC §8 (:class:`StormConfig`) and returns a :class:`StormReport`; :func:`replay` re-runs a
report and checks its event-log hash.
"""

from __future__ import annotations

from tdxcore.storm.config import MIXES, ROLES, StormConfig, parse_inject
from tdxcore.storm.scheduler import Scheduler, stream_seed
from tdxcore.storm.storm import ReplayMismatch, StormReport, replay, run_storm

__all__ = ["Scheduler", "stream_seed", "StormConfig", "StormReport", "run_storm", "replay", "ReplayMismatch",
           "MIXES", "ROLES", "parse_inject"]
