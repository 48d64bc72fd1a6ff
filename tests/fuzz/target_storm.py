"""Target ``storm``: random ``StormConfig``s (and ``--inject`` texts) run for a few hundred steps.

Every knob is drawn (wrong types and out-of-range values included; ``--inject`` texts are built
from leaf/status/operand names, numbers and junk and go through ``parse_inject``). A config that
validates is run with ``run_storm`` for ≤ 300 steps; an invariant violation is a finding, and so
is a VM bug or a leak when nothing but the policy's own allowlisted BUSY was injected (SPEC §8: a
clean storm ends with no VM bug and no leak). One run in four is replayed: the event digest
must match (determinism). Threaded mode is left out (not replayable; the threads soak covers it).
"""

from __future__ import annotations

from typing import Any, List

from tdxcore.status import OPERAND_IDS, STATUS_CODES, Leaf  # type: ignore[attr-defined]
from tdxcore.storm import StormConfig, replay, run_storm
from tdxcore.storm.config import MIXES, parse_inject

from .common import ALLOWED, Finding
from .fdp import Fdp

MAX_STEPS = 300
LEAF_NAMES = tuple(Leaf.__members__) + ("TDH.MEM.PAGE.AUG", "mem_track", "VP_ENTER", "NOPE", "")
STATUS_NAMES = tuple(STATUS_CODES) + ("OPERAND_BUSY", "0x8000020000000000", "12", "x", "")
OPERAND_NAMES = tuple(OPERAND_IDS) + ("SEPT_TREE", "RCX", "TD_EPOCH", "")


def _inject_text(f: Fdp) -> str:
    if f.u8() >= 240:
        return f.raw(f.int_in(0, 24)).decode("latin-1")
    status = f.pick(STATUS_NAMES)
    if f.bool():
        status += "|" + f.pick(OPERAND_NAMES)
    p = f.pick(("0.01", "0.5", "1", "1.0", "0", "2", "-1", "nan", "1e-9", "inf", "x"))
    return f"{f.pick(LEAF_NAMES)}={status}@{p}"


def _config(f: Fdp) -> StormConfig:
    v = f.value
    inject: List[Any] = []
    for _ in range(f.int_in(0, 2) if f.u8() < 64 else 0):
        inject.append(parse_inject(_inject_text(f)))
    kw = {
        "vcpus": v(f.int_in(1, 8)),
        "steps": v(f.int_in(0, MAX_STEPS)),
        "seed": v(f.uint(2)),
        "mix": v(f.pick(tuple(MIXES) + ("bogus",))),
        "busy": v(f.pick((0.05, 0.0, 0.5, 1.0, 1.5, -0.1))),
        "inject": tuple(inject) if f.u8() < 250 else v(inject),
        "policy": v(f.pick(("LINUX_6_18", "SERIES_2023", "BATCHED", "linux"))),
        "store": v(f.pick(("ranges", "xarray"))),
        "interleave": v(f.u8() < 200),
        "check_every": v(f.pick((1, 0, 7, 50))),
        "area_pages": v(f.pick((512, 16, 1, 64, 513, 1024))),
        "gpa": v(f.pick((4 << 30, 0, 1 << 21, 1 << 30))),
        "ops_per_run": v(f.int_in(1, 8)),
    }
    if f.u8() >= 250:
        kw["seconds"] = v(f.pick((None, 0, -1.0, "1")))     # wall time: only its validation is fuzzed
    if f.u8() >= 250:
        kw["threads"] = v(False)
    cfg = StormConfig(**kw)
    # Bound the work of a config that validates: a legal 2^40-step storm is a long storm, not a bug.
    if (cfg.steps > MAX_STEPS or cfg.vcpus > 8 or cfg.area_pages > 1024 or cfg.seconds is not None
            or cfg.threads):
        raise _Skip
    # busy > 0.5 can livelock the guest on purpose (p = 1: every AUG is BUSY, forever); the storm
    # then gives up after 2,000,000 drain steps with TdxValueError — correct, but ~40 s an input.
    if cfg.busy > 0.5:
        raise _Skip
    return cfg


class _Skip(Exception):
    """A valid config too big (or not replayable) to run inside a fuzz iteration."""


def target(data: bytes) -> None:
    """Fuzz target ``storm`` (see the module docstring)."""
    f = Fdp(data)
    try:
        cfg = _config(f)
    except (_Skip, *ALLOWED):
        return
    except Exception as e:
        msg = f"StormConfig: {type(e).__name__}: {e}"
        raise Finding(msg) from e
    try:
        rep = run_storm(cfg)
    except ALLOWED:
        return      # e.g. an --inject status the leaf cannot return is refused when the storm starts
    except Exception as e:
        msg = f"run_storm({cfg}): {type(e).__name__}: {e}"
        raise Finding(msg) from e
    if rep.violation is not None:
        msg = f"run_storm({cfg}): violation {rep.violation}"
        raise Finding(msg)
    if not cfg.inject and (rep.vm_bugged or rep.leaks):
        msg = (f"run_storm({cfg}): VM bug {rep.vm_bugged} / {len(rep.leaks)} leak(s) with only "
               "allowlisted BUSY")
        raise Finding(msg)
    if f.u8() % 4 == 0:
        try:
            replay(rep)
        except Exception as e:
            msg = f"replay({cfg}): {type(e).__name__}: {e}"
            raise Finding(msg) from e
