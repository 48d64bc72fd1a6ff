"""``long``: fuzz each target under atheris for ``TDXCORE_FUZZ_SECONDS`` (default 60) seconds.

Opt-in (``pytest -m long tests/fuzz``); needs the ``fuzz`` extra (atheris). The run starts from
the committed corpus and writes new inputs to a temporary directory (the committed corpus is only
grown by hand, with ``python -m tests.fuzz.run TARGET --merge``). It prints the run's summary —
execs, libFuzzer's coverage (``cov``: instrumented edges; ``ft``: features) and corpus size —
and fails on a crash, a foreign exception, an invariant failure or a hang.
"""

from __future__ import annotations

import os

import pytest

from tests.fuzz.targets import TARGETS

pytestmark = pytest.mark.long


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz(name, tmp_path):
    """Fuzz one target for the configured time; no finding."""
    pytest.importorskip("atheris")
    from tests.fuzz.run import fuzz

    seconds = int(os.environ.get("TDXCORE_FUZZ_SECONDS", "60"))
    st = fuzz(name, seconds, tmp_path / name, timeout=120, jobs_log=tmp_path / f"{name}.log")
    print(f"\nFUZZ target={name} seconds={st['seconds']} execs={st['execs']} cov={st['cov']} "
          f"ft={st['ft']} corpus={st['corpus']}")
    assert st["rc"] == 0 and not st["crash"], st.get("tail", "") + "\n" + "\n".join(st["crash"])
