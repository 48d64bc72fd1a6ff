"""``only``: the assertion the mutation tests share — one invariant, and only it, is reported."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from tdxcore.errors import InvariantViolation
from tdxcore.invariants import check_invariants, invariant_ids


def only(host: Any, inv: str, *, gfn: Optional[int] = None, pfn: Optional[int] = None) -> InvariantViolation:
    """``inv`` and only it is reported (sticky), with an event index and a replay hint."""
    with pytest.raises(InvariantViolation) as ei:
        check_invariants(host)
    e = ei.value
    assert e.invariant == inv, str(e)
    if gfn is not None:
        assert e.gfn == gfn, str(e)
    if pfn is not None:
        assert e.pfn == pfn, str(e)
    assert e.event_index is not None and 0 <= e.event_index < len(host.events), str(e)
    assert e.replay and f"seed={host.seed}" in e.replay
    check_invariants(host, [i for i in invariant_ids() if i != inv])
    with pytest.raises(InvariantViolation):
        check_invariants(host, [inv])
    return e
