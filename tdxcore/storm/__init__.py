"""Seeded storms and scenario scheduling (tools layer; SPEC §3.5, §5, §8).

So far: :class:`Scheduler`, the deterministic seeded scheduler that forces or draws the
interleaving of actors (generators yielding ``sched.PREEMPT``/``Wait``/``WaitOutOfGuest``).
``StormConfig``/``run_storm``/``replay`` come with the storm issue.
"""

from __future__ import annotations

from tdxcore.storm.scheduler import Scheduler, stream_seed

__all__ = ["Scheduler", "stream_seed"]
