"""Event-log exports (tdxcore.trace) and their schemas (tdxcore.schemas).

JSON Lines and the Chrome/Perfetto trace of a small TD run, plus synthetic logs for the
slice-matching rules.
"""

from __future__ import annotations

import json

import pytest

import tdxcore as tdx
from tdxcore import guest, schemas, trace
from tdxcore.constants import MemAttr
from tdxcore.errors import TdxTypeError
from tdxcore.eventlog import EventLog
from tdxcore.kvm import helpers
from tdxcore.module.tdx_module import MODULE_EVENT_KINDS
from tdxcore.status import Leaf, TdcallLeaf

BASE = 4 << 30
MiB = 1 << 20


@pytest.fixture(scope="module")
def run():
    """Build a RUNNABLE TD: 2 MiB private (accepted on touch), a shared page, a conversion."""
    host = tdx.Host(packages=2, cpus_per_package=2, memory=128 << 20, tdx_keyids=8, seed=0)
    t = helpers.td_create(tdx.Kvm(host), vcpus=2, memory=16 * MiB, gpa=BASE, initial_pages=0)
    t.vm.set_memory_attributes(BASE, 2 * MiB, int(MemAttr.PRIVATE))
    t.vm.set_memory_attributes(BASE + 2 * MiB, 2 * MiB, 0)
    t.vcpus[0].run([guest.write(BASE, 1), guest.read(BASE + 4096)])
    t.vcpus[1].run([guest.read(BASE + 8192), guest.read((BASE + 2 * MiB) | (1 << 47))])
    t.vm.set_memory_attributes(BASE, 4096, 0)
    yield host, t
    t.close()


def _synthetic():
    log = EventLog()
    for kind, fields, space in MODULE_EVENT_KINDS:
        log.register_kind(kind, fields, space)
    log.register_kind("vm_bug", ("reason",))
    log.register_kind("kick", ("vcpus_in_guest",))
    aug, z6 = int(Leaf.TDH_MEM_PAGE_AUG), (0,) * 6
    log.emit("seamcall_begin", "punch0", aug, 0, z6, 5, None)                    # 0
    log.emit("lock_conflict", "punch0", ("entry", 5), 0x92, "vm0.vcpu1", "punch0", aug, 5, 9)  # 1
    log.emit("seamcall_abort", "punch0", aug, 0, 7)                              # 2 closes 0
    log.emit("seamcall_begin", "host", aug, 1, z6, 6, None)                      # 3 open to the end
    log.emit("seamcall_begin", "convert", 7, 0, z6, 1, None)                     # 4
    log.emit("seamcall_begin", "convert", 38, 0, z6, None, None)                 # 5
    log.emit("seamcall_end", "convert", 7, 0, 0, z6, 1, 2)                       # 6 closes 4: overlap
    log.emit("seamcall_end", "convert", 38, 0, 0, z6, None, None)                # 7 closes 5
    log.emit("tdcall_end", "vm0.vcpu0", int(TdcallLeaf.TDG_MEM_PAGE_ACCEPT), 0, 0, z6, 1, 2)   # 8 unmatched
    log.emit("kick", "vm0", 2)                                                   # 9
    log.emit("vm_bug", "vm0", "KVM_BUG_ON")                                      # 10
    return log


def test_write_events_round_trips_and_validates(run, tmp_path):
    """JSON Lines from a host or a log: same bytes, same digest, valid."""
    host, _ = run
    p = tmp_path / "ev.jsonl"
    assert trace.write_events(host, p) == len(host.events)
    assert EventLog.from_jsonl(p).digest() == host.events.digest()
    schemas.validate_events_file(p)
    assert trace.write_events(host.events, tmp_path / "b.jsonl") == len(host.events)
    assert (tmp_path / "b.jsonl").read_bytes() == p.read_bytes()
    with pytest.raises(TdxTypeError, match="host_or_log"):
        trace.write_events(object(), p)


def test_trace_of_a_td_run(run, tmp_path):
    """Tracks per actor, VP.ENTER/guest/ACCEPT slices nested, exits as instants, valid."""
    host, _ = run
    obj = trace.chrome_trace(host)
    schemas.validate_trace(obj)
    assert obj["displayTimeUnit"] == "ns" and obj["otherData"]["schema"] == "tdxcore.trace/1"
    assert obj["otherData"]["nr_events"] == len(host.events)
    evs = obj["traceEvents"]
    names = {e["args"]["name"] for e in evs if e["name"] == "thread_name"}
    assert names == {e[1] for e in host.events}
    procs = {e["args"]["name"] for e in evs if e["name"] == "process_name"}
    assert procs == {"host", "vm0"}
    tid = {e["args"]["name"]: e["tid"] for e in evs if e["name"] == "thread_name"}
    for v in ("vm0.vcpu0", "vm0.vcpu1"):
        enters = [e for e in evs if e["ph"] == "X" and e["tid"] == tid[v] and e["name"] == "TDH.VP.ENTER"]
        n_begin = sum(1 for e in host.events if e[0] == "seamcall_begin" and e[1] == v and e[2] == 0)
        assert len(enters) == n_begin > 0
        guests = [e for e in evs if e["ph"] == "X" and e["tid"] == tid[v] and e["name"] == "guest"]
        assert len(guests) == n_begin
        for g in guests:                       # each guest span sits inside one VP.ENTER
            assert any(x["ts"] < g["ts"] and g["ts"] + g["dur"] < x["ts"] + x["dur"] for x in enters)
    accepts = [e for e in evs if e["name"] == "TDG.MEM.PAGE.ACCEPT"]
    assert accepts and all(e["cat"] == "tdcall" and e["dur"] == 1 for e in accepts)
    exits = [e for e in evs if e["ph"] == "i" and e["cat"] == "exit"]
    assert any(e["name"] == "exit EPT_VIOLATION" for e in exits)
    assert all(e["ts"] == e["args"]["index"] for e in evs if e["ph"] == "i")
    assert json.dumps(trace.chrome_trace(host)) == json.dumps(obj)          # deterministic
    p = tmp_path / "t.json"
    assert trace.write_trace(host, p) == len(evs)
    schemas.validate_trace(json.loads(p.read_text()))


def test_trace_slice_rules_on_a_synthetic_log():
    """Abort closes, open edges run to the end, overlaps get a lane."""
    log = _synthetic()
    obj = trace.chrome_trace(log)
    schemas.validate_trace(obj)
    evs = obj["traceEvents"]
    tracks = {e["args"]["name"]: (e["pid"], e["tid"]) for e in evs if e["name"] == "thread_name"}
    assert set(tracks) == {"punch0", "host", "convert", "convert #2", "vm0.vcpu0", "vm0"}
    xs = {(e["name"], e["ts"]): e for e in evs if e["ph"] == "X"}
    aborted = xs[("TDH.MEM.PAGE.AUG", 0)]
    assert aborted["dur"] == 2 and aborted["args"]["aborted"] is True
    assert xs[("TDH.MEM.PAGE.AUG", 3)]["args"]["unterminated"] is True
    assert xs[("TDH.MEM.PAGE.AUG", 3)]["dur"] == len(log) - 3
    block, track = xs[("TDH.MEM.RANGE.BLOCK", 4)], xs[("TDH.MEM.TRACK", 5)]
    assert (block["dur"], track["dur"]) == (2, 2) and block["tid"] != track["tid"]   # overlap → 2 lanes
    inst = {e["name"]: e for e in evs if e["ph"] == "i"}
    assert inst["conflict entry"]["args"]["operand"] == "0x92" and inst["conflict entry"]["s"] == "t"
    assert inst["vm_bug"]["s"] == "g" and inst["vm_bug"]["args"]["reason"] == "KVM_BUG_ON"
    assert "unmatched tdcall_end" in inst and inst["kick"]["args"]["vcpus_in_guest"] == 2


def test_event_args_and_format():
    """Display args: leaf names, hex registers and statuses with names."""
    log = _synthetic()
    a = trace.event_args(log.kinds, log[1])
    assert a["leaf"] == "TDH.MEM.PAGE.AUG" and a["gfn"] == "0x5" and a["holder"] == "vm0.vcpu1"
    big = ("seamcall_end", "h", 6, 0, 0x8000020000000092, (1 << 60,) + (0,) * 5, 1, 2)
    a = trace.event_args(log.kinds, big)
    assert a["status"] == "0x8000020000000092" and a["status_name"].startswith("TDX_OPERAND_BUSY")
    assert trace.event_args(log.kinds, ("mystery", "x", 1 << 60)) == {"fields": ["0x1000000000000000"]}
    line = trace.format_event(log.kinds, 1, log[1])
    assert line.split()[:3] == ["1", "lock_conflict", "punch0"] and "gfn=0x5" in line


def _shifted(obj):
    """Return a copy of the first slice longer than 2, one unit later: it overlaps without nesting."""
    x = next(e for e in obj["traceEvents"] if e["ph"] == "X" and e["dur"] > 2)
    return {**x, "ts": x["ts"] + 1}


@pytest.mark.parametrize(("mutate", "where"), [
    (lambda o: o.pop("traceEvents"), "trace.traceEvents: missing"),
    (lambda o: o["otherData"].update(schema="x/1"), "trace.otherData.schema"),
    (lambda o: o.update(displayTimeUnit="s"), "trace.displayTimeUnit"),
    (lambda o: o["traceEvents"][-1].update(ts=-1), ".ts"),
    (lambda o: next(e for e in o["traceEvents"] if e["ph"] == "X").update(dur="1"), ".dur"),
    (lambda o: o["traceEvents"][-1].update(ph="Q"), ".ph"),
    (lambda o: o["traceEvents"].append({"ph": "i", "name": "x", "pid": 99, "tid": 99, "ts": 0}),
     "no thread_name"),
    (lambda o: o["traceEvents"].append(_shifted(o)), "without nesting"),
])
def test_validate_trace_rejects(mutate, where):
    """Each mutation of a valid trace is rejected naming the bad key."""
    obj = json.loads(json.dumps(trace.chrome_trace(_synthetic())))
    mutate(obj)
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace(".", r"\.")):
        schemas.validate_trace(obj)


@pytest.mark.parametrize(("edit", "where"), [
    (lambda ls: ls.__setitem__(0, ls[0].replace("tdxcore.events/1", "tdxcore.events/0")), "schema"),
    (lambda ls: ls.__setitem__(1, ls[1].replace("seamcall_begin", "nosuchkind")), "line 2.kind"),
    (lambda ls: ls.__setitem__(1, ls[1][:-1] + ",1.5]"), "line 2"),
    (lambda ls: ls.pop(), "nr_events"),
    (lambda ls: ls.__setitem__(3, ls[3].replace("punch0", "punch1", 1)), "digest"),
    (lambda ls: ls.__setitem__(0, "{"), "header"),
])
def test_validate_events_file_rejects(tmp_path, edit, where):
    """Each mutation of a valid events file is rejected naming the bad key."""
    p = tmp_path / "e.jsonl"
    _synthetic().to_jsonl(p)
    lines = p.read_text().splitlines()
    edit(lines)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=where.replace(".", r"\.")):
        schemas.validate_events_file(p)
