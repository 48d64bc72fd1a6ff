"""The README's Python example runs and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, "README.md", "exec"), {})
        lines = out.getvalue().splitlines()
        assert lines[0].startswith("TDX_EPT_WALK_FAILED|RCX")
        assert lines[1].startswith("TDX_SUCCESS") and lines[2].startswith("TDX_SUCCESS")
        assert lines[3].startswith("TDX_GPA_RANGE_NOT_BLOCKED|RCX")
        assert lines[4] == "8 320"
