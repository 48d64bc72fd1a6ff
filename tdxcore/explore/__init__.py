"""Exhaustive interleaving exploration of small scenarios (tools layer; SPEC §5, issue 11).

:func:`explore` runs a stateless depth-first search over the scheduler's choices for a catalogue
:class:`Scenario` (:data:`SCENARIOS`) under a policy or a deliberately broken variant
(:data:`VARIANTS`), with state caching, sleep-set partial-order reduction, ``max_steps`` and a
CHESS preemption bound, and reports the shortest violating schedule, which
:func:`~tdxcore.explore.report.write_counterexample` writes as a report ``tdxcore replay`` runs.
"""

from __future__ import annotations

from tdxcore.explore.engine import LIVELOCK_STEPS, Execution, ExploreConfig, ExploreResult, explore
from tdxcore.explore.report import (
    EXPLORE_SCHEMA,
    counterexample_dict,
    replay_counterexample,
    write_counterexample,
)
from tdxcore.explore.scenarios import SCENARIOS, Scenario, World, get_scenario
from tdxcore.explore.variants import VARIANTS, Variant, get_variant

__all__ = ["explore", "ExploreConfig", "ExploreResult", "Execution", "LIVELOCK_STEPS", "SCENARIOS",
           "Scenario", "World", "get_scenario", "VARIANTS", "Variant", "get_variant", "EXPLORE_SCHEMA",
           "counterexample_dict", "replay_counterexample", "write_counterexample"]
