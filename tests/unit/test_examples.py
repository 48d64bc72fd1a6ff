"""Every runnable example under ``examples/`` runs and prints what the extension guide says.

The examples are the extension guide's code (docs/extending.rst; SPEC §3.5): a custom
``Policy`` (the batched-TRACK zap, not upstream), a custom storm actor, and ``register_invariant``.
They run in-process with ``runpy`` as ``__main__``, exactly as ``python3 examples/<name>.py``.
"""

from __future__ import annotations

import contextlib
import io
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str) -> str:
    """Run ``examples/<name>`` as a script; return its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return out.getvalue()


def test_every_example_is_covered():
    """A new example must get a test here."""
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == [
        "batched_policy.py", "custom_actor.py", "custom_invariant.py"]


def test_batched_policy_tracks_once_per_range():
    """6.18 tracks and kicks per page; the batched policy and its subclass once per range."""
    lines = run_example("batched_policy.py").splitlines()
    assert lines[0].split() == ["LINUX_6_18", "RANGE_BLOCK=32", "TRACK=32", "PAGE_REMOVE=32",
                                "PAGE_WBINVD=32", "kicks=32"]
    for line, name in zip(lines[1:], ("BATCHED_TRACK", "QUIET_BATCHED"), strict=True):
        assert line.split() == [name, "RANGE_BLOCK=32", "TRACK=1", "PAGE_REMOVE=32", "PAGE_WBINVD=32",
                                "kicks=1"]


def test_custom_actor_runs_next_to_the_vcpus():
    """The flipper made progress, the vCPUs took exits, invariants held at every step."""
    out = run_example("custom_actor.py")
    assert out.startswith("1500 steps + drain") and "'flips': " in out and "exits" in out


def test_custom_invariant_fires_then_is_removed():
    """X01 passes on a clean TD, fires on the injected leak, and is unregistered afterwards."""
    from tdxcore.invariants import invariant_ids

    lines = run_example("custom_invariant.py").splitlines()
    assert lines[0] == "registered: True - clean TD passes"
    assert lines[1].startswith("violation X01: X01: 1 leaked page(s), first private: TDH.PHYMEM.PAGE.WBINVD")
    assert lines[2] == "unregistered" and "X01" not in invariant_ids()


@pytest.mark.parametrize("name", ["batched_policy.py", "custom_actor.py", "custom_invariant.py"])
def test_example_is_documented(name):
    """Each example opens with a docstring that says how to run it."""
    text = (EXAMPLES / name).read_text()
    assert text.startswith('"""') and f"python3 examples/{name}" in text
