"""``tdxcore bench`` and ``benchmarks/check_baselines.py`` on small synthetic pytest-benchmark JSON.

No benchmark is timed here (no timing assertion in tests/): the JSON is made up, the plots and the
§9 table are checked for shape, and the check's failure modes (a §9 group missing, a baseline row
missing, an opt-in row absent with its default row present) are exercised.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tdxcore import benchplot
from tdxcore.cli import main

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


cb = _load("check_baselines")
sec9 = sys.modules["sec9"]


def _bench(group: str, param: str, t: float, **extra: Any) -> Dict[str, Any]:
    return {"group": group, "name": f"test_x[{param}]", "param": param, "extra_info": extra,
            "stats": {"min": t, "median": t * 1.1, "mean": t * 1.2, "rounds": 3}}


def _scaling() -> List[Dict[str, Any]]:
    out = []
    for impl, k in (("ranges", 1e-7), ("xarray", 1e-6)):
        for n in (1, 512, 1 << 18):
            out.append(_bench("scaling.set_size", f"{impl}-{n}", k * (1 + n / 512) * 100, series=impl,
                              x=n * 4096, per_round=100, y_kind="time_per_op"))
            out.append(_bench("scaling.memory_size", f"{impl}-{n}", 0.01, series=impl, x=n << 30,
                              per_round=1, y_kind="value", value=320 if impl == "ranges" else 9 * n << 18,
                              extrapolated=impl == "xarray" and n > 512))
            t = 2e-5 * (2 if impl == "xarray" else 1)
            out.append(_bench("scaling.lookup_fragmentation", f"{impl}-{n}", t, series=impl, x=n,
                              per_round=1000, y_kind="time_per_op"))
    for v in (1, 2, 4, 8):
        out.append(_bench("scaling.fault_vcpus", str(v), 0.05 + 0.001 * v, series="faults", x=v,
                          per_round=256, y_kind="rate"))
        out.append(_bench("scaling.storm_vcpus", str(v), 0.2, series="steps", x=v, per_round=2000,
                          y_kind="value", value=20000 - 100 * v, steps=2000))
    for path, k in (("dynamic", 3e-4), ("terminate", 6e-5)):
        for pages in (1024, 2048):
            out.append(_bench("scaling.teardown", f"{path}-{pages}", k * pages, series=path, x=pages << 12,
                              per_round=1, y_kind="time_per_op"))
    return out


def _sec9_rows() -> List[Dict[str, Any]]:
    """Return a subject and a baseline row for the default (last) source of every §9 check."""
    rows: Dict[Any, Dict[str, Any]] = {}
    for row in sec9.ROWS:
        for check in row.checks:
            src = check.sources[-1]
            base_metric = src.baseline_metric or src.metric
            for name, metric in ((src.subject, src.metric), (src.baseline, base_metric)):
                b = rows.setdefault((src.group, name), _bench(src.group, name, 1e-3))
                if isinstance(metric.per, str):
                    b["extra_info"][metric.per] = 1000
                if metric.key:
                    b["extra_info"][metric.key] = 1.0
    return list(rows.values())


def _write(tmp_path: Path, benchmarks: List[Dict[str, Any]], name: str = "b.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "test cpu", "count": 2},
                                              "python_version": "3.11"},
                             "datetime": "2026-11-22T00:00:00", "benchmarks": benchmarks}))
    return p


# ------------------------------------------------------------------ plots
def test_plot_writes_six_valid_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    src = _write(tmp_path, _scaling())
    out = tmp_path / "plots"
    assert main(["bench", "--plot", str(src), "--out", str(out), "--dpi", "40"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(s.file for s in benchplot.PLOTS) and len(files) == 6
    for f in files:
        data = (out / f).read_bytes()
        assert data.startswith(PNG_MAGIC), f
        img = imread(out / f)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200


def test_series_points_reads_extra_info_only():
    data = {"benchmarks": _scaling()}
    pts = benchplot.series_points(data, "scaling.fault_vcpus", "min")
    assert list(pts) == ["faults"] and [p[0] for p in pts["faults"]] == [1, 2, 4, 8]
    assert pts["faults"][0][1] == pytest.approx(256 / 0.051)                   # rate = per_round / min
    mem = benchplot.series_points(data, "scaling.memory_size")
    assert [p[2] for p in mem["xarray"]] == [False, False, True]               # the extrapolated point
    assert benchplot.series_points(data, "scaling.nothing") == {}


def test_plot_missing_group_and_bad_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    part = [b for b in _scaling() if b["group"] == "scaling.storm_vcpus"]
    src = _write(tmp_path, part)
    out = tmp_path / "plots"
    assert main(["bench", "--plot", str(src), "--out", str(out), "--dpi", "40"]) == 1   # 1 drawn, 5 missing
    assert [p.name for p in out.iterdir()] == ["storm_vs_vcpus.png"]
    assert "scaling.teardown" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["bench", "--plot", str(bad), "--out", str(out)]) == 2
    assert main(["bench", "--plot", str(tmp_path / "absent.json")]) == 2


def test_bench_runs_a_suite_then_plots(tmp_path):
    """``tdxcore bench`` without --plot: pytest-benchmark into --json, then the plots."""
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("matplotlib")
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_tiny.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.benchmark(group="scaling.fault_vcpus")
        @pytest.mark.parametrize("v", [1, 2])
        def test_tiny(benchmark, v):
            benchmark.pedantic(sum, args=(range(10),), rounds=2, iterations=1)
            benchmark.extra_info.update(series="faults", x=v, per_round=1, y_kind="rate")
    """))
    js, out = tmp_path / "run.json", tmp_path / "plots"
    rc = main(["bench", "--benchmarks", str(suite), "--json", str(js), "--out", str(out), "--dpi", "40"])
    assert js.is_file() and len(json.loads(js.read_text())["benchmarks"]) == 2
    assert (out / "faults_vs_vcpus.png").read_bytes().startswith(PNG_MAGIC)
    assert rc == 0                                                            # no check script here
    assert main(["bench", "--benchmarks", str(tmp_path / "none")]) == 2


# ------------------------------------------------------------------ check_baselines
def test_check_passes_with_every_row_and_prints_the_table(tmp_path, capsys):
    src = _write(tmp_path, _sec9_rows())
    assert cb.main([str(src)]) == 0
    out = capsys.readouterr().out
    for row in sec9.ROWS:
        assert f"\n{row.id} " in out
    assert "test cpu" in out and "missing" in out
    results = cb.evaluate(cb.load(str(src)))
    assert all(not r.error for r in results)
    assert {r.row.id for r in results} == {r.id for r in sec9.ROWS}


def test_check_fails_when_a_baseline_row_is_missing(tmp_path, capsys):
    rows = [b for b in _sec9_rows() if not (b["group"] == "xarray.set_2m" and b["param"] == "dict")]
    src = _write(tmp_path, rows)
    assert cb.main([str(src)]) == 1
    err = capsys.readouterr().err
    assert "9.2" in err and "baseline row 'dict'" in err


def test_check_fails_when_a_group_is_missing(tmp_path, capsys):
    rows = [b for b in _sec9_rows() if b["group"] != "memory.private_fault"]
    assert cb.main([str(_write(tmp_path, rows))]) == 1
    assert "memory.private_fault" in capsys.readouterr().err


def test_first_source_absent_uses_the_fallback_present_uses_it(tmp_path):
    """A check tries its sources in order: the default run's row stands in for an absent one."""
    (teardown,) = [r for r in sec9.ROWS if r.id == "9.9"]
    first, last = teardown.checks[0].sources[0], teardown.checks[0].sources[-1]
    assert first.group != last.group
    rows = [b for b in _sec9_rows() if b["group"] != first.group]
    rows += [_bench(last.group, last.subject, 1e-3, private_pages=1000),
             _bench(last.group, last.baseline, 5e-3, private_pages=1000)]
    res = {r.row.id: r for r in cb.evaluate(cb.load(str(_write(tmp_path, rows))))}
    assert res["9.9"].source == last and not res["9.9"].error
    rows += [_bench(first.group, first.subject, 1.0, s_64GiB=30.0, extrapolated_64GiB=True,
                    private_pages=16384),
             _bench(first.group, first.baseline, 1.0, s_64GiB=600.0)]
    res = {r.row.id: r for r in cb.evaluate(cb.load(str(_write(tmp_path, rows, "c.json"))))}
    r = res["9.9"]
    assert r.source == first and r.value == 30.0 and r.met and r.ratio == pytest.approx(20.0)
    assert r.measured == "extrapolated from 16,384 pages"
    assert "extrapolated from 16,384 pages" in cb.format_table([r])


def test_check_judges_targets_and_strict(tmp_path):
    rows = _sec9_rows()
    for b in rows:                                    # the subject of 9.1 three times slower than pyroaring
        if b["group"] == "xarray.lookup_uniform" and b["param"] == "ranges":
            b["stats"]["min"] = 3e-3
    src = _write(tmp_path, rows)
    res = [r for r in cb.evaluate(cb.load(str(src))) if r.row.id == "9.1"]
    assert [r.met for r in res] == [False, False] and res[0].ratio == pytest.approx(3.0)
    assert cb.main([str(src)]) == 0 and cb.main([str(src), "--strict"]) == 1
    assert "list-table" in cb.format_table(res, "rst") and cb.format_table(res, "markdown").startswith("| §9")


def test_check_rejects_a_file_that_is_not_benchmark_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("[]")
    assert cb.main([str(p)]) == 2
