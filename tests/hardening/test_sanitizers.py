"""The sanitizer build is instrumented, and valgrind finds nothing in tdxcore (issue 10 part 2).

* Under the normal build the probes of ``tdxcore._probe`` refuse (they would corrupt memory), so
  no test ever performs the bad write in this process.
* ``test_probe_oob_write_aborts_under_asan`` builds ``tdxcore._probe`` alone with
  ``TDXCORE_SANITIZE=1`` (clang, ASan + UBSan) into a copy of the package, then calls
  ``tdxcore._testing.probe_oob_write()`` in a subprocess with the ASan runtime preloaded: the
  process must abort with an AddressSanitizer ``heap-buffer-overflow`` report — proof that the
  sanitizer mode really instruments the cores. The UBSan probe (a shift past the type's width)
  must stop it the same way. Skipped, with the reason, when clang or its runtime is missing.
* ``long``: ``.ci/sanitize`` (every core test and a 2000-step storm under ASan + UBSan), and
  ``.ci/valgrind`` (memcheck on a short storm): no error with a frame in a tdxcore extension.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tdxcore
from tdxcore import _testing
from tdxcore.errors import TdxValueError

ROOT = Path(tdxcore.__file__).resolve().parent.parent
CLANGS = ["clang"] + [f"clang-{v}" for v in range(20, 13, -1)]


def _clang_and_runtime():
    """``(clang, libclang_rt.asan .so)`` or ``(None, reason)``."""
    clang = next((c for c in CLANGS if shutil.which(c)), None)
    if clang is None:
        return None, "no clang (Debian: apt-get install clang-14 libclang-rt-14-dev)"
    rt = subprocess.run([clang, "-print-file-name=libclang_rt.asan-x86_64.so"], capture_output=True,
                        text=True, check=False).stdout.strip()
    if not rt or not Path(rt).is_file():
        return None, f"{clang} has no ASan runtime (install libclang-rt-N-dev)"
    return clang, rt


def test_probes_refuse_under_the_normal_build():
    if _testing.probe_asan():
        pytest.skip("this interpreter imports a sanitized tdxcore._probe")
    with pytest.raises(TdxValueError, match="without AddressSanitizer"):
        _testing.probe_oob_write()
    with pytest.raises(TdxValueError, match="without AddressSanitizer"):
        _testing.probe_ub_shift(32)


@pytest.fixture(scope="module")
def sanitized_probe(tmp_path_factory):
    """A copy of the package whose ``_probe`` is built with ASan + UBSan; ``(dir, env)``."""
    clang, rt = _clang_and_runtime()
    if clang is None:
        pytest.skip(rt)
    out = tmp_path_factory.mktemp("sanitized")
    # The other cores keep their normal build: an instrumented module loads beside them.
    def skip(_dir, names):          # the big generated C of the other cores is not needed
        return [n for n in names if n == "__pycache__" or n.startswith("_probe.cpython")
                or (n.endswith(".c") and n != "_probe.c")]

    shutil.copytree(ROOT / "tdxcore", out / "tdxcore", ignore=skip)
    for f in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, out / f)
    env = dict(os.environ, TDXCORE_SANITIZE="1", TDXCORE_ONLY="_probe", CC=clang)
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=out, env=env,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    run_env = {k: v for k, v in os.environ.items() if k not in ("TDXCORE_SANITIZE", "TDXCORE_ONLY")}
    run_env.update(LD_PRELOAD=rt, ASAN_OPTIONS="detect_leaks=0", PYTHONPATH=str(out),
                   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    return out, run_env


def _run(out, env, code):
    return subprocess.run([sys.executable, "-c", code], cwd=out, env=env, capture_output=True, text=True,
                          check=False, timeout=300)


def test_probe_oob_write_aborts_under_asan(sanitized_probe):
    out, env = sanitized_probe
    r = _run(out, env, "import tdxcore; from tdxcore import _testing as t\n"
                       f"assert tdxcore.__file__.startswith({str(out)!r}), tdxcore.__file__\n"
                       "assert t.probe_asan()\nt.probe_oob_write(16)\nprint('NOT REACHED')")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "NOT REACHED" not in r.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in r.stderr, r.stderr[-3000:]
    assert "tdxcore_probe_poke" in r.stderr and "0 bytes to the right of 16-byte region" in r.stderr


def test_probe_ub_shift_stops_under_ubsan(sanitized_probe):
    out, env = sanitized_probe
    r = _run(out, env, "from tdxcore import _testing as t\nassert t.probe_ub_shift(3) == 8\n"
                       "t.probe_ub_shift(32)\nprint('NOT REACHED')")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "NOT REACHED" not in r.stdout
    assert "runtime error: shift exponent 32 is too large" in r.stderr, r.stderr[-3000:]


@pytest.mark.long
def test_core_tests_and_storm_clean_under_asan_ubsan():
    if _clang_and_runtime()[0] is None:
        pytest.skip(_clang_and_runtime()[1])
    r = subprocess.run([str(ROOT / ".ci" / "sanitize")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    assert "Sanitizer" not in r.stderr, r.stderr[-5000:]


@pytest.mark.long
def test_valgrind_memcheck_storm_nothing_in_tdxcore(tmp_path):
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    log = tmp_path / "valgrind.log"
    r = subprocess.run([str(ROOT / ".ci" / "valgrind"), "200"], capture_output=True, text=True, check=False,
                       env=dict(os.environ, VALGRIND_LOG=str(log)))
    print(r.stdout)
    assert "ERROR SUMMARY:" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "0 error(s) with a frame in a tdxcore extension" in r.stdout, r.stdout
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    text = log.read_text()
    assert "Invalid read" not in text and "Invalid write" not in text, "see " + str(log)
