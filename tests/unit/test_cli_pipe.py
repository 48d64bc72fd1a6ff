"""The command line stops quietly when its reader goes away (``tdxcore ... | head``)."""

from __future__ import annotations

import subprocess
import sys


def test_closed_stdout_is_a_quiet_exit_not_a_traceback() -> None:
    """A reader that closed the pipe before the output came gives exit 0 and no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "tdxcore.cli", "explore", "--list"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()                      # before the child (still importing) writes a byte
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0, err.decode(errors="replace")
    assert b"Traceback" not in err and b"BrokenPipeError" not in err
