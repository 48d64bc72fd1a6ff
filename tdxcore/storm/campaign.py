"""Campaigns: one storm per seed, in local processes or on Dask distributed (SPEC §8, issue 8 item 9).

:func:`run_campaign` runs :func:`~tdxcore.storm.storm.run_storm` for every seed of a range with
the same :class:`~tdxcore.storm.config.StormConfig` keywords, in a
:class:`concurrent.futures.ProcessPoolExecutor` (``workers`` processes) or, with
``scheduler="tcp://host:port"``, on a Dask distributed cluster (the optional ``dask`` extra,
imported only then). Each worker sends back a small dict (:func:`run_seed`), never the host or
its event log, so a campaign of thousands of seeds costs the parent nothing but the table. A
violation's seed plus the config reproduce it exactly (the storm is deterministic per seed and
config): :func:`storm_command` prints the ``tdxcore storm`` line that writes its report, and
``tdxcore replay`` re-runs that report.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

from tdxcore.errors import TdxTypeError, TdxValueError, check_int
from tdxcore.storm.config import StormConfig

__all__ = ["CampaignReport", "run_campaign", "run_seed", "parse_seeds", "storm_command", "DASK_MISSING",
           "run_tasks"]

#: The message when ``--scheduler`` is given but Dask is not installed.
DASK_MISSING = ("Dask distributed is not installed: install the optional extra "
                "(pip install 'tdxcore[dask]') to run a campaign with --scheduler")

Progress = Callable[[int, int, Dict[str, Any]], None]


def parse_seeds(text: str) -> List[int]:
    """Parse ``--seeds``: ``A:B`` (half-open, as ``range(A, B)``), ``N``, or a comma list of both.

    ``0:10`` is seeds 0 to 9. Raises :class:`~tdxcore.errors.TdxValueError` on anything else,
    an empty range, or a repeated seed.
    """
    if not isinstance(text, str):
        msg = f"seeds={text!r} must be a str like 0:10"
        raise TdxTypeError(msg, name="seeds", value=text)
    out: List[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", part)
        if not m:
            msg = f"seeds={text!r}: {part.strip()!r} is not N or A:B (half-open, e.g. 0:10)"
            raise TdxValueError(msg, name="seeds", value=text)
        a = int(m.group(1))
        b = a + 1 if m.group(2) is None else int(m.group(2))
        if b <= a:
            msg = f"seeds={text!r}: the range {part.strip()!r} is empty (A:B is half-open: A < B)"
            raise TdxValueError(msg, name="seeds", value=text)
        out.extend(range(a, b))
    if len(set(out)) != len(out):
        msg = f"seeds={text!r} names a seed twice"
        raise TdxValueError(msg, name="seeds", value=text)
    return out


def storm_command(cfg: StormConfig, report: str = "report.json") -> str:
    """Return the ``tdxcore storm`` command line that reruns ``cfg`` and writes ``report``.

    Options at their SPEC §8 default are left out, except the ones a reader wants to see
    (seed, steps, mix, policy, busy, check-every).
    """
    d = StormConfig()
    parts = ["tdxcore storm", f"--seed {cfg.seed}", f"--steps {cfg.steps}", f"--mix {cfg.mix}",
             f"--policy {cfg.policy}", f"--busy {cfg.busy:g}", f"--check-every {cfg.check_every}"]
    if cfg.vcpus != d.vcpus:
        parts.append(f"--vcpus {cfg.vcpus}")
    if cfg.store != d.store:
        parts.append(f"--store {cfg.store}")
    if not cfg.interleave:
        parts.append("--no-interleave")
    for leaf, status, p in cfg.inject:
        parts.append(f"--inject {leaf}={status:#x}@{p:g}")
    unsupported = [k for k in ("area_pages", "gpa", "ops_per_run") if getattr(cfg, k) != getattr(d, k)]
    if unsupported:
        parts.append(f"# (also {', '.join(f'{k}={getattr(cfg, k)}' for k in unsupported)}: API only)")
    parts.append(f"--report {report}")
    return " ".join(parts)


def run_seed(seed: int, config_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Run one storm of a campaign (in a worker) and return its small, picklable summary.

    Keys: ``seed``, ``clean``, ``violation`` (the report's violation dict or None),
    ``vm_bugged``, ``leaks`` (count), ``events_digest`` (hex str), ``steps`` (storm + drain),
    ``seamcalls`` (total), ``seconds``.
    """
    from tdxcore.storm.storm import run_storm

    cfg = StormConfig(**dict(config_kwargs, seed=seed))
    rep = run_storm(cfg)
    return {"seed": seed, "clean": rep.clean, "violation": rep.violation, "vm_bugged": rep.vm_bugged,
            "leaks": len(rep.leaks), "events_digest": f"{rep.events_digest:#x}",
            "steps": rep.steps + rep.drain_steps,
            "seamcalls": int(rep.counters.get("nr_seamcalls_total", 0)), "seconds": rep.seconds}


@dataclass
class CampaignReport:
    """What a campaign found: one :func:`run_seed` dict per seed, in seed order.

    Attributes
    ----------
    config : dict
        The StormConfig keywords shared by every seed (without ``seed``).
    results : list of dict
        :func:`run_seed` summaries, sorted by seed.
    seconds : float
        Wall time of the whole campaign.
    workers : int
        Local processes (0 when run on Dask).
    scheduler : str or None
        The Dask scheduler address, if any.
    """

    config: Dict[str, Any]
    results: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 0
    scheduler: Optional[str] = None

    @property
    def seeds(self) -> List[int]:
        """Seeds run, ascending."""
        return [r["seed"] for r in self.results]

    @property
    def violations(self) -> List[Dict[str, Any]]:
        """Results whose storm stopped on an invariant violation."""
        return [r for r in self.results if r["violation"] is not None]

    @property
    def bugged(self) -> List[Dict[str, Any]]:
        """Results whose VM hit a KVM_BUG (SERIES_2023 may, by design; see the storm tests)."""
        return [r for r in self.results if r["vm_bugged"]]

    @property
    def ok(self) -> bool:
        """No seed violated an invariant (the campaign's exit status is 0)."""
        return not self.violations

    def storm_config(self, seed: int) -> StormConfig:
        """Return the exact StormConfig of ``seed``'s storm."""
        return StormConfig(**dict(self.config, seed=seed))

    def replay_commands(self, seed: int) -> List[str]:
        """Return the two commands that reproduce ``seed``: the storm writing a report, then the replay."""
        name = f"seed{seed}.json"
        return [storm_command(self.storm_config(seed), name), f"tdxcore replay {name}"]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary (schema ``tdxcore.campaign/1``)."""
        return {"schema": "tdxcore.campaign/1", "config": dict(self.config), "seeds": self.seeds,
                "seconds": round(self.seconds, 6), "workers": self.workers, "scheduler": self.scheduler,
                "results": list(self.results),
                "violations": [{"seed": r["seed"], "invariant": r["violation"]["invariant"],
                                "replay": self.replay_commands(r["seed"])} for r in self.violations]}


def _check_args(seeds: Iterable[int], config_kwargs: Dict[str, Any], workers: int) -> List[int]:
    seeds = list(seeds)
    if not seeds:
        msg = "seeds is empty: give at least one seed"
        raise TdxValueError(msg, name="seeds", value=seeds)
    for s in seeds:
        check_int("seed", s, 0, 1 << 64)
    if not isinstance(config_kwargs, dict):
        msg = f"config_kwargs={config_kwargs!r} must be a dict of StormConfig keywords"
        raise TdxTypeError(msg, name="config_kwargs", value=config_kwargs)
    if "seed" in config_kwargs:
        msg = "config_kwargs must not hold 'seed': the campaign sets it per storm"
        raise TdxValueError(msg, name="config_kwargs", value=config_kwargs["seed"])
    cfg = StormConfig(**dict(config_kwargs, seed=seeds[0]))      # validates every keyword up front
    if cfg.seconds is not None:
        msg = "a campaign cannot bound storms by seconds (not replayable): give steps"
        raise TdxValueError(msg, name="seconds", value=cfg.seconds)
    check_int("workers", workers, 1, 1025)
    return seeds


def run_campaign(seeds: Iterable[int], config_kwargs: Optional[Dict[str, Any]] = None, *, workers: int = 2,
                 scheduler: Any = None, progress: Optional[Progress] = None,
                 on_start: Optional[Callable[[], None]] = None) -> CampaignReport:
    """Run one storm per seed and collect the results (issue 8 item 9).

    Parameters
    ----------
    seeds : iterable of int
        Seeds (e.g. ``range(0, 10)`` or :func:`parse_seeds` of ``"0:10"``).
    config_kwargs : dict, optional
        :class:`StormConfig` keywords shared by every storm, without ``seed`` (validated here,
        before any worker starts). ``seconds`` is refused: a campaign must be replayable.
    workers : int
        Local worker processes (``ProcessPoolExecutor``); ignored with ``scheduler``.
    scheduler : str or distributed.Client, optional
        A Dask scheduler address (``tcp://host:port``) or a live ``Client``: run on Dask
        distributed instead. Dask is imported only then; ``ImportError`` naming the ``dask``
        extra if it is missing.
    progress : callable, optional
        ``progress(done, total, result)`` in the parent after each storm finishes.
    on_start : callable, optional
        Called once every storm is submitted (the CLI starts its progress bar there, after the
        pool has forked).

    Returns
    -------
    CampaignReport
        Results sorted by seed; ``report.ok`` is False when any storm violated an invariant.
    """
    kw = dict(config_kwargs or {})
    seeds = _check_args(seeds, kw, workers)
    t0 = time.perf_counter()
    results = run_tasks(run_seed, [(s, kw) for s in seeds], workers=workers, scheduler=scheduler,
                        progress=progress, on_start=on_start)
    where: Optional[str] = None
    if scheduler is not None:
        where = scheduler if isinstance(scheduler, str) else str(getattr(scheduler, "scheduler", scheduler))
    results.sort(key=lambda r: r["seed"])
    nr_workers = 0 if scheduler is not None else workers
    return CampaignReport(kw, results, time.perf_counter() - t0, nr_workers, where)


def run_tasks(fn: Callable[..., Any], args: List[Any], *, workers: int = 2, scheduler: Any = None,
              progress: Optional[Callable[[int, int, Any], None]] = None,
              on_start: Optional[Callable[[], None]] = None) -> List[Any]:
    """Run ``fn(*a)`` for every tuple ``a`` of ``args`` on the campaign engine; results in ``args`` order.

    The one engine of campaigns (:func:`run_campaign`) and of the explorer's subtrees: a
    ``ProcessPoolExecutor`` of ``workers`` local processes, or, with ``scheduler``, a Dask
    distributed cluster (``ImportError`` naming the ``dask`` extra if it is missing). ``fn``
    must be a picklable top-level function. ``on_start()`` runs once every task is submitted
    (after the pool has forked); ``progress(done, total, result)`` in the parent as each finishes.
    """
    check_int("workers", workers, 1, 1025)
    if not args:
        return []
    out: List[Any] = [None] * len(args)

    def collect(futs: Dict[Any, int], as_completed: Callable[..., Any]) -> None:
        if on_start is not None:
            on_start()
        for n, f in enumerate(as_completed(list(futs)), 1):
            r = out[futs[f]] = f.result()
            if progress is not None:
                progress(n, len(args), r)

    if scheduler is None:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(workers, len(args))) as pool:
            collect({pool.submit(fn, *a): i for i, a in enumerate(args)}, as_completed)
        return out
    try:
        from distributed import Client  # type: ignore[import-not-found, unused-ignore]
        from distributed import as_completed as dask_completed  # type: ignore[import-not-found, unused-ignore]
    except ImportError as e:
        raise ImportError(DASK_MISSING) from e
    own = not isinstance(scheduler, Client)
    client = Client(scheduler) if own else scheduler
    try:
        collect({client.submit(fn, *a, pure=False): i for i, a in enumerate(args)}, dask_completed)
    finally:
        if own:
            client.close()
    return out
