"""The command line: the demo (the main job until the storm lands) and usage errors."""

from __future__ import annotations

import pytest

from tdxcore.cli import main
from tdxcore.demo import run_demo


def test_demo_runs_and_reports(capsys):
    assert main(["demo", "--pages", "2048", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 MiB conversion to shared" in out and "1536 SEAMCALLs" in out
    assert "leaf cycle" in out


def test_demo_is_deterministic():
    a = dict(run_demo(seed=1, nr_pages=1024).figures)
    b = dict(run_demo(seed=1, nr_pages=1024).figures)
    assert a["S-EPT tree state hash"] == b["S-EPT tree state hash"]
    assert a["fault that raced the conversion retries"] == "True"
    assert a["mmu_invalidate seq / in_progress"] == "1 / 0"
    assert a["frames owned by the TD after the cycle"] == str(1024 // 512 + 2)


@pytest.mark.parametrize("argv", [[], ["demo", "--pages", "0"], ["nope"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
