"""``tdx.storm.Scheduler``: the deterministic, seeded scheduler of SPEC §3.5 and §5.

It only adds *choice* to :class:`tdxcore.sched.Driver` (which advances one actor by one yield and
resolves its ``Wait``/``WaitOutOfGuest``): the next runnable actor is forced by the caller
(:meth:`~Scheduler.step`, :meth:`~Scheduler.run_until`, ``run(schedule)``) or drawn from the
scheduler's one RNG stream, the only source of interleaving choice (as trio's ``_r``; STYLE §2.7).
Actors stay in add order, never in a set or by ``id()``, so the same seed and actors give the same
schedule and event log in every process and for every ``PYTHONHASHSEED``. Every step is recorded
by actor name in :attr:`Scheduler.schedule`, and ``run(recorded)`` replays it exactly.
Threaded mode (SPEC §5) is **absent** for now: this scheduler is single-threaded and replayable.
"""

from __future__ import annotations

import hashlib
import random
import struct
from typing import Any, Callable, Dict, Final, Iterable, List, Optional, Tuple, Union

from tdxcore.errors import TdxTypeError, TdxValueError, check_int
from tdxcore.sched import (
    MAX_STEPS,
    PREEMPT,
    Actor,
    Driver,
    Op,
    SchedDeadlock,
    SchedLivelock,
    Wait,
    WaitOutOfGuest,
    Yielded,
)

__all__ = ["Scheduler", "ActorRef", "Until", "stream_seed"]

#: How a caller names an actor: the :class:`Actor`, its name, or its add-order index.
ActorRef = Union[Actor, str, int]
#: What :meth:`Scheduler.run_until` stops on: a predicate on the yielded value, or a value.
Until = Union[Callable[[Optional[Yielded]], object], Yielded]
_STREAM: Final = "scheduler"


def stream_seed(seed: int, name: str = _STREAM) -> int:
    """Return the seed of child stream ``name`` of the run's ``seed`` (in ``[0, 2**64)``).

    Notes
    -----
    ``blake2b(pack("<Q", seed) + name, digest_size=64, person=b"tdxrng")`` read little-endian:
    the derivation of ``Host.rng(name)``, so ``Scheduler(seed=s)`` draws exactly what
    ``Scheduler(rng=Host(seed=s).rng("scheduler"))`` would (a test checks it). STYLE §2.7.
    """
    s = check_int("seed", seed, 0, 1 << 64)
    h = hashlib.blake2b(struct.pack("<Q", s) + name.encode(), digest_size=64, person=b"tdxrng")
    return int.from_bytes(h.digest(), "little")


class Scheduler:
    """Drive actors (generators) one yield at a time, choosing the next one deterministically.

    Parameters
    ----------
    seed : int, optional
        The run's seed; draws come from its ``"scheduler"`` child stream (:func:`stream_seed`).
        Default 0 when ``rng`` is not given.
    rng : random.Random, optional
        Use this stream instead (e.g. ``host.rng("scheduler")``); exclusive with ``seed``.
    max_steps : int
        Bound on the total number of steps (:class:`~tdxcore.sched.SchedLivelock` beyond it).

    Raises
    ------
    TdxTypeError, TdxValueError
        A bad ``seed``/``rng``/``max_steps``, or both ``seed`` and ``rng``.

    Notes
    -----
    SPEC §3.5 (scenario scheduling), §5 (deterministic mode). A step is one actor advancing from
    one yield to the next. The random choice is ``rng.randrange(k)`` over the ``k`` runnable
    actors in add order, drawn only when ``k > 1``. No threaded mode.

    Examples
    --------
    >>> def op(n):
    ...     for _ in range(n):
    ...         yield PREEMPT
    ...     return n
    >>> s = Scheduler(seed=0)
    >>> a, b = s.add(op(2), "a"), s.add(op(1), "b")
    >>> s.run(["b", "a"])
    {'a': 2, 'b': 1}
    >>> s.schedule[:2], len(s.schedule)
    (['b', 'a'], 5)
    """

    def __init__(self, seed: Optional[int] = None, *, rng: Optional[random.Random] = None,
                 max_steps: int = MAX_STEPS) -> None:
        if rng is not None and seed is not None:
            msg = f"seed={seed!r} and rng are exclusive: give one"
            raise TdxValueError(msg, name="seed", value=seed)
        if rng is not None and not isinstance(rng, random.Random):
            msg = f"rng={rng!r} must be a random.Random"
            raise TdxTypeError(msg, name="rng", value=rng)
        self._rng = rng if rng is not None else random.Random(stream_seed(0 if seed is None else seed))
        self._driver = Driver(check_int("max_steps", max_steps, 1, 1 << 63))
        self._actors: List[Actor] = []
        self._by_name: Dict[str, Actor] = {}
        #: Names of the actors stepped, in order: feed it to :meth:`run` to replay.
        self.schedule: List[str] = []
        # What the draw needs without a scan of every actor per step (O(actors waiting), not
        # O(actors)): the live actors in add order, their positions, the live ones whose last
        # yield was a Wait/kick, and the driver's step count they reflect (a step taken by
        # anyone but _advance makes _ready rebuild them).
        self._live: List[Actor] = []
        self._pos: Dict[Actor, int] = {}
        self._parked: Dict[Actor, None] = {}
        self._seen_steps = 0

    # ------------------------------------------------------------------ actors
    def add(self, actor: Union[Actor, Op], name: Optional[str] = None) -> Actor:
        """Add an actor (an unstarted, not done :class:`Actor` or generator) and return it.

        ``name`` must be unique (schedules use it); default: the Actor's own, or ``"actor<index>"``.
        ``TdxTypeError`` for another type or a non-str name; ``TdxValueError`` for a taken
        name, an Actor added twice or already done, or a ``name`` differing from the Actor's.
        """
        if isinstance(actor, Actor):
            if any(a is actor for a in self._actors) or actor.done:
                msg = f"actor={actor.name!r} was already added or is already done"
                raise TdxValueError(msg, name="actor", value=actor.name)
            if name is not None and name != actor.name:
                msg = f"name={name!r} differs from the Actor's name {actor.name!r}"
                raise TdxValueError(msg, name="name", value=name)
            new = actor
        elif all(hasattr(actor, m) for m in ("send", "throw", "close")):
            nm = f"actor{len(self._actors)}" if name is None else name
            if not isinstance(nm, str) or not nm:
                msg = f"name={nm!r} must be a non-empty str"
                raise TdxTypeError(msg, name="name", value=nm)
            new = Actor(nm, actor)
        else:
            msg = f"actor={actor!r} must be a sched.Actor or a generator (type={type(actor).__name__})"
            raise TdxTypeError(msg, name="actor", value=actor)
        if new.name in self._by_name:
            msg = f"name={new.name!r} is already used by another actor"
            raise TdxValueError(msg, name="name", value=new.name)
        self._actors.append(new)
        self._by_name[new.name] = new
        if not new.done:
            self._pos[new] = len(self._live)
            self._live.append(new)
            if new.waiting_on is not None:
                self._parked[new] = None
        return new

    def actor(self, ref: ActorRef) -> Actor:
        """Return the actor ``ref`` names (``TdxTypeError``/``TdxValueError`` if none)."""
        found: Optional[Actor] = None
        if isinstance(ref, Actor):
            found = ref if self._by_name.get(ref.name) is ref else None
        elif isinstance(ref, str):
            found = self._by_name.get(ref)
        elif isinstance(ref, int) and not isinstance(ref, bool):
            found = self._actors[ref] if 0 <= ref < len(self._actors) else None
        else:
            msg = f"actor={ref!r} must be an Actor, a name or an index (type={type(ref).__name__})"
            raise TdxTypeError(msg, name="actor", value=ref)
        if found is None:
            msg = f"actor={getattr(ref, 'name', ref)!r} is not one of this scheduler's {self.names}"
            raise TdxValueError(msg, name="actor", value=ref)
        return found

    @property
    def actors(self) -> Tuple[Actor, ...]:
        """Every actor, in add order."""
        return tuple(self._actors)

    @property
    def names(self) -> List[str]:
        """Every actor's name, in add order."""
        return [a.name for a in self._actors]

    def runnable(self) -> List[Actor]:
        """Return the actors that can advance now, in add order."""
        return [a for a in self._actors if self._driver.runnable(a)]

    @property
    def finished(self) -> Tuple[Actor, ...]:
        """Actors that have returned (or raised), in add order."""
        return tuple(a for a in self._actors if a.done)

    @property
    def results(self) -> Dict[str, Any]:
        """``{name: return value}`` of every finished actor, in add order."""
        return {a.name: a.result for a in self._actors if a.done}

    @property
    def done(self) -> bool:
        """Whether every actor has finished."""
        return all(a.done for a in self._actors)

    @property
    def nr_steps(self) -> int:
        """Steps taken so far (``len(schedule)``)."""
        return len(self.schedule)

    # ------------------------------------------------------------------ stepping
    def step(self, actor: ActorRef) -> Optional[Yielded]:
        """Advance exactly ``actor`` by one yield; return what it yielded (None: it finished).

        Raises
        ------
        TdxValueError
            ``actor`` is unknown, finished, or blocked (its Wait or kick cannot be met now).
        SchedLivelock
            Past ``max_steps``. Whatever the generator raises propagates (the actor is done).
        """
        # the hot case (the storm loop steps the Actor choose() returned): no isinstance chain
        a = actor if type(actor) is Actor and self._by_name.get(actor.name) is actor else self.actor(actor)
        if a.done or (a.waiting_on is not None and not self._driver.runnable(a)):
            msg = f"actor {a.name!r} is not runnable: {self._why(a)}"
            raise TdxValueError(msg, name="actor", value=a.name)
        return self._advance(a)

    def _advance(self, a: Actor) -> Optional[Yielded]:
        """Step ``a``, known to be one of ours and runnable (the hot path of :meth:`run`)."""
        d = self._driver
        if d.nr_steps >= d.max_steps:
            msg = f"livelock: more than max_steps={d.max_steps} steps (next actor {a.name!r})"
            raise SchedLivelock(msg)
        self.schedule.append(a.name)  # first: a step whose generator raises still happened
        synced = self._seen_steps == d.nr_steps
        try:
            d.step(a)
        finally:
            if synced:
                self._seen_steps = d.nr_steps
                if a.done:
                    self._parked.pop(a, None)
                    self._live.remove(a)
                    self._pos = {x: i for i, x in enumerate(self._live)}
                elif a.waiting_on is None:
                    self._parked.pop(a, None)
                else:
                    self._parked[a] = None
        if a.done:
            return None
        return PREEMPT if a.waiting_on is None else a.waiting_on

    def _ready(self) -> Tuple[List[Actor], List[int]]:
        """Return the live actors (add order) and the sorted positions of the blocked ones.

        The runnable actors are the live ones minus the blocked: exactly the list a scan of
        every actor with :meth:`Driver.runnable` gives, in the same order, at O(actors waiting)
        per call (the waiting actors are asked in the order they started waiting: only which of
        two self-deadlocked actors is named first can differ from an add-order scan).
        """
        d = self._driver
        if self._seen_steps != d.nr_steps:          # stepped from outside: rebuild
            self._live = [a for a in self._actors if not a.done]
            self._pos = {a: i for i, a in enumerate(self._live)}
            self._parked = {a: None for a in self._live if a.waiting_on is not None}
            self._seen_steps = d.nr_steps
        parked = self._parked
        if not parked:
            return self._live, []
        runnable, pos = d.runnable, self._pos
        blocked = []
        for a in parked:
            w = a.waiting_on
            if type(w) is Wait:
                # Driver.runnable's first "no", inline: the lock is write-held by another actor
                writer = w.lock._writer
                if writer is not None and writer is not a and a not in w.lock._readers:
                    blocked.append(pos[a])
                    continue
            if not runnable(a):
                blocked.append(pos[a])
        if len(blocked) > 1:
            blocked.sort()
        return self._live, blocked

    def _draw(self, live: List[Actor], blocked: List[int]) -> Actor:
        """Draw among the ``len(live) - len(blocked)`` runnable actors (one randrange, if > 1)."""
        n = len(live) - len(blocked)
        k = self._rng.randrange(n) if n > 1 else 0
        for p in blocked:                           # the k-th runnable: skip the blocked before it
            if p <= k:
                k += 1
            else:
                break
        return live[k]

    def run_until(self, actor: ActorRef, until: Until) -> Optional[Yielded]:
        """Step only ``actor`` until its yield satisfies ``until`` or it finishes; return the last yield.

        ``until`` is a predicate called with each yielded value (None once the actor finished;
        it may look elsewhere too, e.g. at ``host.events``), or a value compared with ``==``
        (``PREEMPT``, or ``Wait(lock, WRITE)`` to stop when it asks for ``lock``). Raises as
        :meth:`step`, e.g. ``TdxValueError`` when the actor blocks first: step the holder.
        """
        pred: Callable[[Optional[Yielded]], object]
        pred = until if callable(until) else (lambda y: y == until)
        while True:
            y = self.step(actor)
            if y is None or pred(y):
                return y

    def run(self, schedule: Optional[Iterable[ActorRef]] = None,
            max_steps: Optional[int] = None) -> Dict[str, Any]:
        """Take the forced ``schedule`` step by step, then choose at random until all finish.

        Parameters
        ----------
        schedule : iterable of Actor, str or int, optional
            Actors to step first, in order (a recorded :attr:`schedule` replays exactly).
        max_steps : int, optional
            Bound on the steps this call takes.

        Returns
        -------
        dict
            ``{name: return value}`` of every finished actor (:attr:`results`).

        Raises
        ------
        TdxTypeError, TdxValueError
            An entry names no actor (checked before any step) or is not runnable at its turn.
        SchedDeadlock
            Actors remain but none can run (the message names who waits on what).
        SchedLivelock
            More than ``max_steps`` steps.
        """
        forced = [self.actor(r) for r in (schedule if schedule is not None else ())]
        bound = MAX_STEPS if max_steps is None else check_int("max_steps", max_steps, 0, 1 << 63)
        for i, a in enumerate(forced):
            self._check_bound(bound, i)
            if not self._driver.runnable(a):
                msg = f"schedule[{i}]={a.name!r} is not runnable at its turn: {self._why(a)}"
                raise TdxValueError(msg, name="schedule", value=a.name)
            self.step(a)
        taken = len(forced)
        while True:
            live, blocked = self._ready()           # actors added meanwhile are in it
            if len(blocked) == len(live):
                if not live:
                    return self.results
                msg = f"deadlock: no actor can run; {self._waiting()}"
                raise SchedDeadlock(msg)
            self._check_bound(bound, taken)
            self._advance(self._draw(live, blocked))
            taken += 1

    def choose(self) -> Optional[Actor]:
        """Draw the next actor as :meth:`run` does (None when every actor is done).

        Raises :class:`SchedDeadlock` when actors remain but none can run. The caller steps it
        (:meth:`step`), which records it in :attr:`schedule`.
        """
        live, blocked = self._ready()
        if len(blocked) == len(live):
            if not live:
                return None
            msg = f"deadlock: no actor can run; {self._waiting()}"
            raise SchedDeadlock(msg)
        return self._draw(live, blocked)

    # ------------------------------------------------------------------ diagnostics
    def _why(self, a: Actor) -> str:
        if a.done:
            return "it has finished"
        w = a.waiting_on
        if isinstance(w, Wait):
            holders = ", ".join(getattr(h, "name", repr(h)) for h in w.lock.holders())
            return f"waits for {w.lock.name} ({w.mode}), {'held by ' + holders if holders else 'free'}"
        if isinstance(w, WaitOutOfGuest):
            inside = [getattr(v, "name", repr(v)) for v in w.vcpus if v.in_guest]
            return f"kicks vCPUs still in the guest: {', '.join(inside) or 'none'}"
        return "runnable"

    def _waiting(self) -> str:
        return "; ".join(f"{a.name!r} {self._why(a)}" for a in self._actors if not a.done)

    def _check_bound(self, bound: int, taken: int) -> None:
        if taken >= bound:
            msg = f"livelock: run() took max_steps={bound} steps and actors remain: {self._waiting()}"
            raise SchedLivelock(msg)

    def state_bytes(self) -> bytes:
        """Canonical bytes of every actor's position, for an explorer's global state (SPEC §5).

        Per actor in add order: ``<H`` name length, UTF-8 name, ``<QB`` its step count and done
        flag, then ``P`` (no wait), ``W`` + lock name + NUL + mode + NUL, or ``K`` + ``<H`` vCPUs.
        """
        parts: List[bytes] = []
        for a in self._actors:
            name = a.name.encode()
            parts.append(struct.pack("<H", len(name)) + name + struct.pack("<QB", a.nr_steps, a.done))
            w = a.waiting_on
            if isinstance(w, Wait):
                parts.append(b"W" + w.lock.name.encode() + b"\0" + w.mode.encode() + b"\0")
            elif isinstance(w, WaitOutOfGuest):
                parts.append(b"K" + struct.pack("<H", len(w.vcpus)))
            else:
                parts.append(b"P")
        return b"".join(parts)

    def __repr__(self) -> str:
        return (f"Scheduler(actors={self.names}, steps={self.nr_steps}, "
                f"runnable={[a.name for a in self.runnable()]})")
