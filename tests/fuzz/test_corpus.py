"""Replay every committed corpus file through its fuzz target (the default run; no atheris needed).

A file that fails is a regression of a fixed finding, or a new finding: run it alone with
``python -m tests.fuzz.run TARGET --replay FILE`` to see the traceback. A watchdog turns a hang
into a stack dump and a failed run instead of a stuck suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.common import watchdog
from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"
#: Seconds one corpus file may take before the replay is declared hung (the slowest take < 2 s).
HANG = 120.0


def test_every_target_has_a_corpus():
    """Each target keeps a committed corpus, and no corpus is orphaned."""
    dirs = {p.name for p in CORPUS.iterdir() if p.is_dir()}
    assert dirs == set(TARGETS)
    for name in TARGETS:
        assert any((CORPUS / name).iterdir()), name


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_replays_clean(name):
    """Every file of the target's corpus runs without a finding."""
    files = sorted(p for p in (CORPUS / name).iterdir() if p.is_file())
    fn = TARGETS[name]
    for p in files:
        with watchdog(HANG):
            try:
                fn(p.read_bytes())
            except Exception as e:
                msg = f"{name} corpus file {p.name}: {type(e).__name__}: {e}"
                raise AssertionError(msg) from e
