"""Differential state machine: tdxcore._invalidate against its twin (SPEC §4.7, STYLE §2.8).

Every rule runs the same call on the core and the reference twin and compares the outcome (value,
or exception type and message); the invariant compares the full state and ``state_hash()``.
Misuse (unbalanced end, range_add outside an invalidation, bad ranges) is generated on purpose.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import numpy as np
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tdxcore import _invalidate
from tdxcore._invalidate import InvalidateTracker
from tdxcore.constants import MAX_GFN, U64_MAX
from tdxcore.reference import invalidate as ref

# Mostly small gfns so ranges overlap, nest and contain the probed gfns; a few edge values.
gfns = st.one_of(st.integers(0, 40), st.sampled_from([MAX_GFN - 1, MAX_GFN, -1]))
ranges = st.tuples(gfns, gfns)
seq_offsets = st.integers(-1, 3)   # snapshot = current seq - offset (mod 2**64)


def outcome(f: Any, *args: Any) -> tuple:
    try:
        r = f(*args)
    except Exception as e:  # noqa: BLE001 - the exception itself is the compared outcome
        return ("raise", type(e).__name__, str(e))
    if isinstance(r, np.ndarray):
        return ("ok", r.dtype.str, r.tolist())
    return ("ok", r)


class InvalidateMachine(RuleBasedStateMachine):
    """Core vs twin over begin / range_add / end / retry* sequences."""

    mutation: ClassVar[Optional[str]] = None

    def __init__(self) -> None:
        super().__init__()
        self.core = InvalidateTracker()
        self.twin = ref.InvalidateTracker()
        if self.mutation is not None:
            _invalidate._testing_mutate(self.core, self.mutation)

    def both(self, name: str, *args: Any) -> None:
        a = outcome(getattr(self.core, name), *args)
        b = outcome(getattr(self.twin, name), *args)
        assert a == b, f"{name}{args}: core {a!r} != twin {b!r}"

    def seq(self, off: int) -> int:
        return (self.twin.seq - off) % (U64_MAX + 1)

    @rule(r=ranges)
    def begin(self, r: tuple) -> None:
        self.both("begin", *r)

    @rule(r=ranges)
    def range_add(self, r: tuple) -> None:
        self.both("range_add", *r)

    @rule(r=ranges)
    def end(self, r: tuple) -> None:
        self.both("end", *r)

    @rule(off=seq_offsets)
    def retry(self, off: int) -> None:
        self.both("retry", self.seq(off))

    @rule(off=seq_offsets, gfn=gfns)
    def retry_gfn(self, off: int, gfn: int) -> None:
        self.both("retry_gfn", self.seq(off), gfn)

    @rule(off=seq_offsets, gfn=gfns)
    def retry_gfn_unsafe(self, off: int, gfn: int) -> None:
        self.both("retry_gfn_unsafe", self.seq(off), gfn)

    @rule(off=seq_offsets, gs=st.lists(st.integers(0, 40), max_size=8))
    def retry_gfn_many(self, off: int, gs: list) -> None:
        self.both("retry_gfn_many", self.seq(off), np.array(gs, dtype=np.int64))

    @invariant()
    def same_state(self) -> None:
        c, t = self.core, self.twin
        assert (c.seq, c.in_progress, c.range, c.nr_warnings) == \
            (t.seq, t.in_progress, t.range, t.nr_warnings)
        assert c.state_hash() == t.state_hash()


DEFAULT = settings(max_examples=200, stateful_step_count=40, deadline=None)

TestInvalidateMachine = InvalidateMachine.TestCase
TestInvalidateMachine.settings = DEFAULT


@pytest.mark.slow
def test_invalidate_machine_slow() -> None:
    run_state_machine_as_test(InvalidateMachine,
                              settings=settings(max_examples=1000, stateful_step_count=60, deadline=None))


@pytest.mark.parametrize("mutation", sorted(_invalidate._MUTATIONS))
def test_machine_catches_mutation(mutation: str) -> None:
    """Each one-rule mutation of the core is found within the default example budget."""

    class Mutated(InvalidateMachine):
        pass

    Mutated.mutation = mutation
    budget = settings(DEFAULT, database=None, phases=[Phase.explicit, Phase.generate])
    with pytest.raises(AssertionError):
        run_state_machine_as_test(Mutated, settings=budget)
