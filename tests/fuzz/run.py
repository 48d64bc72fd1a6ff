"""Run one fuzz target under atheris (libFuzzer) for a while, and optionally grow its corpus.

Usage (from the repository root)::

    python -m tests.fuzz.run TARGET [--seconds N] [--work DIR] [--merge] [--replay FILE ...]

``TARGET`` is one of ``cores``, ``seamcall``, ``kvm``, ``guest``, ``storm``, ``files``. The fuzzer
starts from ``tests/fuzz/corpus/TARGET`` and writes what it finds to ``--work`` (default
``/tmp/tdxcore-fuzz/TARGET``), so the committed corpus is never flooded; ``--merge`` then
minimises committed + work into the committed directory (libFuzzer ``-merge=1``: only inputs that
add coverage are kept). A crash, a foreign exception or an invariant failure stops the run with a
``crash-*`` file in the work directory; a hang beyond ``--timeout`` seconds is a ``timeout-*`` file.
``--replay FILE`` runs files through the target without atheris (what the default test run does).

Coverage is of the Python code atheris instruments: ``tdxcore`` (its pure-Python layers and the
cores' Python twins in ``tdxcore.reference``) and the targets; the compiled cores are exercised
but not instrumented. The summary line printed at the end — ``FUZZ target=… seconds=… execs=…
cov=… ft=… corpus=…`` — is what ``tests/fuzz/test_fuzz_long.py`` collects.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional, Set, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORPUS = HERE / "corpus"
MAX_LEN = 4096


def _setup_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _fuzz_child(name: str, argv: List[str]) -> None:
    """In the child: instrument tdxcore and the targets, then hand over to libFuzzer."""
    import atheris

    _setup_path()
    with atheris.instrument_imports(include=["tdxcore", "tests.fuzz"]):
        from tests.fuzz.targets import TARGETS
    fn = TARGETS[name]
    atheris.Setup([_launcher(name), *argv], fn)
    atheris.Fuzz()


def _launcher(name: str) -> str:
    """Return an executable that re-enters this child: libFuzzer's ``-merge=1`` re-executes ``argv[0]``."""
    path = Path(tempfile.gettempdir()) / f"tdxcore-fuzz-{name}.sh"
    path.write_text(f"#!/bin/sh\ncd '{ROOT}' && exec '{sys.executable}' -m tests.fuzz.run "
                    f"--child {name} -- \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def _libfuzzer(name: str, argv: List[str], log: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run libFuzzer in a child; its output streams to ``log`` (``tail -f`` it) and is returned."""
    cmd = [sys.executable, "-m", "tests.fuzz.run", "--child", name, "--", *argv]
    with tempfile.TemporaryDirectory() as tmp:
        path = log if log is not None else Path(tmp) / "log"
        with open(path, "w") as fh:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
        text = path.read_text(errors="replace")
    return subprocess.CompletedProcess(cmd, rc, text, "")


def _stats(text: str) -> dict:
    d = {"execs": 0, "cov": 0, "ft": 0, "corpus": 0}
    for m in re.finditer(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", text):
        d.update(execs=int(m[1]), cov=int(m[2]), ft=int(m[3]), corpus=int(m[4]))
    m = re.search(r"stat::number_of_executed_units: (\d+)", text)
    if m:
        d["execs"] = int(m[1])
    return d


def fuzz(name: str, seconds: int, work: Path, *, timeout: int = 60, merge: bool = False,
         jobs_log: Optional[Path] = None) -> dict:
    """Fuzz ``name`` for ``seconds``; return the stats (execs, cov, ft, corpus, rc, crash)."""
    committed = CORPUS / name
    committed.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    argv = [str(work), str(committed), f"-max_total_time={seconds}", f"-timeout={timeout}",
            f"-max_len={MAX_LEN}", "-len_control=0", "-rss_limit_mb=3000", "-print_final_stats=1",
            f"-artifact_prefix={work}/", "-print_pcs=0"]
    old = set(work.glob("crash-*")) | set(work.glob("timeout-*"))
    t0 = time.monotonic()
    out = _libfuzzer(name, argv, jobs_log)
    st = _stats(out.stdout + out.stderr)
    st.update(target=name, seconds=round(time.monotonic() - t0, 1), rc=out.returncode)
    crashes = sorted(str(p) for p in set(work.glob("crash-*")) | set(work.glob("timeout-*")) if p not in old)
    st["crash"] = crashes
    if out.returncode != 0:
        st["tail"] = (out.stdout + out.stderr)[-3000:]
    if merge and out.returncode == 0:
        merge_corpus(name, work)
    return st


def merge_corpus(name: str, work: Path) -> int:
    """Minimise committed + ``work`` into the committed corpus; return its new size."""
    committed = CORPUS / name
    with tempfile.TemporaryDirectory() as tmp:
        out = _libfuzzer(name, ["-merge=1", f"-max_len={MAX_LEN}", "-timeout=60", tmp, str(committed),
                                str(work)])
        if out.returncode != 0:
            sys.stderr.write(out.stdout[-2000:] + out.stderr[-2000:])
            return -1
        if not os.listdir(tmp) and (os.listdir(committed) or os.listdir(work)):
            sys.stderr.write("merge produced no input: the committed corpus is left as it was\n")
            return -1
        # Named inputs (regress-*: a finding's input; seed-*: hand-made seeds) always stay.
        keep = {p.name: p.read_bytes() for p in committed.iterdir()
                if p.name.startswith(("regress-", "seed-"))}
        shutil.rmtree(committed)
        shutil.copytree(tmp, committed)
        for fname, data in keep.items():
            (committed / fname).write_bytes(data)
    return len(os.listdir(committed))


def _lines_of(fn: Any, data: bytes) -> Tuple[Set[Tuple[str, int]], float]:
    """Run ``fn(data)`` once untraced (its time) and once traced; return (tdxcore lines hit, s)."""
    t0 = time.perf_counter()
    with contextlib.suppress(Exception):
        fn(data)
    elapsed = time.perf_counter() - t0
    hit: Set[Tuple[str, int]] = set()
    pkg = str(ROOT / "tdxcore")

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if not frame.f_code.co_filename.startswith(pkg):
            return None
        if event == "line":
            hit.add((frame.f_code.co_filename, frame.f_lineno))
        return tracer

    sys.settrace(tracer)
    try:
        with contextlib.suppress(Exception):
            fn(data)
    finally:
        sys.settrace(None)
    return hit, elapsed


def prune(name: str, budget: float) -> Tuple[int, int, int, float]:
    """Keep the corpus files that cover the most ``tdxcore`` lines within ``budget`` seconds.

    Greedy set cover by new lines per second of replay; ``regress-*`` and ``seed-*`` files always
    stay. Returns (lines covered by the whole corpus, lines covered by what is kept, files kept,
    seconds to replay what is kept). Lines are distinct ``tdxcore`` source lines executed (the
    compiled cores count through their Python twins only in the ``cores`` target).
    """
    _setup_path()
    from tests.fuzz.targets import TARGETS

    fn = TARGETS[name]
    files = sorted(p for p in (CORPUS / name).iterdir() if p.is_file())
    info = {p: _lines_of(fn, p.read_bytes()) for p in files}
    everything = set().union(*(h for h, _ in info.values())) if info else set()
    keep = [p for p in files if p.name.startswith(("regress-", "seed-"))]
    covered: Set[Tuple[str, int]] = set().union(*(info[p][0] for p in keep)) if keep else set()
    spent = sum(info[p][1] for p in keep)
    rest = [p for p in files if p not in keep]
    while rest:
        best = max(rest, key=lambda p: len(info[p][0] - covered) / (info[p][1] + 1e-3))
        gain = len(info[best][0] - covered)
        if gain == 0 or spent + info[best][1] > budget:
            rest.remove(best)
            if gain == 0:
                break
            continue
        keep.append(best)
        covered |= info[best][0]
        spent += info[best][1]
        rest.remove(best)
    # Fill up to half the budget with the largest other inputs (most operations): the same lines
    # with other values — what the compiled cores, which no line count sees, are fed with.
    for p in sorted((p for p in files if p not in keep), key=lambda p: (-p.stat().st_size, p.name)):
        if spent + info[p][1] > budget / 2:
            break
        keep.append(p)
        spent += info[p][1]
    for p in files:
        if p not in keep:
            p.unlink()
    return len(everything), len(covered), len(keep), spent


def replay(name: str, files: List[str]) -> int:
    """Run ``files`` through target ``name`` without atheris; return how many failed."""
    _setup_path()
    from tests.fuzz.targets import TARGETS

    bad = 0
    for p in files:
        try:
            TARGETS[name](Path(p).read_bytes())
        except Exception as e:  # noqa: BLE001 - report every failure, go on with the next file
            bad += 1
            print(f"{p}: {type(e).__name__}: {e}")
    print(f"{len(files) - bad}/{len(files)} ok")
    return bad


def main(argv: Optional[List[str]] = None) -> int:
    """Command line (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        _fuzz_child(argv[1], argv[3:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("target")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--timeout", type=int, default=60, help="seconds one input may take (a hang)")
    ap.add_argument("--merge", action="store_true", help="minimise the corpus into tests/fuzz/corpus")
    ap.add_argument("--replay", nargs="+", default=None, metavar="FILE")
    ap.add_argument("--prune", type=float, default=None, metavar="SECONDS",
                    help="keep the corpus files covering the most lines within SECONDS of replay")
    a = ap.parse_args(argv)
    if a.prune is not None:
        total, kept, n, secs = prune(a.target, a.prune)
        print(f"PRUNE target={a.target} lines_all={total} lines_kept={kept} files={n} replay_s={secs:.2f}")
        return 0
    if a.replay:
        return 1 if replay(a.target, a.replay) else 0
    work = a.work or Path(tempfile.gettempdir()) / "tdxcore-fuzz" / a.target
    st = fuzz(a.target, a.seconds, work, timeout=a.timeout, merge=a.merge, jobs_log=work.with_suffix(".log"))
    print(f"FUZZ target={st['target']} seconds={st['seconds']} execs={st['execs']} cov={st['cov']} "
          f"ft={st['ft']} corpus={st['corpus']} rc={st['rc']} crashes={len(st['crash'])}")
    for c in st["crash"]:
        print(f"  {c}")
    if st.get("tail"):
        print(st["tail"])
    return 0 if st["rc"] == 0 and not st["crash"] else 1


if __name__ == "__main__":
    sys.exit(main())
