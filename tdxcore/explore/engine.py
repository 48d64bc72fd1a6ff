"""The exhaustive interleaving explorer (issue 11; SPEC §5 "the explorer's global state").

**Stateless search.** Generators cannot be copied, so a branch is reached by re-building the
scenario from scratch (:class:`Execution`) and replaying the recorded schedule prefix; the search
is a depth-first walk over the scheduler's choices where only the first child of a node continues
the live execution. A *step* is one actor advancing from one yield to the next (SPEC §5).

**State caching.** After every new step the global state key (:mod:`tdxcore.explore.state`:
the model state without its order-only parts, every actor's position, the counters, the
explorer's livelock monitor) is looked up; a state already explored under a weaker or equal
constraint is pruned; a state already explored was already checked, so the invariants run only
on new states. The positions hold each actor's step count, so every path to a state has the
same length. The key leaves the event log out (its digest records the order of every step, so
no two interleavings would ever meet); the sequence invariants that read the log keep a shadow
of the module state, which the key covers.

**Partial-order reduction: sleep sets** (Godefroid 1996) over a conservative independence
relation. A step is *local* when it changed no shared state, no other actor's private state and
no actor's enabledness (:class:`~tdxcore.explore.state.StateView`): it wrote only its own
position, its vCPU's private fields and counters. Two local steps of different actors are
independent (each writes nothing the other reads, and neither changes what is runnable — which
the livelock monitor reads); **every other pair is treated as dependent** — a step that touches anything
shared (a lock, an S-EPT entry, an attribute, a flag, a frame) conflicts with every step. After
exploring step *t* at a state, each later sibling *u* independent of *t* starts with *t* asleep;
a sleeping step stays asleep through independent steps and is never explored while asleep.
Sleep sets alone keep every reachable state (they prune transitions, not states), so the reduced
and unreduced searches find the same violating states. With state caching (Godefroid 1996), a
state reached again is pruned if its stored sleep set is a subset of the current one; otherwise
only the transitions asleep then and awake now are explored, and the stored set shrinks to the
intersection (with a preemption bound — no reduction — a state is explored again only when
reached with fewer preemptions used). What the reduction saves is transitions, each of which
costs a replay from scratch; the number of distinct states is the same by construction (the
tests check it on every scenario).

**Bounds.** ``max_steps`` bounds a schedule's length (longer schedules are *truncated*, not
violations); ``preemption_bound`` (CHESS, Musuvathi & Qadeer 2007) bounds the switches away from
an actor that could have continued. Sleep sets are not complete under a preemption bound (the
representative order they keep may need more preemptions), so the reduction is switched off when a
preemption bound is given.

**Shortest counterexample.** Iterative deepening by branch and bound: a violation found at depth
*d* lowers the bound to *d − 1* and the search goes on; since every path to a state has the same
length and no reachable state is lost, the last violation kept is a shortest one.

**Verdicts.** A violation is an invariant (``check_invariants`` after every step), a KVM_BUG or
the scenario's own property, an exception out of an actor, a deadlock (live actors, none
runnable), a livelock (one actor runs alone for :data:`LIVELOCK_STEPS` steps while the others
are blocked), or a failure of the scenario's final check (teardown, leaks) once all actors are done.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from tdxcore.errors import TdxTypeError, check_int
from tdxcore.explore.execution import LIVELOCK_STEPS, Execution
from tdxcore.explore.scenarios import get_scenario
from tdxcore.explore.variants import get_variant

__all__ = ["ExploreConfig", "ExploreResult", "Execution", "explore", "LIVELOCK_STEPS"]


@dataclass(frozen=True)
class ExploreConfig:
    """What to explore (validated; :func:`explore` takes it).

    Attributes
    ----------
    scenario : str
        A catalogue name (:data:`~tdxcore.explore.scenarios.SCENARIOS`).
    policy : str
        A built-in policy or a broken variant (:data:`~tdxcore.explore.variants.VARIANTS`).
    max_steps : int or None
        Bound on a schedule's length; None: the scenario's default (small) bound.
    preemption_bound : int or None
        CHESS preemption bound; None: unbounded. Turns the reduction off (see the module notes).
    reduce : bool
        Sleep-set partial-order reduction.
    shortest : bool
        Keep searching for a shorter violation after the first (branch and bound).
    stop_at_first : bool
        Stop at the first violation (it is then not necessarily the shortest).
    """

    scenario: str
    policy: str = "LINUX_6_18"
    max_steps: Optional[int] = None
    preemption_bound: Optional[int] = None
    reduce: bool = True
    shortest: bool = True
    stop_at_first: bool = False

    def __post_init__(self) -> None:
        get_scenario(self.scenario)
        get_variant(self.policy)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, 1, 100_001)
        if self.preemption_bound is not None:
            check_int("preemption_bound", self.preemption_bound, 0, 10_001)
        for name in ("reduce", "shortest", "stop_at_first"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                msg = f"{name}={v!r} must be a bool"
                raise TdxTypeError(msg, name=name, value=v)

    @property
    def bound(self) -> int:
        """The effective ``max_steps``."""
        return self.max_steps if self.max_steps is not None else get_scenario(self.scenario).max_steps

    @property
    def reducing(self) -> bool:
        """Whether sleep sets are in use (never with a preemption bound)."""
        return self.reduce and self.preemption_bound is None


@dataclass
class ExploreResult:
    """What one exploration found (figures summed over workers when split).

    ``states`` counts distinct states explored (per worker: workers do not share their caches),
    ``transitions`` the steps executed at the frontier, ``pruned`` the transitions that reached
    an already explored state, ``revisits`` the states reached again with a smaller sleep set
    (partly re-expanded), ``sleep_skipped`` the choices the sleep sets skipped,
    ``executions`` the re-builds of the scenario, ``schedules`` the maximal schedules (complete,
    truncated at the bound, or violating).
    """

    scenario: str
    policy: str
    max_steps: int
    preemption_bound: Optional[int]
    reduce: bool
    schedules: int = 0
    complete: int = 0
    truncated: int = 0
    states: int = 0
    transitions: int = 0
    pruned: int = 0
    sleep_skipped: int = 0
    bound_skipped: int = 0
    revisits: int = 0
    executions: int = 0
    violations: int = 0
    seconds: float = 0.0
    workers: int = 1
    violation: Optional[Dict[str, Any]] = None

    @property
    def verdict(self) -> str:
        """``"proven"`` (no violation within the bounds) or ``"violated"``."""
        return "proven" if self.violation is None else "violated"

    @property
    def states_per_s(self) -> float:
        """Distinct states explored per second of wall time."""
        return self.states / max(self.seconds, 1e-9)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready figures (plus ``verdict`` and ``states_per_s``)."""
        d = asdict(self)
        d["verdict"] = self.verdict
        d["states_per_s"] = round(self.states_per_s, 1)
        d["seconds"] = round(self.seconds, 6)
        return d

    def merge(self, other: "ExploreResult") -> None:
        """Add ``other``'s figures; keep the shorter violation."""
        for k in ("schedules", "complete", "truncated", "states", "transitions", "pruned", "sleep_skipped",
                  "bound_skipped", "revisits", "executions", "violations"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        if other.violation is not None and (self.violation is None
                                            or _order(other.violation) < _order(self.violation)):
            self.violation = other.violation


def _order(v: Dict[str, Any]) -> Tuple[int, List[str]]:
    return (v["depth"], list(v["schedule"]))


#: "Every transition" in the search's frames (identity-compared).
ALL: FrozenSet[str] = frozenset({"\0all"})


@dataclass
class _Frame:
    enabled: List[str]
    sleep: Dict[str, bool]
    preempt: int
    last: Optional[str]
    shared: int
    privs: Tuple[int, ...]
    only: FrozenSet[str]
    done: Dict[str, bool] = field(default_factory=dict)


class _Search:
    """One depth-first search (a whole tree, or the subtree under a prefix)."""

    def __init__(self, cfg: ExploreConfig) -> None:
        self.cfg = cfg
        self.scenario = get_scenario(cfg.scenario)
        self.variant = get_variant(cfg.policy)
        self.bound = cfg.bound
        self.res = ExploreResult(cfg.scenario, cfg.policy, self.bound, cfg.preemption_bound, cfg.reducing)
        self.visited: Dict[Any, Tuple[FrozenSet[str], int]] = {}
        self.frontier: List[List[str]] = []

    def _open(self, path: List[str]) -> Execution:
        """Return a live execution at the end of ``path``, re-executed from the scenario's start."""
        self.res.executions += 1
        ex = Execution(self.scenario, self.variant)
        ex.replay(path)
        return ex

    def _visit(self, key: Any, sleep: FrozenSet[str], preempt: int) -> Optional[FrozenSet[str]]:
        """Look ``key`` up in the state cache; return what is left to explore there.

        None: nothing (pruned). Otherwise the transitions to explore: ``ALL`` for a new state (or
        one reached again with fewer preemptions used), or, for a state explored before with
        sleep set *S'* and reached again with *S* ⊉ *S'*, exactly *S'* minus *S* — the transitions
        asleep then and awake now (Godefroid 1996, sleep sets with state caching); the stored set
        becomes *S'* ∩ *S*.
        """
        old = self.visited.get(key)
        if old is None:
            self.visited[key] = (sleep, preempt)
            self.res.states += 1
            return ALL
        s2, p2 = old
        if p2 > preempt:                 # more budget left than before: explore it all again
            self.visited[key] = (s2 & sleep, preempt)
            return ALL
        if s2 <= sleep:
            return None
        self.visited[key] = (s2 & sleep, p2)
        self.res.revisits += 1
        return s2 - sleep

    def _violation(self, v: Dict[str, Any], path: List[str]) -> bool:
        """Record ``v`` at the end of ``path``; return True to stop the search."""
        self.res.violations += 1
        self.res.schedules += 1
        v = dict(v, depth=len(path), schedule=list(path))
        if self.res.violation is None or _order(v) < _order(self.res.violation):
            self.res.violation = v
        if self.cfg.stop_at_first:
            return True
        if self.cfg.shortest:
            self.bound = min(self.bound, len(path) - 1)
        return False

    def _leaf(self, live: Any, count: str) -> None:
        live.close()
        self.res.schedules += 1
        setattr(self.res, count, getattr(self.res, count) + 1)

    def run(self, prefix: Optional[List[str]] = None, collect_at: Optional[int] = None) -> ExploreResult:
        """Search the subtree under ``prefix``; ``collect_at``: stop at that depth, keep the prefixes."""
        t0 = time.perf_counter()
        try:
            self._run(list(prefix or []), collect_at)
        finally:
            self.res.seconds = time.perf_counter() - t0
        return self.res

    def _run(self, path: List[str], collect_at: Optional[int]) -> None:
        cfg = self.cfg
        pb = cfg.preemption_bound
        live: Optional[Execution] = self._open([])
        assert live is not None
        v, root, preempt, last = live.prepare(path, pb is not None)
        if v is not None or root.all_done:
            live.close()
            if v is not None:
                self._violation(v, path)
            return
        self._visit(root.key, frozenset(), preempt)
        names = live.names()
        stack = [_Frame(root.enabled, {}, preempt, last, root.shared, root.privs, ALL)]
        base = len(path)
        stopped = False
        while stack and not stopped:
            f = stack[-1]
            choice, cost = None, 0
            if len(path) < self.bound:
                for n in f.enabled:
                    if n in f.done or (f.only is not ALL and n not in f.only):
                        continue
                    if n in f.sleep:
                        self.res.sleep_skipped += 1
                        f.done[n] = f.sleep[n]          # never again from here
                        continue
                    c = 1 if (pb is not None and f.last is not None and n != f.last
                              and f.last in f.enabled) else 0
                    if pb is not None and f.preempt + c > pb:
                        self.res.bound_skipped += 1
                        f.done[n] = False
                        continue
                    choice, cost = n, c
                    break
            if choice is None:
                stack.pop()
                if len(path) > base:
                    path.pop()
                if live is not None:
                    live.close()
                    live = None
                continue
            if live is None:
                live = self._open(path)
            self.res.transitions += 1
            child = path + [choice]
            out = live.advance(choice, choice if pb is not None else None)
            if out.violation is not None:
                f.done[choice] = False
                live.close()
                live = None
                stopped = self._violation(out.violation, child)
                continue
            me = names.index(choice)
            # local: no shared byte, no other actor's private byte and no actor's enabledness changed
            # (the livelock monitor reads the runnable set, so a step changing it does not commute)
            others = (p == q for i, (p, q) in enumerate(zip(out.privs, f.privs, strict=True)) if i != me)
            local = out.shared == f.shared and out.enabled == f.enabled and all(others)
            f.done[choice] = local
            sleep: Dict[str, bool] = {}
            if cfg.reducing and local:
                sleep = {n: True for n, loc in list(f.sleep.items()) + list(f.done.items())
                         if loc and n != choice}
            # the key first: a state already explored was already checked (same state, same verdict)
            only = self._visit(out.key, frozenset(sleep), f.preempt + cost)
            if only is None:
                self.res.pruned += 1
                live.close()
                live = None
                continue
            if only is not ALL:          # explored before: checked, not a leaf; expand what is left
                if len(child) < self.bound and collect_at is None:
                    stack.append(_Frame(out.enabled, sleep, f.preempt + cost, choice, out.shared, out.privs,
                                        only))
                    path.append(choice)
                else:
                    live.close()
                    live = None
                continue
            v = live.check()
            if v is None and out.all_done:
                v = live.final()
                if v is None:
                    self._leaf(live, "complete")
                    live = None
                    continue
            if v is not None:
                live.close()
                live = None
                stopped = self._violation(v, child)
                continue
            if collect_at is not None and len(child) >= collect_at:
                self.frontier.append(child)
                live.close()
                live = None
                continue
            if len(child) >= self.bound:
                self._leaf(live, "truncated")
                live = None
                continue
            stack.append(_Frame(out.enabled, sleep, f.preempt + cost, choice, out.shared, out.privs, ALL))
            path.append(choice)
        if live is not None:
            live.close()


def explore(config: ExploreConfig, *, workers: int = 1, split_depth: Optional[int] = None,
            scheduler: Any = None) -> ExploreResult:
    """Explore ``config``'s scenario exhaustively within its bounds (issue 11).

    Parameters
    ----------
    config : ExploreConfig
        Scenario, policy, bounds, reduction.
    workers : int
        1: search in this process. More: split the tree at ``split_depth`` and search the
        subtrees on ``tdxcore campaign``'s local process pool (or Dask with ``scheduler``).
    split_depth : int, optional
        Depth of the split (default: the smallest depth with at least 4 subtrees per worker, at
        most 8).
    scheduler : str or distributed.Client, optional
        Run the subtrees on Dask distributed (as campaigns do).

    Returns
    -------
    ExploreResult
        ``verdict`` ``"proven"`` or ``"violated"``, the shortest violation with its schedule,
        and the figures.

    Raises
    ------
    TdxTypeError, TdxValueError
        A bad config, ``workers`` or ``split_depth``.
    """
    if not isinstance(config, ExploreConfig):
        msg = f"config={config!r} must be an ExploreConfig"
        raise TdxTypeError(msg, name="config", value=config)
    check_int("workers", workers, 1, 1025)
    if split_depth is not None:
        check_int("split_depth", split_depth, 1, config.bound + 1)
    if workers == 1 and scheduler is None:
        return _Search(config).run()
    return _explore_split(config, workers, split_depth, scheduler)


def explore_subtree(config_dict: Dict[str, Any], prefix: List[str]) -> Dict[str, Any]:
    """Search the subtree under ``prefix`` (a worker's task); return the result as a dict."""
    res = _Search(ExploreConfig(**config_dict)).run(prefix)
    return res.to_dict()


def _from_dict(d: Dict[str, Any]) -> ExploreResult:
    keys = {f for f in ExploreResult.__dataclass_fields__}
    return ExploreResult(**{k: v for k, v in d.items() if k in keys})


def _explore_split(config: ExploreConfig, workers: int, split_depth: Optional[int],
                   scheduler: Any) -> ExploreResult:
    from tdxcore.storm.campaign import run_tasks

    t0 = time.perf_counter()
    depth = split_depth
    head: Optional[_Search] = None
    for d in ([depth] if depth is not None else range(1, 9)):
        head = _Search(config)
        head.run(collect_at=d)
        if depth is not None or len(head.frontier) >= 4 * workers or head.res.violation is not None:
            break
    assert head is not None
    total = head.res
    total.workers = workers
    if total.violation is None or not config.stop_at_first:
        cfg = asdict(config)
        if total.violation is not None and config.shortest:
            cfg["max_steps"] = min(config.bound, total.violation["depth"] - 1)
        results = run_tasks(explore_subtree, [(cfg, p) for p in head.frontier], workers=workers,
                            scheduler=scheduler)
        for r in results:
            total.merge(_from_dict(r))
    total.seconds = time.perf_counter() - t0
    return total
