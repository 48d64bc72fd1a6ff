"""Differential state machine: tdxcore._busylock against its twin (SPEC §4.4, STYLE §2.8).

"host" and "guest" actors try and release one lock in any order, misuse included; each call's
status (or exception) must be identical, and the invariant compares the whole word and hash.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tdxcore import _busylock
from tdxcore._busylock import BusyLock
from tdxcore.reference import busylock as ref
from tdxcore.status import OPERAND_ID_RCX, OPERAND_ID_SEPT_TREE  # type: ignore[attr-defined]

actors = st.sampled_from([True, False])   # host=True, guest=False


def outcome(f: Any, *args: Any) -> tuple:
    try:
        return ("ok", f(*args))
    except Exception as e:  # noqa: BLE001 - the exception itself is the compared outcome
        return ("raise", type(e).__name__, str(e))


class BusyLockMachine(RuleBasedStateMachine):
    """Core vs twin over try/unlock sequences from host and guest actors."""

    mutation: ClassVar[Optional[str]] = None

    @initialize(operand=st.sampled_from([OPERAND_ID_RCX, OPERAND_ID_SEPT_TREE]))
    def make(self, operand: int) -> None:
        self.core = BusyLock(operand)
        self.twin = ref.BusyLock(operand)
        if self.mutation is not None:
            _busylock._testing_mutate(self.core, self.mutation)

    def both(self, name: str, *args: Any) -> None:
        a = outcome(getattr(self.core, name), *args)
        b = outcome(getattr(self.twin, name), *args)
        assert a == b, f"{name}{args}: core {a!r} != twin {b!r}"

    @rule(host=actors)
    def try_shared(self, host: bool) -> None:
        self.both("try_shared", host)

    @rule(host=actors)
    def try_exclusive(self, host: bool) -> None:
        self.both("try_exclusive", host)

    @rule()
    def unlock_shared(self) -> None:
        self.both("unlock_shared")

    @rule()
    def unlock_exclusive(self) -> None:
        self.both("unlock_exclusive")

    @rule()
    def clear_host_priority(self) -> None:
        self.both("clear_host_priority")

    @invariant()
    def same_state(self) -> None:
        c, t = self.core, self.twin
        assert (c.word, c.is_locked, c.is_exclusive, c.nr_shared, c.host_priority, c.operand) == \
            (t.word, t.is_locked, t.is_exclusive, t.nr_shared, t.host_priority, t.operand)
        assert c.state_hash() == t.state_hash()


DEFAULT = settings(max_examples=200, stateful_step_count=40, deadline=None)

TestBusyLockMachine = BusyLockMachine.TestCase
TestBusyLockMachine.settings = DEFAULT


@pytest.mark.slow
def test_busylock_machine_slow() -> None:
    run_state_machine_as_test(BusyLockMachine,
                              settings=settings(max_examples=1000, stateful_step_count=60, deadline=None))


@pytest.mark.parametrize("mutation", sorted(_busylock._MUTATIONS))
def test_machine_catches_mutation(mutation: str) -> None:
    """Each one-rule mutation of the core is found within the default example budget."""

    class Mutated(BusyLockMachine):
        pass

    Mutated.mutation = mutation
    budget = settings(DEFAULT, database=None, phases=[Phase.explicit, Phase.generate])
    with pytest.raises(AssertionError):
        run_state_machine_as_test(Mutated, settings=budget)
