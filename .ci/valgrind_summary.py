"""Summarise a valgrind memcheck log: errors by kind, and those attributable to tdxcore.

Usage: ``python3 .ci/valgrind_summary.py LOG``. An error is attributable to tdxcore when a frame
in a tdxcore extension (``tdxcore/_<core>.cpython-*.so``, or a generated core source ``_<core>.c``
/ ``.pyx``) is on its stack before the first interpreter frame (see :func:`attributable`). Prints
one line per kind, the attributable errors in full, and valgrind's ``ERROR SUMMARY`` line last.
Exit status 1 if any error is attributable (or the log has no ERROR SUMMARY).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_PID = re.compile(r"^==\d+== ?")
#: The cores: every tdxcore/_*.pyx (their generated .c carry the same stem).
_CORES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "tdxcore").glob("_*.pyx"))
_TDX = re.compile(r"tdxcore/_[a-z]+\.cpython[^ )]*\.so|\((?:%s)\.(?:c|pyx):\d+\)" % "|".join(_CORES))


def blocks(text: str) -> list[list[str]]:
    """Split a memcheck log into error blocks (consecutive non-empty ``==pid==`` lines)."""
    out: list[list[str]] = []
    cur: list[str] = []
    for raw in text.splitlines():
        line = _PID.sub("", raw)
        if not line.strip():
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(line)
    if cur:
        out.append(cur)
    return out


def attributable(block: list[str]) -> bool:
    """Whether a tdxcore frame is on the stack between the error and the interpreter loop.

    Frames are read innermost first; the first ``_PyEval_EvalFrameDefault`` ends the search, so
    an error inside CPython code that merely runs *under* a tdxcore call (an import started by
    a core's module init, a GC pass during a core's allocation) is CPython's, while an error in
    a core, or in a C API function a core called, is tdxcore's.
    """
    for ln in block[1:]:
        if _TDX.search(ln):
            return True
        if "_PyEval_EvalFrameDefault" in ln:
            return False
    return False


def summarise(text: str) -> tuple[Counter, list[list[str]], str]:
    """Return (kind counts, tdxcore-attributable blocks, the ERROR SUMMARY line)."""
    kinds: Counter = Counter()
    ours: list[list[str]] = []
    m = re.findall(r"ERROR SUMMARY: .*", text)
    summary = m[-1] if m else ""
    for b in blocks(text):
        head = b[0]
        if not any(ln.lstrip().startswith(("at 0x", "by 0x")) for ln in b):
            continue                    # the banner, the heap summary, notes
        kind = re.sub(r"0x[0-9A-Fa-f]+", "X", head)
        kind = re.sub(r"\d+", "N", kind)
        kinds[kind] += 1
        if attributable(b):
            ours.append(b)
    return kinds, ours, summary


def main(argv: list[str]) -> int:
    """Summarise the log named by ``argv[1]``; return the exit status."""
    text = Path(argv[1]).read_text(errors="replace")
    kinds, ours, summary = summarise(text)
    for kind, n in kinds.most_common():
        print(f"valgrind: {n:5d}  {kind}")
    for b in ours:
        print("valgrind: ATTRIBUTABLE TO TDXCORE:\n  " + "\n  ".join(b[:25]))
    print(f"valgrind: {len(ours)} error(s) with a frame in a tdxcore extension")
    print(f"valgrind: {summary or 'no ERROR SUMMARY line (did valgrind run?)'}")
    return 1 if ours or not summary else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
