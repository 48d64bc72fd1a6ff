"""``run_storm`` and ``replay``: the seeded multi-vCPU fault storm (SPEC §3.5, §5, §8; anchors A28).

One storm: a host and a TD **without** ``SEPT_VE_DISABLE`` (the guest's #VE handler accepts), one
guest_memfd memslot over a 2 MiB-aligned area (first half PRIVATE, second half shared), ``vcpus``
vCPU actors in the four roles and the host actors of the mix, all driven by the seeded
:class:`~tdxcore.storm.scheduler.Scheduler` (``--no-interleave``: an operation runs to completion
before another starts). BUSY injection follows the policy's allowlist (SPEC §8 ``--busy``) plus
``--inject``. Invariants are checked every ``check_every`` steps; the first violation stops the
storm. After ``steps`` (or ``seconds``) the actors are told to stop and drained, the TD is torn
down and the final invariants and leaks are checked. The result is a :class:`StormReport`.

Same config and seed ⇒ same schedule, same event log, same hash, in any process
(:func:`replay` checks it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from tdxcore.constants import PAGE_SIZE
from tdxcore.errors import InvariantViolation, TdxError, TdxValueError
from tdxcore.invariants import check_invariants
from tdxcore.kvm import Kvm, helpers
from tdxcore.kvm.policy import POLICIES
from tdxcore.module.host import Host
from tdxcore.status import Leaf  # type: ignore[attr-defined]
from tdxcore.storm.actors import ActorState, StormContext, host_actor, make_slot_flags, vcpu_actor
from tdxcore.storm.config import MIXES, ROLES, StormConfig
from tdxcore.storm.scheduler import Scheduler

__all__ = ["StormReport", "run_storm", "replay", "ReplayMismatch", "DRAIN_STEPS"]

#: Bound on the steps taken to drain the actors after the stop flag.
DRAIN_STEPS = 2_000_000


class ReplayMismatch(TdxValueError):
    """A replay's event-log hash differs from the report's."""


@dataclass
class StormReport:
    """What a storm did (SPEC §8): everything ``report.json`` holds, plus the live host."""

    config: StormConfig
    steps: int = 0
    drain_steps: int = 0
    seconds: float = 0.0
    events_digest: int = 0
    state_hash: int = 0
    counters: Dict[str, int] = field(default_factory=dict)
    vm_counters: Dict[str, int] = field(default_factory=dict)
    mixes: Dict[str, int] = field(default_factory=dict)
    seamcalls: Dict[str, int] = field(default_factory=dict)
    invariants_checked: int = 0
    violation: Optional[Dict[str, Any]] = None
    vm_bugged: bool = False
    vm_dead: List[str] = field(default_factory=list)
    leaks: List[Dict[str, Any]] = field(default_factory=list)
    replayable: bool = True
    schedule: List[str] = field(default_factory=list)
    host: Any = None

    @property
    def clean(self) -> bool:
        """No violation, no VM bug, no leak."""
        return self.violation is None and not self.vm_bugged and not self.leaks

    @property
    def nr_events(self) -> int:
        """Events in the host's log."""
        return 0 if self.host is None else len(self.host.events)


def _busy_match(vm: Any, first_try_only: bool) -> Optional[Callable[[Any], bool]]:
    if not first_try_only:
        return None
    # 6.18 survives a BUSY on a zap SEAMCALL's first try only: never while its retry is running
    return lambda call: not vm.wait_for_sept_zap


def _arm_injections(host: Any, vm: Any, cfg: StormConfig) -> None:
    policy = POLICIES[cfg.policy]
    if cfg.busy > 0:
        allow = policy.busy_allowlist()
        per_leaf: Dict[Any, int] = {}
        for leaf, _, _ in allow:
            per_leaf[leaf] = per_leaf.get(leaf, 0) + 1
        for leaf, status, first in allow:
            host.tdx.inject(leaf, status, count=None, probability=cfg.busy / per_leaf[leaf],
                            match=_busy_match(vm, first))
    for leaf_name, status, prob in cfg.inject:
        host.tdx.inject(Leaf[leaf_name], status, count=None, probability=prob)


def _build(cfg: StormConfig) -> Any:
    pages = cfg.area_pages
    host = Host(packages=2, cpus_per_package=max(2, (cfg.vcpus + 1) // 2),
                memory=max(128 << 20, (pages * 4 + 8192) * PAGE_SIZE), tdx_keyids=8, seed=cfg.seed)
    kvm = Kvm(host, policy=POLICIES[cfg.policy], store=cfg.store)
    td = helpers.td_create(kvm, vcpus=cfg.vcpus, memory=pages * PAGE_SIZE, gpa=cfg.gpa, initial_pages=0)
    vm = td.vm
    half = (pages // 2) * PAGE_SIZE
    if pages * PAGE_SIZE > half:
        vm.set_memory_attributes(cfg.gpa + half, pages * PAGE_SIZE - half, 0)
    slot = vm.memslots.id_to_memslot(0, 0)
    assert slot is not None                      # td_create made slot 0 over the area
    ctx = StormContext(host, vm, td.gmem, 0, make_slot_flags(), slot.userspace_addr, cfg.gpa, pages,
                       cfg.ops_per_run)
    return host, kvm, td, ctx


def run_storm(config: Optional[StormConfig] = None, *, progress: Optional[Callable[[int, int], None]] = None,
              schedule: Optional[List[str]] = None,
              before_teardown: Optional[Callable[[Any], None]] = None) -> StormReport:
    """Run one storm and return its report (SPEC §3.5).

    Parameters
    ----------
    config : StormConfig, optional
        Defaults to ``StormConfig()`` (SPEC §8's default storm).
    progress : callable, optional
        ``progress(steps_done, steps_total)`` every 1,000 steps (the CLI's progress bar).
    schedule : list of str, optional
        A recorded schedule (actor names) to force first (shrinking replays a prefix).
    before_teardown : callable, optional
        Called with the TD's VM once the actors are drained, before it is torn down (``--map``).

    Returns
    -------
    StormReport
        ``violation`` is None unless an invariant failed (the storm stopped there).
    """
    cfg = config if config is not None else StormConfig()
    if not isinstance(cfg, StormConfig):
        msg = f"config={cfg!r} must be a StormConfig"
        raise TdxValueError(msg, name="config", value=cfg)
    host, kvm, td, ctx = _build(cfg)
    vm = td.vm
    _arm_injections(host, vm, cfg)
    sched = Scheduler(rng=host.rng("scheduler"))
    states: Dict[str, ActorState] = {}
    for i, v in enumerate(td.vcpus):
        role = ROLES[(i // 2) % len(ROLES)]
        name = f"vcpu{i}.{role}"
        states[name] = ActorState(name)
        sched.add(vcpu_actor(ctx, v, role, host.rng(f"storm.{name}"), states[name]), name)
    for kind, n in MIXES[cfg.mix]:
        for k in range(n):
            name = f"{kind}{k}"
            states[name] = ActorState(name)
            sched.add(host_actor(ctx, kind, host.rng(f"storm.{name}"), states[name]), name)
    rep = StormReport(cfg, host=host)
    t0 = time.perf_counter()
    forced = list(schedule or ())
    current: Optional[Any] = None
    steps = 0

    def check() -> bool:
        rep.invariants_checked += 1
        try:
            check_invariants(host)
        except InvariantViolation as e:
            rep.violation = {"invariant": e.invariant, "message": str(e), "gfn": e.gfn, "pfn": e.pfn,
                             "event_index": e.event_index, "step": steps,
                             "replay": f"tdxcore replay report.json  # seed {cfg.seed}"}
            return False
        return True

    def next_actor() -> Optional[Any]:
        nonlocal current
        if forced:
            return sched.actor(forced.pop(0))
        if not cfg.interleave and current is not None and not current.done \
                and states[current.name].in_op:
            return current
        current = sched.choose()
        return current

    ok = True
    if cfg.threads:
        from tdxcore.storm.threaded import run_threaded

        def stop() -> None:
            ctx.stop = True

        counts = run_threaded(list(sched.actors), steps=cfg.steps, on_budget=stop)
        steps = min(counts["steps"], cfg.steps)
        rep.drain_steps = counts["steps"] - steps
        rep.replayable = False
        ok = check()                               # at quiescence: every thread has stopped
    deadline = None if cfg.seconds is None else t0 + cfg.seconds
    while ok and not cfg.threads:
        if deadline is None:
            if steps >= cfg.steps:
                break
        elif steps % 256 == 0 and time.perf_counter() >= deadline:
            break
        a = next_actor()
        if a is None:
            break
        sched.step(a)
        steps += 1
        if cfg.check_every and steps % cfg.check_every == 0:
            ok = check()
        if progress is not None and steps % 1000 == 0:
            progress(steps, cfg.steps)
    rep.steps = steps
    ctx.stop = True
    drained = rep.drain_steps
    while ok and not cfg.threads:
        a = next_actor()
        if a is None:
            break
        sched.step(a)
        drained += 1
        if cfg.check_every and (steps + drained) % cfg.check_every == 0:
            ok = check()
        if drained > DRAIN_STEPS:
            msg = f"the storm did not drain in {DRAIN_STEPS} steps"
            raise TdxValueError(msg, name="steps", value=steps)
    rep.drain_steps = drained
    rep.schedule = sched.schedule
    rep.seconds = time.perf_counter() - t0
    rep.vm_bugged = vm.is_bugged
    rep.vm_dead = list(ctx.dead)
    rep.mixes = dict(sorted(ctx.counts.items()))
    rep.vm_counters = dict(vm.stats)
    for v in td.vcpus:
        for k, n in v.stats.items():
            rep.vm_counters[k] = rep.vm_counters.get(k, 0) + n
    if before_teardown is not None:
        before_teardown(vm)
    if ok:
        td.close()
        ok = check()
    rep.leaks = [{"pfn": lk.pfn, "what": lk.what, "hkid": lk.hkid, "reason": lk.reason,
                  "event_index": lk.event_index} for lk in host.leaks]
    st = host.stats
    rep.counters = dict(st.as_dict())
    rep.seamcalls = {Leaf(k).name if isinstance(k, int) else str(k): n
                     for k, n in sorted(st.nr_seamcalls.items(), key=lambda kv: int(kv[0]))}
    rep.events_digest = host.events.digest()
    rep.state_hash = host.state_hash()
    return rep


def replay(report: Any) -> StormReport:
    """Re-run a report's storm and check the event-log hash (``ReplayMismatch`` if it differs).

    ``report`` is a :class:`StormReport` or the dict of a ``report.json``.
    """
    if isinstance(report, dict) and report.get("schema") == "tdxcore.explore/1":
        from tdxcore.explore.report import replay_counterexample  # an explorer counterexample

        return replay_counterexample(report)  # type: ignore[no-any-return]
    if isinstance(report, StormReport):
        cfg, digest = report.config, report.events_digest
    elif isinstance(report, dict):
        try:
            cfg = StormConfig.from_dict(report["config"])
            digest = int(str(report["events_digest"]), 0)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, TdxError):
                raise
            msg = f"report is not a storm report.json: {type(e).__name__}: {e}"   # a missing key, bad digest
            raise TdxValueError(msg, name="report", value=sorted(map(str, report))) from None
    else:
        msg = f"report={report!r} must be a StormReport or a report.json dict"
        raise TdxValueError(msg, name="report", value=report)
    if cfg.seconds is not None or cfg.threads:
        msg = "a storm bounded by --seconds or run --threads is not replayable (its schedule is the OS's)"
        raise TdxValueError(msg, name="report", value=cfg.seconds)
    again = run_storm(cfg)
    if again.events_digest != digest:
        msg = f"replay diverged: event digest {again.events_digest:#018x} != {digest:#018x}"
        raise ReplayMismatch(msg, name="report", value=digest)
    return again
