"""The event-log tools (``tdxcore events|diff|explain``) and the report schema.

tdxcore.cli_tools and tdxcore.schemas.validate_report on the log of a small TD run; the parser
is built here, as cli.py does.
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest

import tdxcore as tdx
from tdxcore import cli_tools, guest, schemas, trace
from tdxcore.constants import MemAttr
from tdxcore.eventlog import EventLog
from tdxcore.kvm import helpers

BASE = 4 << 30
G = BASE >> 12
MiB = 1 << 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """events.jsonl of a TD run (private accepts, shared access, a conversion) and a report."""
    d = tmp_path_factory.mktemp("tools")
    host = tdx.Host(packages=2, cpus_per_package=2, memory=128 << 20, tdx_keyids=8, seed=0)
    t = helpers.td_create(tdx.Kvm(host), vcpus=2, memory=16 * MiB, gpa=BASE, initial_pages=0)
    t.vm.set_memory_attributes(BASE, 2 * MiB, int(MemAttr.PRIVATE))
    t.vcpus[0].run([guest.write(BASE, 1), guest.read(BASE + 4096)])
    t.vcpus[1].run([guest.read((BASE + 4 * MiB) | (1 << 47))])
    t.vm.set_memory_attributes(BASE, 4096, 0)
    trace.write_events(host, d / "events.jsonl")
    t.close()
    log = EventLog.from_jsonl(d / "events.jsonl")              # the file's events, not later ones
    aug_end = max(i for i, _ in log.filter(kind="seamcall_end", gfn=G))
    pfn = log[aug_end][-1]
    last = len(log) - 1
    report = {
        "schema": "tdxcore.report/1", "config": {"vcpus": 2, "mix": "all"}, "seed": 0, "policy": "LINUX_6_18",
        "steps": 10, "hash": f"{log.digest():#018x}", "events_digest": f"{log.digest():#018x}",
        "counters": dict(host.counters) if hasattr(host, "counters") else {"nr_seamcalls": 1},
        "exits": {"HLT": 2}, "busy": {"SEPT_TREE": {"conflict": 0, "injected": 1}}, "mixes": {"punch": 1},
        "leaks": [], "invariants_checked": 10,
        "violation": {"invariant": "I07", "message": "synthetic", "gfn": G, "pfn": pfn,
                      "event_index": last, "replay": "tdxcore replay report.json"},
        "versions": {"tdxcore": tdx.__version__ if hasattr(tdx, "__version__") else "0"},
        "events_file": "events.jsonl", "trace_file": None,
    }
    (d / "report.json").write_text(json.dumps(report))
    return d, log, report, pfn


def _run(argv):
    parser = argparse.ArgumentParser(prog="tdxcore")
    cli_tools.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _indices(out):
    return [int(line.split()[0]) for line in out.splitlines() if line.strip()]


def test_events_filters(files, capsys):
    """--gfn/--pfn/--kind/--leaf/--actor/--limit select exactly the matching events, in order."""
    d, log, _, pfn = files
    f = str(d / "events.jsonl")
    assert _run(["events", f, "--gfn", hex(G)]) == 0
    got = _indices(capsys.readouterr().out)
    assert got == sorted(got) and got
    expect = {i for i, _ in log.filter(gfn=G)}
    assert expect <= set(got)                                     # every gfn field, plus gpa / ranges
    assert any(log[i][0] == "fault" for i in got) and any(log[i][0] == "set_memory_attributes" for i in got)
    aug_ends = [i for i, _ in log.filter(kind="seamcall_end", gfn=G) if log[i][2] == 6]
    assert aug_ends and all(log[e - 1][0] == "seamcall_begin" and e - 1 in got for e in aug_ends)
    assert _run(["events", f, "--pfn", str(pfn), "--kind", "seamcall_end"]) == 0
    assert _indices(capsys.readouterr().out) == [i for i, _ in log.filter(kind="seamcall_end", pfn=pfn)]
    assert _run(["events", f, "--leaf", "TDG.MEM.PAGE.ACCEPT", "--actor", "vm0.vcpu0"]) == 0
    got = _indices(capsys.readouterr().out)
    assert got and all(log[i][0].startswith("tdcall") and log[i][1] == "vm0.vcpu0" for i in got)
    assert _run(["events", f, "--leaf", "6", "--limit", "3"]) == 0           # bare number: SEAMCALL AUG
    got = _indices(capsys.readouterr().out)
    assert len(got) == 3 and all(log[i][0].startswith("seamcall") for i in got)
    assert _run(["events", f, "--leaf", "tdh_mem_page_aug"]) == 0
    assert len(_indices(capsys.readouterr().out)) > 3
    assert _run(["events", f, "--actor", "nobody"]) == 1
    assert capsys.readouterr().out == ""


def test_parse_leaf():
    """Leaf names in either spelling, space prefixes and bare numbers (SEAMCALL space)."""
    assert cli_tools.parse_leaf("TDH.MEM.PAGE.AUG") == ("seamcall", 6)
    assert cli_tools.parse_leaf("tdcall:6") == ("tdcall", 6)
    assert cli_tools.parse_leaf("0x26") == ("seamcall", 38)
    assert cli_tools.parse_leaf("TDG_MEM_PAGE_ACCEPT") == ("tdcall", 6)
    for bad in ("TDH.NOPE", "tdcall:x"):
        with pytest.raises(cli_tools.ToolError):
            cli_tools.parse_leaf(bad)


def test_errors_exit_2(files, tmp_path, capsys):
    """Unreadable files, foreign schemas and bad option values: one stderr line, status 2."""
    d = files[0]
    assert _run(["events", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "junk.jsonl").write_text('{"schema": "other/1"}\n')
    assert _run(["diff", str(tmp_path / "junk.jsonl"), str(d / "events.jsonl")]) == 2
    assert "not a tdxcore event log" in capsys.readouterr().err
    assert _run(["events", str(d / "events.jsonl"), "--leaf", "BOGUS"]) == 2
    assert "--leaf" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:                 # argparse's own usage error is status 2 too
        _run(["events", str(d / "events.jsonl"), "--gfn", "zz"])
    assert ei.value.code == 2


def test_diff(files, tmp_path, capsys):
    """Identical logs exit 0; a changed event or a shorter log is reported at its index, exit 1."""
    d, log, _, _ = files
    a = str(d / "events.jsonl")
    assert _run(["diff", a, a]) == 0
    assert capsys.readouterr().out.startswith(f"identical: {len(log)} events")
    evs = list(log)
    k = len(evs) // 2
    ev = list(evs[k])
    ev[1] = ev[1] + "x"
    changed = EventLog.from_events([])
    for kind, (fields, space) in log.kinds.items():
        if kind not in changed.kinds:
            changed.register_kind(kind, fields, space)
    for i, e in enumerate(evs):
        changed.emit(*(tuple(ev) if i == k else e))
    changed.to_jsonl(tmp_path / "b.jsonl")
    assert _run(["diff", a, str(tmp_path / "b.jsonl")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"first divergence at event {k} ")
    assert out[1].startswith(f"  A: {k} {evs[k][0]} {evs[k][1]} ")
    assert out[2].startswith(f"  B: {k} {ev[0]} {ev[1]} ")
    short = EventLog()
    for kind, (fields, space) in log.kinds.items():
        if kind not in short.kinds:
            short.register_kind(kind, fields, space)
    for e in evs[:k]:
        short.emit(*e)
    short.to_jsonl(tmp_path / "s.jsonl")
    assert _run(["diff", str(tmp_path / "s.jsonl"), a]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"first divergence at event {k}: B goes on") and out[2].endswith("(end of log)")


def test_explain(files, tmp_path, capsys):
    """Every event touching the gfn or frame up to the violation's event, which is marked."""
    d, log, report, pfn = files
    assert _run(["explain", str(d / "report.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "violation I07: synthetic" and "replay: tdxcore replay report.json" in out[2]
    rows = [line for line in out[3:-1]]
    idx = [int(line[2:].split()[0]) for line in rows]
    assert idx == sorted(idx) and idx[-1] == report["violation"]["event_index"] and rows[-1].startswith(">")
    touched = {i for i, _ in log.filter(gfn=G)} | {i for i, _ in log.filter(pfn=pfn)}
    assert touched <= set(idx)
    # up to and including event_index only; a gfn-only violation
    rep = copy.deepcopy(report)
    first_aug = min(i for i, _ in log.filter(kind="seamcall_end", gfn=G))
    rep["violation"].update(event_index=first_aug, pfn=None)
    rep["events_file"] = str(d / "events.jsonl")                  # absolute path works too
    (tmp_path / "r.json").write_text(json.dumps(rep))
    assert _run(["explain", str(tmp_path / "r.json")]) == 0
    idx2 = [int(line[2:].split()[0]) for line in capsys.readouterr().out.splitlines()[3:-1]]
    assert idx2[-1] == first_aug and set(idx2) <= set(idx)


@pytest.mark.parametrize(("patch", "msg"), [
    ({"violation": None}, "no violation"),
    ({"events_file": None}, "no events_file"),
    ({"events_file": "nope.jsonl"}, "cannot read"),
    ({"violation": {"invariant": "I01", "message": "m", "gfn": -1, "pfn": None, "event_index": 0,
                    "replay": "r"}}, "violation.gfn"),
    ({"violation": {"invariant": "I01", "message": "m", "gfn": 1, "pfn": None, "event_index": 10 ** 9,
                    "replay": "r"}}, "event_index"),
])
def test_explain_errors(files, tmp_path, capsys, patch, msg):
    """A report without violation or events file, or with bad indices: status 2."""
    d, _, report, _ = files
    rep = {**report, **patch}
    if rep["events_file"] == "events.jsonl":
        rep["events_file"] = str(d / "events.jsonl")
    (tmp_path / "r.json").write_text(json.dumps(rep))
    assert _run(["explain", str(tmp_path / "r.json")]) == 2
    assert msg in capsys.readouterr().err


def test_validate_report_accepts(files):
    """The report of the TD run (and its variants: no violation, leak count) is valid."""
    d = files[0]
    schemas.validate_report(json.loads((d / "report.json").read_text()))
    rep = json.loads((d / "report.json").read_text())
    rep.update(violation=None, leaks=0, extra_key={"ok": 1})
    schemas.validate_report(rep)


@pytest.mark.parametrize(("mutate", "where"), [
    (lambda r: r.update(schema="tdxcore.report/2"), "report.schema"),
    (lambda r: r.pop("seed"), "report.seed: missing"),
    (lambda r: r.update(steps=-1), "report.steps"),
    (lambda r: r.update(hash=12), "report.hash"),
    (lambda r: r.update(events_digest="0xZZ"), "report.events_digest"),
    (lambda r: r["counters"].update(x="1"), "report.counters.x"),
    (lambda r: r["busy"]["SEPT_TREE"].update(conflict=None), "report.busy.SEPT_TREE.conflict"),
    (lambda r: r.update(mixes=[]), "report.mixes"),
    (lambda r: r.update(leaks="none"), "report.leaks"),
    (lambda r: r.pop("invariants_checked"), "report.invariants_checked"),
    (lambda r: r["violation"].pop("replay"), "report.violation.replay"),
    (lambda r: r["violation"].update(event_index="3"), "report.violation.event_index"),
    (lambda r: r.update(violation=[]), "report.violation"),
    (lambda r: r["versions"].update(numpy=2), "report.versions.numpy"),
    (lambda r: r.update(trace_file=1), "report.trace_file"),
    (lambda r: r.pop("events_file"), "report.events_file"),
    (lambda r: r.update(policy=None), "report.policy"),
    (lambda r: r.update(config=None), "report.config"),
])
def test_validate_report_rejects(files, mutate, where):
    """Each mutation is rejected with the bad key's path in the message."""
    rep = copy.deepcopy(files[2])
    mutate(rep)
    with pytest.raises(ValueError, match=where.replace(".", r"\.")):
        schemas.validate_report(rep)
    with pytest.raises(ValueError, match="report: list"):
        schemas.validate_report([])
