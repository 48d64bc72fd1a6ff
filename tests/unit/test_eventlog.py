"""tdxcore.eventlog: append, kinds, filter, digest stability, JSONL round trip."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.eventlog import BASE_KINDS, SCHEMA, EventLog, encode_event
from tdxcore.status import TDX_OPERAND_BUSY, Leaf, TdcallLeaf, TdxStatus


def _sample() -> EventLog:
    log = EventLog()
    log.emit("seamcall_begin", "vcpu0", Leaf.TDH_MEM_PAGE_AUG, 1, (1, 2, 3, 0, 0, 0), 0x10, 0x200)
    log.emit("seamcall_end", "vcpu0", Leaf.TDH_MEM_PAGE_AUG, 1, TdxStatus(TDX_OPERAND_BUSY | 0x92),
             (0, 0, 0, 0, 0, 0), 0x10, 0x200)
    log.emit("lock_conflict", "vcpu1", "sept_tree", 0x92, "zap", "vcpu1", int(Leaf.TDH_MEM_PAGE_AUG), 0x11, None)
    log.emit("bringup", "tdx_enable", "sys_init", 0, 0, "")
    log.emit("cpu", "host", 3, 1, 0)
    log.register_kind("tdcall_begin", ("leaf", "vcpu", "gfn"), "tdcall")
    log.emit("tdcall_begin", "vcpu0", int(TdcallLeaf.TDG_MEM_PAGE_ACCEPT), 0, 0x10)
    return log


def test_emit_returns_index_and_stores_plain_tuple():
    log = EventLog()
    assert log.emit("cpu", "host", 1, 0, 1) == 0
    assert log.emit("cpu", "host", 1, 0, 0) == 1
    assert log[1] == ("cpu", "host", 1, 0, 0)
    assert type(log[0]) is tuple and len(log) == 2
    assert list(log) == [log[0], log[1]]
    assert log[0:1] == [log[0]]


def test_base_kinds_table():
    for k in ("seamcall_begin", "seamcall_end", "lock_conflict", "bringup", "cpu", "leak"):
        assert k in BASE_KINDS


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (("nope", "host"), TdxValueError, "kind='nope'"),
        (("cpu", "host", 1, 2), TdxValueError, "takes 3 fields"),
        (("cpu", 5, 1, 2, 3), TdxTypeError, "actor=5"),
        (("cpu", "host", 1.5, 2, 3), TdxTypeError, "float"),
        (("cpu", "host", [1], 2, 3), TdxTypeError, "list"),
        (("cpu", "host", b"x", 2, 3), TdxTypeError, "bytes"),
    ],
)
def test_emit_rejects_bad_input_without_appending(args, exc, match):
    log = EventLog()
    d = log.digest()
    with pytest.raises(exc, match=match):
        log.emit(*args)
    assert len(log) == 0 and log.digest() == d


def test_register_kind_rules():
    log = EventLog()
    log.register_kind("ioctl", ("nr", "ret"))
    log.register_kind("ioctl", ("nr", "ret"))  # idempotent
    with pytest.raises(TdxValueError, match="already declared"):
        log.register_kind("ioctl", ("nr",))
    with pytest.raises(TdxValueError, match="leaf_space"):
        log.register_kind("x", ("a",), "seamcall")
    with pytest.raises(TdxValueError, match="leaf_space"):
        log.register_kind("y", ("leaf",), "guest")
    with pytest.raises(TdxValueError, match="duplicate"):
        log.register_kind("z", ("a", "a"))
    with pytest.raises(TdxTypeError, match="fields"):
        log.register_kind("w", ["a"])  # type: ignore[arg-type]
    with pytest.raises(TdxTypeError, match="kind"):
        log.register_kind("", ("a",))


def test_filter():
    log = _sample()
    assert [i for i, _ in log.filter(kind="seamcall_end")] == [1]
    assert [i for i, _ in log.filter(actor="vcpu0")] == [0, 1, 5]
    assert [i for i, _ in log.filter(leaf=Leaf.TDH_MEM_PAGE_AUG)] == [0, 1, 2]
    # same number 6, other space: the guest's ACCEPT only
    assert [i for i, _ in log.filter(leaf=TdcallLeaf.TDG_MEM_PAGE_ACCEPT)] == [5]
    assert [i for i, _ in log.filter(gfn=0x10)] == [0, 1, 5]
    assert [i for i, _ in log.filter(pfn=0x200)] == [0, 1]
    assert [i for i, _ in log.filter(gfn=0x10, pfn=0x200, kind="seamcall_begin")] == [0]
    assert log.filter(kind="leak") == []
    with pytest.raises(TdxTypeError, match="leaf=6"):
        log.filter(leaf=6)  # type: ignore[arg-type]
    assert log.field(log[4], "package") == 1
    with pytest.raises(KeyError):
        log.field(log[4], "gfn")


def test_digest_covers_every_field_and_order():
    a, b = _sample(), _sample()
    assert a.digest() == b.digest()
    c = EventLog()
    c.emit("cpu", "host", 3, 1, 0)
    d = EventLog()
    d.emit("cpu", "host", 3, 1, 1)
    assert c.digest() != d.digest()
    e = EventLog()
    e.emit("cpu", "hostx", 3, 1, 0)
    assert e.digest() != c.digest()
    # encoding distinguishes types and nesting
    assert encode_event(("k", "a", "1")) != encode_event(("k", "a", 1))
    assert encode_event(("k", "a", (1, 2))) != encode_event(("k", "a", 1, 2))
    assert encode_event(("k", "a", None)) != encode_event(("k", "a", 0))


def test_jsonl_round_trip(tmp_path):
    log = _sample()
    p = tmp_path / "events.jsonl"
    log.to_jsonl(p)
    lines = p.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["schema"] == SCHEMA and header["nr_events"] == len(log)
    assert header["digest"] == f"{log.digest():#018x}"
    back = EventLog.from_jsonl(p)
    assert list(back) == list(log) and back.digest() == log.digest()
    buf = io.StringIO()
    log.to_jsonl(buf)
    buf.seek(0)
    assert EventLog.from_jsonl(buf).digest() == log.digest()


def test_jsonl_rejects_bad_files(tmp_path):
    log = _sample()
    buf = io.StringIO()
    log.to_jsonl(buf)
    text = buf.getvalue()
    lines = text.splitlines()
    with pytest.raises(TdxValueError, match="schema"):
        EventLog.from_jsonl(io.StringIO(text.replace(SCHEMA, "other/9")))
    with pytest.raises(TdxValueError, match="empty"):
        EventLog.from_jsonl(io.StringIO(""))
    tampered = "\n".join([lines[0]] + [lines[1].replace("vcpu0", "vcpu9")] + lines[2:])
    with pytest.raises(TdxValueError, match="digest"):
        EventLog.from_jsonl(io.StringIO(tampered))
    with pytest.raises(TdxValueError, match="header says"):
        EventLog.from_jsonl(io.StringIO("\n".join(lines[:-1])))
    with pytest.raises(TdxValueError, match="not JSON"):
        EventLog.from_jsonl(io.StringIO(lines[0] + "\n{nope"))
    with pytest.raises(TdxTypeError, match="path_or_file"):
        log.to_jsonl(42)  # type: ignore[arg-type]


_SCRIPT = """
from tests.unit.test_eventlog import _sample
print(_sample().digest())
"""


def test_digest_same_across_processes_and_hash_seeds():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    outs = []
    for seed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=root)
        outs.append(subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, check=True,
                                   capture_output=True, text=True).stdout.strip())
    assert outs[0] == outs[1] == str(_sample().digest())


def test_digest_is_blake2b_of_encode_event():
    import hashlib

    log = _sample()
    h = hashlib.blake2b(digest_size=8, person=b"tdxevents")
    for ev in log:
        h.update(encode_event(ev))
    assert int.from_bytes(h.digest(), "little") == log.digest()
