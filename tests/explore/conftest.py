"""Shared results for the explorer tests: each (scenario, policy, reduce) is explored once per session."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import pytest

from tdxcore.explore import ExploreConfig, ExploreResult, explore

_CACHE: Dict[Tuple[str, str, Optional[int], bool], ExploreResult] = {}


def run(scenario: str, policy: str = "LINUX_6_18", max_steps: Optional[int] = None,
        reduce: bool = True) -> ExploreResult:
    """Explore once per session and remember the result."""
    k = (scenario, policy, max_steps, reduce)
    if k not in _CACHE:
        _CACHE[k] = explore(ExploreConfig(scenario, policy, max_steps=max_steps, reduce=reduce))
    return _CACHE[k]


@pytest.fixture
def explored():
    """The session-cached :func:`run`."""
    return run
