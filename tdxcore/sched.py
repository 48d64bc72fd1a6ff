"""The concurrency vocabulary of the model (SPEC §5): what an operation yields, and the driver.

Every operation in the model is a generator that yields at preemption points:

* :data:`PREEMPT` — any other actor may run here;
* :class:`Wait` ``(lock, mode)`` — blocks until a KVM-side :class:`KLock` can be taken in ``mode``;
  the driver takes it on the actor's behalf and sends the owner token back, so an operation reads
  ``owner = yield Wait(vm.mmu_lock, WRITE)`` and later calls ``vm.mmu_lock.release(owner, WRITE)``;
* :class:`WaitOutOfGuest` ``(vcpus)`` — a kick: blocks until none of those vCPUs is in the guest.

:class:`Driver` advances one actor by one yield (:meth:`Driver.step`) and says whether an actor can
advance (:meth:`Driver.runnable`); the seeded scheduler of the tools layer only adds the choice of
which runnable actor goes next. :func:`run_to_completion` is the synchronous API: it drives one
generator on the caller's thread.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, Generator, Hashable, Iterable, Optional, Protocol, Tuple, Union

from tdxcore.errors import TdxError, TdxTypeError, TdxValueError

__all__ = ["PREEMPT", "READ", "WRITE", "Wait", "WaitOutOfGuest", "KLock", "Srcu", "Actor", "Driver",
           "SchedError", "SchedDeadlock", "SchedLivelock", "run_to_completion", "MAX_STEPS"]

#: Lock modes of :class:`KLock`: KVM's rwlock words (``read_lock(&kvm->mmu_lock)`` /
#: ``write_lock``). A mutex (``slots_lock``, ``kvm->lock``, the vCPU mutex) is a KLock taken WRITE.
READ: Final = "read"
WRITE: Final = "write"
_MODES = (READ, WRITE)
#: Default bound of :class:`Driver` (and :func:`run_to_completion`) on steps before a livelock error.
MAX_STEPS: Final = 10_000_000


class SchedError(TdxError, RuntimeError):
    """The driver cannot make progress."""


class SchedDeadlock(SchedError):
    """A Wait or a kick can never be satisfied (or a lock was asked for twice by its owner)."""


class SchedLivelock(SchedError):
    """More than ``max_steps`` steps without the actors finishing."""


class _Preempt(enum.Enum):
    """Type of :data:`PREEMPT`: a one-member enum, so copies and pickles stay the singleton."""

    PREEMPT = "PREEMPT"

    def __repr__(self) -> str:
        return "PREEMPT"


#: Yielded where any other actor may run (a preemption point); the generator receives ``None``.
PREEMPT: Final = _Preempt.PREEMPT


class InGuest(Protocol):
    """What a kick needs to know of a vCPU: whether it is between VP.ENTER and its exit."""

    @property
    def in_guest(self) -> bool: ...  # noqa: D102


class KLock:
    """A KVM-side blocking lock with rwlock semantics (any number of readers, or one writer).

    Parameters
    ----------
    name : str
        Upstream name, e.g. ``"mmu_lock"``, ``"slots_lock"``; used in messages.

    Notes
    -----
    Models ``kvm->mmu_lock`` (rwlock on x86), ``slots_lock``, ``kvm->lock``, the vCPU mutex
    (SPEC §5). Owners are hashable tokens (the driver uses the :class:`Actor`). **Not
    reentrant**: asking again for a held lock is a self-deadlock (as with the kernel's locks) and
    raises :class:`SchedDeadlock`. The lock itself never blocks; the driver resolves :class:`Wait`.
    Readers keep insertion order, so :meth:`holders` is deterministic.
    """

    __slots__ = ("name", "_writer", "_readers", "wait_read", "wait_write")

    def __init__(self, name: str) -> None:
        self.name = name
        self._writer: Optional[Hashable] = None
        self._readers: dict[Hashable, None] = {}
        #: ``Wait(self, READ)`` / ``Wait(self, WRITE)``, built once: hot paths yield these
        #: (equal to a fresh ``Wait``; a frozen dataclass is cheaper shared than rebuilt).
        self.wait_read = Wait(self, READ)
        self.wait_write = Wait(self, WRITE)

    def __repr__(self) -> str:
        return f"KLock({self.name!r}, writer={self._writer!r}, readers={list(self._readers)!r})"

    def holders(self) -> Tuple[Hashable, ...]:
        """Return the current owners (the writer, or the readers in acquisition order)."""
        return (self._writer,) if self._writer is not None else tuple(self._readers)

    def is_held_by(self, owner: Hashable, mode: str) -> bool:
        """Return whether ``owner`` holds the lock in ``mode``."""
        return self._writer == owner if mode == WRITE else owner in self._readers

    def can_acquire(self, owner: Hashable, mode: str) -> bool:
        """Return whether :meth:`try_acquire` would succeed now, without taking the lock."""
        if mode is not READ and mode is not WRITE:
            _check_mode(mode)
        if owner is None:
            msg = "owner=None is not a valid lock owner"
            raise TdxValueError(msg, name="owner", value=None)
        if self._writer == owner or owner in self._readers:
            msg = f"{owner!r} asks for {self.name} ({mode}) which it already holds: KLock is not reentrant"
            raise SchedDeadlock(msg)
        return self._writer is None and (mode == READ or not self._readers)

    def try_acquire(self, owner: Hashable, mode: str) -> bool:
        """Take the lock for ``owner`` in ``mode`` if possible now (True), else change nothing.

        Raises ``TdxValueError`` for a bad mode or a None owner, :class:`SchedDeadlock` if
        ``owner`` already holds the lock (not reentrant).
        """
        if not self.can_acquire(owner, mode):
            return False
        if mode == READ:
            self._readers[owner] = None
        else:
            self._writer = owner
        return True

    def release(self, owner: Hashable, mode: str) -> None:
        """Drop ``owner``'s hold in ``mode``; :class:`TdxValueError` if it holds none."""
        if mode is READ and owner in self._readers:     # the hot case first, same checks
            del self._readers[owner]
            return
        _check_mode(mode)
        if not self.is_held_by(owner, mode):
            msg = f"{owner!r} releases {self.name} ({mode}) without holding it (holders {self.holders()!r})"
            raise TdxValueError(msg, name="owner", value=owner)
        if mode == READ:
            del self._readers[owner]
        else:
            self._writer = None


def _check_mode(mode: object) -> None:
    if mode not in _MODES:
        msg = f"mode={mode!r} must be {READ!r} or {WRITE!r}"
        raise TdxValueError(msg, name="mode", value=mode)


@dataclass(frozen=True)
class Wait:
    """Yielded to block until ``lock`` can be taken in ``mode``; the driver takes it and sends the owner."""

    lock: KLock
    mode: str = WRITE

    def __post_init__(self) -> None:
        _check_mode(self.mode)


@dataclass(frozen=True)
class WaitOutOfGuest:
    """Yielded to block until none of ``vcpus`` is in the guest (a kick); receives ``None``."""

    vcpus: Tuple[InGuest, ...]

    def __init__(self, vcpus: Iterable[InGuest]) -> None:
        object.__setattr__(self, "vcpus", tuple(vcpus))


class _SrcuReader:
    """One SRCU read-side section; ``in_guest`` means "still inside" (what a grace period waits for)."""

    __slots__ = ("inside",)

    def __init__(self) -> None:
        self.inside = True

    @property
    def in_guest(self) -> bool:
        return self.inside


class Srcu:
    """Sleepable RCU (``kvm->srcu``): readers never block.

    ``synchronize`` waits only for the readers already inside when it was called (new readers do
    not hold it back, unlike a rwlock's writer).

    ``token = srcu.read_lock()`` ... ``srcu.read_unlock(token)``; ``yield from srcu.synchronize()``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        # open sections in open order: a dict, so ending one is O(1) with many vCPUs inside
        self._readers: dict = {}

    def __repr__(self) -> str:
        return f"Srcu({self.name!r}, readers={len(self._readers)})"

    @property
    def nr_readers(self) -> int:
        """Read-side sections currently open."""
        return len(self._readers)

    def read_lock(self) -> _SrcuReader:
        """Enter a read-side section; return its token."""
        r = _SrcuReader()
        self._readers[r] = None
        return r

    def read_unlock(self, token: _SrcuReader) -> None:
        """Leave the section ``token`` opened."""
        token.inside = False
        self._readers.pop(token, None)

    def synchronize(self) -> Generator[Any, Any, None]:
        """``synchronize_srcu``: wait until every section open now has ended."""
        if self._readers:
            yield WaitOutOfGuest(tuple(self._readers))


Yielded = Union[_Preempt, Wait, WaitOutOfGuest]
Op = Generator[Yielded, Any, Any]


@dataclass(eq=False)
class Actor:
    """One generator being driven and where it stands; the object is its lock-owner token.

    ``name`` is stable (used in messages, never ``id()``); ``waiting_on`` is what the last yield
    asked for (None after PREEMPT); ``result`` is the return value once ``done``.
    """

    name: str
    gen: Op
    waiting_on: Optional[Union[Wait, WaitOutOfGuest]] = None
    done: bool = False
    result: Any = None
    nr_steps: int = 0

    def __repr__(self) -> str:
        return f"Actor({self.name!r})"


class Driver:
    """Advance actors one yield at a time; which actor goes next is the caller's choice.

    ``max_steps`` bounds the total number of steps (:class:`SchedLivelock` beyond it).
    """

    def __init__(self, max_steps: int = MAX_STEPS) -> None:
        self.max_steps = max_steps
        self.nr_steps = 0

    def runnable(self, actor: Actor) -> bool:
        """Return whether ``actor`` can advance now (not done, its wait satisfied)."""
        if actor.done:
            return False
        w = actor.waiting_on
        if w is None:
            return True
        if type(w) is Wait:
            # can_acquire's answer without the call in the two plain cases (the scheduler asks
            # this of every waiting actor at every step); the rest, errors included, goes there
            lock = w.lock
            writer = lock._writer
            if writer is None:
                if w.mode == READ:
                    if actor not in lock._readers:
                        return True
                elif not lock._readers:
                    return True
            elif writer is not actor and actor not in lock._readers:
                return False
            return lock.can_acquire(actor, w.mode)
        if isinstance(w, Wait):
            return w.lock.can_acquire(actor, w.mode)
        if isinstance(w, WaitOutOfGuest):
            return not any(v.in_guest for v in w.vcpus)
        return True

    def step(self, actor: Actor) -> None:
        """Resolve ``actor``'s wait (taking its lock), then run it to its next yield or its end.

        Raises ``TdxValueError`` if ``actor`` is not runnable, ``TdxTypeError`` if it yields
        anything but PREEMPT/Wait/WaitOutOfGuest, :class:`SchedLivelock` past ``max_steps``, and
        whatever the generator raises, unchanged (the actor is then done).
        """
        w = actor.waiting_on
        if actor.done or (w is not None and not self.runnable(actor)):
            msg = f"actor {actor.name!r} is not runnable (done={actor.done}, waiting on {actor.waiting_on!r})"
            raise TdxValueError(msg, name="actor", value=actor.name)
        self.nr_steps += 1
        if self.nr_steps > self.max_steps:
            msg = f"livelock: more than max_steps={self.max_steps} steps (last actor {actor.name!r})"
            raise SchedLivelock(msg)
        sent: Any = None
        if w is not None and isinstance(w, Wait):
            # cannot fail: runnable() just said it is free; READ/WRITE were checked by Wait
            lock = w.lock
            if w.mode == READ:
                lock._readers[actor] = None
            else:
                lock._writer = actor
            sent = actor
        actor.nr_steps += 1
        try:
            y = actor.gen.send(sent)
        except StopIteration as stop:
            actor.done, actor.result, actor.waiting_on = True, stop.value, None
            return
        except BaseException:
            actor.done, actor.waiting_on = True, None
            raise
        if y is PREEMPT:
            actor.waiting_on = None
        elif type(y) is Wait or isinstance(y, (Wait, WaitOutOfGuest)):
            actor.waiting_on = y
        else:
            actor.gen.close()
            actor.done = True
            msg = f"actor {actor.name!r} yielded {y!r}: expected PREEMPT, Wait or WaitOutOfGuest"
            raise TdxTypeError(msg, name="yield", value=y)


def run_to_completion(gen: Op, *, name: str = "sync", max_steps: int = MAX_STEPS) -> Any:
    """Drive one operation on the caller's thread and return its return value.

    Parameters
    ----------
    gen : Generator
        The operation (unstarted); ``name`` labels it in messages; ``max_steps`` bounds it.

    Returns
    -------
    Any
        The generator's return value (``StopIteration.value``).

    Raises
    ------
    SchedDeadlock
        It waits on a lock someone else holds, or kicks a vCPU that is in the guest: with one
        actor and no scheduler nothing can ever release the lock or make the vCPU exit, so
        waiting would hang. The generator is closed first (its ``finally`` blocks run).
    SchedLivelock
        More than ``max_steps`` yields.

    Notes
    -----
    SPEC §5: the synchronous API drives the same generators as the storm.
    """
    if not hasattr(gen, "send") or not hasattr(gen, "close"):
        msg = f"gen={gen!r} must be a generator (type={type(gen).__name__})"
        raise TdxTypeError(msg, name="gen", value=gen)
    driver, actor = Driver(max_steps), Actor(name, gen)
    try:
        while not actor.done:
            if actor.waiting_on is not None and not driver.runnable(actor):
                w = actor.waiting_on
                if isinstance(w, Wait):
                    msg = (f"deadlock: {name!r} waits for {w.lock.name} ({w.mode}) held by "
                           f"{w.lock.holders()!r}, and nothing else can run to release it")
                else:
                    msg = f"deadlock: {name!r} kicks vCPUs still in the guest, with no scheduler: {w!r}"
                raise SchedDeadlock(msg)
            driver.step(actor)
    except SchedError:
        gen.close()
        raise
    return actor.result
