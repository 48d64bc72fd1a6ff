"""``StormConfig``: every knob of a storm, validated, serializable (SPEC §8).

A config plus its seed fully determines a deterministic storm: :func:`tdxcore.storm.replay`
rebuilds the run from the ``config`` object of a report.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from tdxcore.errors import TdxTypeError, TdxValueError, check_int
from tdxcore.kvm.policy import POLICIES
from tdxcore.status import OPERAND_IDS, STATUS_CODES, Leaf  # type: ignore[attr-defined]

__all__ = ["StormConfig", "MIXES", "ROLES", "parse_inject", "InjectSpec"]

#: Host-actor mixes (A28): each entry is a tuple of (kind, count).
MIXES: Dict[str, Tuple[Tuple[str, int], ...]] = {
    "punch": (("punch", 1), ("madvise", 1)),
    "convert": (("to_private", 1), ("to_shared", 1)),
    "slots": (("slot", 1),),
    "all": (("punch", 2), ("madvise", 2), ("to_private", 2), ("to_shared", 2), ("slot", 1)),
    "none": (),
}
#: vCPU roles of ``tdx_upm_parallel_test``, assigned round-robin in pairs.
ROLES = ("private_accept", "private", "shared", "mmio")

InjectSpec = Tuple[str, int, float]   # (leaf name, status, probability)


def parse_inject(text: str) -> InjectSpec:
    """Parse ``LEAF=STATUS@P`` (``TDH_MEM_PAGE_REMOVE=TDX_OPERAND_BUSY|SEPT_TREE@0.01``).

    LEAF is a :class:`~tdxcore.status.Leaf` name; STATUS a status name, optionally ``|``
    an operand id name, or a number; P a probability in (0, 1].
    """
    m = re.fullmatch(r"\s*([A-Za-z0-9_.]+)\s*=\s*([A-Za-z0-9_|x]+)\s*@\s*([0-9.eE+-]+)\s*", text or "")
    if not m:
        msg = f"inject={text!r} must be LEAF=STATUS@P"
        raise TdxValueError(msg, name="inject", value=text)
    leaf_name, status_text, p_text = m.groups()
    leaf_name = leaf_name.upper().replace(".", "_")
    if not leaf_name.startswith("TDH_"):
        leaf_name = "TDH_" + leaf_name
    if leaf_name not in Leaf.__members__:
        msg = f"inject={text!r}: unknown leaf {leaf_name}"
        raise TdxValueError(msg, name="inject", value=text)
    status = 0
    for part in status_text.split("|"):
        p = part.strip().upper()
        if p.startswith("0X") or p.isdigit():
            status |= int(p, 0)
            continue
        if not p.startswith("TDX_") and ("TDX_" + p) in STATUS_CODES:
            p = "TDX_" + p
        if p in STATUS_CODES:
            status |= int(STATUS_CODES[p])
        elif p in OPERAND_IDS or ("OPERAND_ID_" + p) in OPERAND_IDS:
            status |= int(OPERAND_IDS.get(p, OPERAND_IDS.get("OPERAND_ID_" + p, 0)))
        else:
            msg = f"inject={text!r}: unknown status or operand {part!r}"
            raise TdxValueError(msg, name="inject", value=text)
    try:
        prob = float(p_text)
    except ValueError:
        prob = -1.0
    if not 0.0 < prob <= 1.0:
        msg = f"inject={text!r}: probability must be in (0, 1]"
        raise TdxValueError(msg, name="inject", value=text)
    return (leaf_name, status, prob)


@dataclass(frozen=True)
class StormConfig:
    """What to run (SPEC §8 defaults).

    Attributes
    ----------
    vcpus : int
        vCPU actors (roles assigned in pairs: private+accept, private, shared, shared+MMIO).
    steps : int
        Scheduler steps before the actors are told to stop (then drained to completion).
    seconds : float or None
        Stop after this wall time instead (not replayable: the step count is recorded).
    seed : int
        The one seed (host RNG streams, scheduler, actors' programs).
    mix : str
        Host actors: ``punch`` (punch-hole + madvise), ``convert`` (to-private + to-shared in
        4K steps), ``slots`` (memslot delete/re-add), ``all``, ``none``.
    busy : float
        Probability of each allowlisted BUSY injection of the policy (SPEC §8 ``--busy``).
    inject : tuple
        Extra injections ``(leaf name, status, probability)`` (``--inject``).
    policy : str
        ``LINUX_6_18`` or ``SERIES_2023``.
    store : str
        Attribute store backend.
    interleave : bool
        False (``--no-interleave``): each operation runs to completion before another starts.
    threads : bool
        Threaded mode (``--threads``): one OS thread per actor, invariants at quiescence, not
        replayable.
    check_every : int
        Invariants after every N steps (0: only at the end).
    area_pages : int
        Pages of the shared test area (2 MiB = 512 by default), 2 MiB aligned at ``gpa``.
    gpa : int
        First GPA of the area.
    ops_per_run : int
        Guest ops per KVM_RUN of a vCPU actor (1 .. this, drawn).
    """

    vcpus: int = 8
    steps: int = 20_000
    seconds: Optional[float] = None
    seed: int = 0
    mix: str = "all"
    busy: float = 0.05
    inject: Tuple[InjectSpec, ...] = ()
    policy: str = "LINUX_6_18"
    store: str = "ranges"
    interleave: bool = True
    threads: bool = False
    check_every: int = 1
    area_pages: int = 512
    gpa: int = 4 << 30
    ops_per_run: int = 4

    def __post_init__(self) -> None:
        check_int("vcpus", self.vcpus, 1, 65)
        check_int("steps", self.steps, 0, 1 << 40)
        if self.seconds is not None and (not isinstance(self.seconds, (int, float))
                                         or isinstance(self.seconds, bool) or self.seconds <= 0):
            msg = f"seconds={self.seconds!r} must be a positive number or None"
            raise TdxValueError(msg, name="seconds", value=self.seconds)
        check_int("seed", self.seed, 0, 1 << 64)
        if not isinstance(self.mix, str) or self.mix not in MIXES:     # a list is unhashable
            msg = f"mix={self.mix!r} must be one of {sorted(MIXES)}"
            raise TdxValueError(msg, name="mix", value=self.mix)
        if not isinstance(self.busy, (int, float)) or isinstance(self.busy, bool) or not 0 <= self.busy <= 1:
            msg = f"busy={self.busy!r} must be a probability in [0, 1]"
            raise TdxValueError(msg, name="busy", value=self.busy)
        if not isinstance(self.inject, tuple):
            msg = f"inject={self.inject!r} must be a tuple of (leaf, status, probability)"
            raise TdxTypeError(msg, name="inject", value=self.inject)
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            msg = f"policy={self.policy!r} must be one of {sorted(POLICIES)}"
            raise TdxValueError(msg, name="policy", value=self.policy)
        if self.store not in ("ranges", "xarray"):
            msg = f"store={self.store!r} must be 'ranges' or 'xarray'"
            raise TdxValueError(msg, name="store", value=self.store)
        if not isinstance(self.interleave, bool):
            msg = f"interleave={self.interleave!r} must be a bool"
            raise TdxTypeError(msg, name="interleave", value=self.interleave)
        if not isinstance(self.threads, bool):
            msg = f"threads={self.threads!r} must be a bool"
            raise TdxTypeError(msg, name="threads", value=self.threads)
        if self.threads and not self.interleave:
            msg = "threads=True and interleave=False exclude each other"
            raise TdxValueError(msg, name="threads", value=self.threads)
        check_int("check_every", self.check_every, 0, 1 << 40)
        check_int("area_pages", self.area_pages, 1, (1 << 20) + 1)
        check_int("gpa", self.gpa, 0, 1 << 46)
        if self.gpa & ((2 << 20) - 1):
            msg = f"gpa={self.gpa:#x} must be 2 MiB aligned"
            raise TdxValueError(msg, name="gpa", value=self.gpa)
        check_int("ops_per_run", self.ops_per_run, 1, 1 << 10)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["inject"] = [list(x) for x in self.inject]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "StormConfig":
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        if not isinstance(d, dict):
            msg = f"config={d!r} must be a dict"
            raise TdxTypeError(msg, name="config", value=d)
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - names
        if extra:
            msg = f"config has unknown keys {sorted(extra)}"
            raise TdxValueError(msg, name="config", value=sorted(extra))
        kw = dict(d)
        if "inject" in kw:
            kw["inject"] = tuple((str(a), int(b), float(c)) for a, b, c in kw["inject"])
        return cls(**kw)
