"""A regression guard that does not flake: callgrind instruction counts of fixed micro-operations.

Usage::

    python3 benchmarks/callgrind_guard.py --check          # compare with benchmarks/callgrind/baseline.json
    python3 benchmarks/callgrind_guard.py --update         # re-measure and rewrite the baseline
    python3 benchmarks/callgrind_guard.py --check --only sept_leaf_cycle_4096 --tolerance 0.03

Each operation of :data:`OPS` runs in a child Python under ``valgrind --tool=callgrind
--instr-atstart=no`` with ``PYTHONHASHSEED=0``: the child builds its inputs (seeded), runs the
operation once uninstrumented (warm: lazy imports, caches, first allocations), collects garbage and
disables the collector, then brackets ``repeat`` runs of the operation with callgrind client requests
(``CALLGRIND_START_INSTRUMENTATION`` + ``ZERO_STATS`` … ``DUMP_STATS_AT(name)`` +
``STOP_INSTRUMENTATION``, from a three-function C helper compiled on the fly with ``cc`` against
``valgrind/callgrind.h``). Every operation gets its own interpreter: in one shared process the
teardown's count once came out 8× lower than alone, depending on what had run before it. The guard
reads each dump's ``Ir`` total (instructions executed), so timing noise from other processes does
not enter. An operation may subtract another (``minus``): ``storm_1000_steps`` is a storm of 1,000
steps minus the same storm with 0 steps (the build).

``--check`` exits 1 when an operation costs more than ``(1 + tolerance)`` × its recorded count
(default tolerance 5 %), and prints operations that got cheaper by more than the tolerance (update
the baseline then). ``--profile NAME`` keeps one operation's dump and prints
``callgrind_annotate``'s top functions (C level: the Python layers show as the interpreter loop; use
py-spy or cProfile for those). Counts depend on the machine's CPU features, the Python build and the
numpy / Cython versions, so the baseline records them and ``--check`` warns when they differ.
Opt-in: never run by ``pytest`` (it takes a few minutes); no timing assertion ever goes in
``tests/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "callgrind" / "baseline.json"
SEED = 20261122

# name -> (repeat, minus, description); the setup/op code is in _ops() (built in the child only).
OPS: Dict[str, Tuple[int, Optional[str], str]] = {
    "attr_lookup_ranges_x1000": (1, None, "1,000 seeded point lookups, 4 GiB all-private \"ranges\" store"),
    "attr_lookup_xarray_x1000": (1, None, "1,000 seeded point lookups, 4 GiB all-private \"xarray\" store"),
    "attr_set_range_512_ranges": (100, None, "set_range of 512 gfns (alternating values), \"ranges\""),
    "attr_set_range_512_xarray": (10, None, "set_range of 512 gfns (alternating values), \"xarray\""),
    "attr_set_4k_fragmented": (100, None, "set_range of 1 gfn in a 2^20-run fragmented \"ranges\" store"),
    "sept_leaf_cycle_4096": (1, None, "SeptTree batch AUG/ACCEPT/BLOCK/REMOVE cycle over 4,096 pages"),
    "vcpu_run_bare": (10, None, "vcpu.run of a read of a mapped private page (no fault)"),
    "vcpu_run_private_fault": (10, None, "vcpu.run of a read of a fresh private page (EPT violation, "
                                         "AUG, #VE, ACCEPT)"),
    "storm_0_steps": (1, None, "run_storm(steps=0): building the default storm's host and TD"),
    "storm_1000_steps": (1, "storm_0_steps", "default storm, 1,000 steps, invariants every 1,000, "
                                             "minus its build"),
    "teardown_terminate_1024": (1, None, "terminate-first teardown of a TD with 1,024 private pages"),
}

_HELPER_C = r"""
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void cg_stop(const char *name) { CALLGRIND_DUMP_STATS_AT(name); CALLGRIND_STOP_INSTRUMENTATION; }
int cg_running(void) { return RUNNING_ON_VALGRIND; }
"""


# ------------------------------------------------------------------ the child (under valgrind)
def _ops() -> Dict[str, Tuple[Callable[[], Any], Callable[[Any], Any], Callable[[Any], None]]]:
    """``{name: (setup() -> state, op(state), check(state))}``; imports tdxcore lazily."""
    import numpy as np

    from tdxcore import guest
    from tdxcore._xarray import AttributeStore
    from tdxcore.constants import PAGE_SHIFT, MemAttr

    p = int(MemAttr.PRIVATE)
    keys = np.random.default_rng(SEED).integers(0, 1 << 20, 1000).tolist()
    out: Dict[str, Any] = {}

    def lookup(backend: str) -> Any:
        def setup() -> Any:
            s = AttributeStore(backend)
            s.set_range(0, 1 << 20, p)
            return s

        def op(s: Any) -> None:
            for k in keys:
                s[k]

        return setup, op, lambda s: None

    out["attr_lookup_ranges_x1000"] = lookup("ranges")
    out["attr_lookup_xarray_x1000"] = lookup("xarray")

    def set512(backend: str) -> Any:
        def setup() -> Any:
            s = AttributeStore(backend)
            s.set_range(0, 1 << 20, p)
            return [s, 0]

        def op(st: Any) -> None:
            st[1] ^= p                                   # alternating values: never a no-op store
            st[0].set_range(123 * 512, 124 * 512, st[1])

        return setup, op, lambda st: None

    out["attr_set_range_512_ranges"] = set512("ranges")
    out["attr_set_range_512_xarray"] = set512("xarray")

    def frag_setup() -> Any:
        s = AttributeStore("ranges")
        for g in range(0, 1 << 20, 2):
            s.set_range(g, g + 1, p)
        return [s, 0]

    def frag_op(st: Any) -> None:
        st[1] ^= p
        st[0].set_range(1001, 1002, st[1])

    out["attr_set_4k_fragmented"] = (frag_setup, frag_op, lambda st: None)

    def sept_setup() -> Any:
        import tdxcore._pamt as core_pamt
        import tdxcore._sept as core_sept

        n = 4096
        tree = core_sept.SeptTree(4, core_pamt.Pamt(1 << 20), tdr=0)
        gfns = np.random.default_rng(SEED).permutation(np.arange(n, dtype=np.uint64))
        pages = np.arange(1 << 18, (1 << 18) + n, dtype=np.uint64)
        tree.sept_add_range(0, n, np.arange(1, 1 + 1024, dtype=np.uint64))
        return tree, gfns, pages

    def sept_op(st: Any) -> None:
        tree, gfns, pages = st
        s = tree.page_aug_batch(gfns, pages)
        s |= tree.page_accept_batch(gfns)
        s |= tree.range_block_batch(gfns, 5)
        s |= tree.page_remove_batch(gfns, 6, 0, True)
        assert not s.any()

    out["sept_leaf_cycle_4096"] = (sept_setup, sept_op, lambda st: None)

    base = 4 << 30

    def td_setup(pages: int = 64) -> Any:
        from tdxcore.kvm import Kvm, helpers
        from tdxcore.module.host import Host

        host = Host(packages=1, cpus_per_package=2, memory=64 << 20, seed=SEED)
        td = helpers.td_create(Kvm(host), vcpus=1, memory=pages << PAGE_SHIFT, gpa=base, initial_pages=1)
        td.vcpus[0].run([guest.read(base)])
        return [td, 1]

    def bare_op(st: Any) -> None:
        st[0].vcpus[0].run([guest.read(base)])

    def fault_op(st: Any) -> None:
        st[0].vcpus[0].run([guest.read(base + (st[1] << PAGE_SHIFT))])
        st[1] += 1

    def fault_check(st: Any) -> None:
        assert st[0].vcpus[0].stats["nr_ept_violations"] == st[1] - 1

    out["vcpu_run_bare"] = (td_setup, bare_op, lambda st: None)
    out["vcpu_run_private_fault"] = (td_setup, fault_op, fault_check)

    def storm(steps: int) -> Any:
        from tdxcore.storm import StormConfig, run_storm

        cfg = StormConfig(steps=steps, seed=SEED, check_every=1000)

        def op(_st: Any) -> None:
            rep = run_storm(cfg)
            assert rep.violation is None

        return lambda: None, op, lambda st: None

    out["storm_0_steps"] = storm(0)
    out["storm_1000_steps"] = storm(1000)

    def teardown_setup() -> Any:
        from tdxcore.constants import VmType
        from tdxcore.kvm import Kvm
        from tdxcore.kvm.helpers import td_create
        from tdxcore.module.host import Host

        host = Host(packages=2, cpus_per_package=2, memory=(1024 << PAGE_SHIFT) + (64 << 20), seed=SEED)
        kvm = Kvm(host, terminate_vm=True)
        kvm.create_vm(VmType.TDX).close()
        return [lambda: td_create(kvm, vcpus=2, memory=1024 << PAGE_SHIFT, initial_pages=1024,
                                  measure=False), None, host]

    def teardown_op(st: Any) -> None:
        td = st[1]
        td.vm.terminate_vm()
        for v in td.vcpus:
            v.close()
        td.gmem.close()
        td.vm.close()

    def teardown_check(st: Any) -> None:
        assert st[2].leaks == ()

    out["teardown_terminate_1024"] = (teardown_setup, teardown_op, teardown_check)
    return out


def _child(names: Sequence[str], helper: str) -> int:
    import ctypes
    import gc

    lib = ctypes.CDLL(helper)
    lib.cg_stop.argtypes = [ctypes.c_char_p]
    ops = _ops()
    for name in names:
        repeat = OPS[name][0]
        setup, op, check = ops[name]
        state = setup()
        fresh = name.startswith("teardown")             # one TD per run: a fresh one for warm-up and timed
        if fresh:
            state[1] = state[0]()
        op(state)                                        # warm, uninstrumented
        if fresh:
            state[1] = state[0]()
        gc.collect()
        gc.disable()
        lib.cg_start()
        for _ in range(repeat):
            op(state)
        lib.cg_stop(name.encode())
        gc.enable()
        check(state)
        print(f"measured {name}", flush=True)
    return 0


# ------------------------------------------------------------------ the parent
def _build_helper(tmp: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        msg = "no C compiler (cc) to build the callgrind client-request helper"
        raise RuntimeError(msg)
    src, so = os.path.join(tmp, "cg.c"), os.path.join(tmp, "libcg.so")
    Path(src).write_text(_HELPER_C)
    subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", so, src], check=True)
    return so


_DUMP = re.compile(r"^desc: Trigger: Client Request: (\S+)$", re.M)
_TOTALS = re.compile(r"^(?:totals|summary): (\d+)", re.M)


def _parse(out_dir: str) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for f in sorted(Path(out_dir).glob("callgrind.out*")):
        text = f.read_text(errors="replace")
        m, t = _DUMP.search(text), _TOTALS.search(text)
        if m and t:
            counts[m.group(1)] = int(t.group(1))
    return counts


def _run_child(names: Sequence[str], helper: str, out_dir: str, verbose: bool) -> "subprocess.Popen[str]":
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
           f"--callgrind-out-file={out_dir}/callgrind.out.%p", sys.executable, str(Path(__file__).resolve()),
           "--child", helper, *names]
    out = None if verbose else subprocess.PIPE
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=out, text=True)


def measure(names: Sequence[str], verbose: bool = False, jobs: int = 1,
            keep: Optional[str] = None) -> Dict[str, int]:
    """Run ``names`` (plus what they subtract) under callgrind; return Ir per operation run.

    Each operation runs in its own interpreter (the same fresh state every time: an operation's
    count must not depend on which ran before it in the same process), ``jobs`` at a time. With
    ``keep``, the callgrind dumps stay in ``keep/NAME/`` (for ``callgrind_annotate``).
    """
    if shutil.which("valgrind") is None:
        msg = "valgrind is not installed"
        raise RuntimeError(msg)
    need = list(dict.fromkeys([m for n in names for m in (OPS[n][1], n) if m]))
    with tempfile.TemporaryDirectory(prefix="cg-guard-") as tmp_dir:
        tmp = keep or tmp_dir
        os.makedirs(tmp, exist_ok=True)
        helper = _build_helper(tmp)
        pending, running = list(need), []
        while pending or running:
            while pending and len(running) < max(1, jobs):
                name = pending.pop(0)
                d = os.path.join(tmp, name)
                shutil.rmtree(d, ignore_errors=True)
                os.mkdir(d)
                running.append((name, _run_child([name], helper, d, verbose)))
            name, proc = running.pop(0)
            _, err = proc.communicate()
            if proc.returncode != 0:
                msg = f"callgrind child {name} failed (exit {proc.returncode}):\n{(err or '')[-3000:]}"
                raise RuntimeError(msg)
            if not verbose:
                print(f"  {name}", file=sys.stderr, flush=True)
        raw: Dict[str, int] = {}
        for name in need:
            raw.update(_parse(os.path.join(tmp, name)))
    missing = [n for n in need if n not in raw]
    if missing:
        msg = f"no callgrind dump for {missing}"
        raise RuntimeError(msg)
    out = {}
    for n in names:
        repeat, minus, _ = OPS[n]
        total = raw[n] - (raw[minus] // OPS[minus][0] * repeat if minus else 0)
        out[n] = total // repeat
    return out


def environment() -> Dict[str, str]:
    """Return what the counts depend on: CPU, Python, numpy, Cython, valgrind."""
    import numpy

    try:
        import Cython

        cy = Cython.__version__
    except ImportError:                                  # pragma: no cover - the cores were built with it
        cy = "?"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    vg = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    return {"machine": f"{cpu}, {os.cpu_count()} cores, {platform.machine()}",
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "numpy": numpy.__version__, "cython": cy, "valgrind": vg}


def _table(rows: List[Tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))) for r in rows)


def _profile(name: str, keep: str, verbose: bool) -> int:
    if name not in OPS:
        print(f"callgrind_guard: unknown operation {name!r}; see --list", file=sys.stderr)
        return 2
    try:
        ir = measure([name], verbose, keep=keep)[name]
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"callgrind_guard: {e}", file=sys.stderr)
        return 2
    dumps = [f for f in sorted(Path(keep, name).glob("callgrind.out*"))
             if f"Client Request: {name}" in f.read_text(errors="replace")]
    print(f"{name}: {ir:,} instructions per run; dump {dumps[0] if dumps else '?'}")
    if dumps and shutil.which("callgrind_annotate"):
        out = subprocess.run(["callgrind_annotate", str(dumps[0])],
                             capture_output=True, text=True).stdout
        print("\n".join(out.splitlines()[:60]))
    return 0


def _write_rst(baseline: Path, out: Path) -> int:
    try:
        rec = json.loads(baseline.read_text())
    except (OSError, ValueError) as e:
        print(f"callgrind_guard: cannot read {baseline}: {e}", file=sys.stderr)
        return 2
    env = rec.get("environment", {})
    lines = [f"Recorded {rec.get('recorded', '?')} on {env.get('machine', '?')}, {env.get('python', '?')}, "
             f"numpy {env.get('numpy', '?')}, Cython {env.get('cython', '?')}, {env.get('valgrind', '?')}.",
             "", ".. list-table::", "   :header-rows: 1", "",
             "   * - operation", "     - repeat", "     - instructions per run", "     - what"]
    for name, op in rec.get("ops", {}).items():
        lines += [f"   * - ``{name}``", f"     - {op.get('repeat', 1)}", f"     - {op['ir']:,}",
                  f"     - {op.get('desc', '')}"]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``--check`` (exit 1 on a regression beyond the tolerance) or ``--update``."""
    ap = argparse.ArgumentParser(prog="callgrind_guard.py", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compare with the recorded baseline")
    mode.add_argument("--update", action="store_true", help="re-measure and rewrite the baseline")
    mode.add_argument("--list", action="store_true", help="list the operations")
    mode.add_argument("--rst", metavar="FILE", help="write the recorded baseline as an RST table to FILE")
    mode.add_argument("--profile", metavar="NAME", help="measure NAME, keep its dump in --keep and print "
                                                        "callgrind_annotate's top functions (self cost)")
    ap.add_argument("--keep", metavar="DIR", default="callgrind-profile",
                    help="where --profile keeps the dumps (default ./callgrind-profile)")
    mode.add_argument("--child", metavar="HELPER", help=argparse.SUPPRESS)
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="only this operation")
    ap.add_argument("--tolerance", type=float, default=0.05, help="allowed relative increase (default 0.05)")
    ap.add_argument("--baseline", default=str(BASELINE), help="baseline JSON file")
    ap.add_argument("--jobs", type=int, default=1, help="operations measured at once (default 1)")
    ap.add_argument("--verbose", action="store_true", help="show the child's output")
    ap.add_argument("names", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.names, args.child)
    if args.list:
        for n, (rep, minus, desc) in OPS.items():
            print(f"{n:28s} ×{rep:<4d} {desc}" + (f" (minus {minus})" if minus else ""))
        return 0
    if args.rst:
        return _write_rst(Path(args.baseline), Path(args.rst))
    if args.profile:
        return _profile(args.profile, args.keep, args.verbose)
    names = args.only or list(OPS)
    unknown = [n for n in names if n not in OPS]
    if unknown:
        print(f"callgrind_guard: unknown operation(s) {unknown}; see --list", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        counts = measure(names, args.verbose, args.jobs)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"callgrind_guard: {e}", file=sys.stderr)
        return 2
    env = environment()
    secs = time.perf_counter() - t0
    if args.update:
        old: Dict[str, Any] = {}
        if args.only and Path(args.baseline).is_file():
            old = json.loads(Path(args.baseline).read_text()).get("ops", {})
        ops = {**old, **{n: {"ir": counts[n], "repeat": OPS[n][0], "desc": OPS[n][2]} for n in names}}
        Path(args.baseline).parent.mkdir(parents=True, exist_ok=True)
        Path(args.baseline).write_text(json.dumps(
            {"environment": env, "recorded": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "unit": "instructions (callgrind Ir) per operation run", "pythonhashseed": 0,
             "ops": dict(sorted(ops.items()))}, indent=2) + "\n")
        rows = [("operation", "Ir per run")] + [(n, f"{counts[n]:,}") for n in names]
        print(_table(rows))
        print(f"\nwrote {args.baseline} ({secs:.0f} s)")
        return 0
    try:
        base = json.loads(Path(args.baseline).read_text())
    except (OSError, ValueError) as e:
        print(f"callgrind_guard: cannot read {args.baseline}: {e} (run --update)", file=sys.stderr)
        return 2
    for k, v in env.items():
        if base.get("environment", {}).get(k) != v:
            print(f"warning: {k} differs from the baseline's ({base.get('environment', {}).get(k)!r} "
                  f"recorded, {v!r} now): counts may shift", file=sys.stderr)
    rows = [("operation", "baseline Ir", "now Ir", "change", "verdict")]
    worse = []
    for n in names:
        rec = base.get("ops", {}).get(n)
        if rec is None:
            rows.append((n, "—", f"{counts[n]:,}", "—", "new (run --update)"))
            continue
        change = counts[n] / rec["ir"] - 1
        verdict = "ok"
        if change > args.tolerance:
            verdict = "REGRESSION"
            worse.append(n)
        elif change < -args.tolerance:
            verdict = "faster (update the baseline)"
        rows.append((n, f"{rec['ir']:,}", f"{counts[n]:,}", f"{change:+.1%}", verdict))
    print(_table(rows))
    print(f"\ntolerance {args.tolerance:.0%}; {len(worse)} regression(s) ({secs:.0f} s)")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
