"""The concurrency contract with module-level actors (issue 4 item 5; SPEC §5).

Actors are generators issuing SEAMCALLs through ``host.tdx.seamcall_op`` (begin, a preemption
point while the op holds its try-locks, complete). Under the seeded Scheduler two actors against
one TD really contend: a forced schedule reproduces a conflict exactly, another avoids it, and
the same seed gives the same event log in every process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tdxcore.module.host import Host
from tdxcore.module.td import add_sept_path, build_td
from tdxcore.status import (
    OPERAND_ID_SEPT_TREE,
    TDX_OPERAND_BUSY,
    TDX_SUCCESS,
    Leaf,
)
from tdxcore.storm.scheduler import Scheduler

GPA = 4 << 30


def _setup(seed=0):
    host = Host(seed=seed)
    host.tdx.enable()
    built = build_td(host)
    add_sept_path(host, built.tdr, GPA)
    # A PENDING page at GPA for BLOCK to find; GPA + 4K stays FREE for AUG.
    assert host.tdx.tdh_mem_page_aug(built.tdr, GPA, 0, host.alloc_frame()).status == TDX_SUCCESS
    return host, built


def _block(host, tdr):
    return (yield from host.tdx.seamcall_op(Leaf.TDH_MEM_RANGE_BLOCK, GPA, tdr << 12, actor="block"))


def _aug(host, tdr, page):
    return (yield from host.tdx.seamcall_op(Leaf.TDH_MEM_PAGE_AUG, GPA + 0x1000, tdr << 12, page << 12,
                                            actor="aug"))


def _conflicts(host, since):
    return [e for e in list(host.events)[since:] if e[0] == "lock_conflict"]


def test_forced_schedule_reproduces_the_tree_lock_conflict():
    host, built = _setup()
    n = len(host.events)
    sched = Scheduler(seed=0)
    sched.add(_block(host, built.tdr), name="block")
    sched.add(_aug(host, built.tdr, host.alloc_frame()), name="aug")
    sched.run(["block", "aug", "block"])     # AUG begins while BLOCK holds the tree exclusively
    assert sched.results["aug"].status == TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE
    assert sched.results["block"].status == TDX_SUCCESS
    (conflict,) = _conflicts(host, n)
    assert conflict[1] == "aug" and "block" in conflict and "aug" in conflict
    assert sched.schedule == ["block", "aug", "block"]


def test_other_order_has_no_conflict():
    host, built = _setup()
    n = len(host.events)
    sched = Scheduler(seed=0)
    sched.add(_block(host, built.tdr), name="block")
    sched.add(_aug(host, built.tdr, host.alloc_frame()), name="aug")
    sched.run(["aug", "aug", "block", "block"])
    assert sched.results["aug"].status == TDX_SUCCESS
    assert sched.results["block"].status == TDX_SUCCESS
    assert not _conflicts(host, n)


def test_synchronous_call_is_the_same_operation():
    """seamcall() is begin + complete; seamcall_op only adds the preemption point."""
    a, built_a = _setup()
    b, built_b = _setup()
    ra = a.tdx.seamcall(Leaf.TDH_MEM_RANGE_BLOCK, GPA, built_a.tdr << 12, actor="block")
    gen = _block(b, built_b.tdr)
    next(gen)                                  # in flight: holds the tree lock
    try:
        gen.send(None)
    except StopIteration as stop:
        rb = stop.value
    assert ra == rb
    assert a.state_hash() == b.state_hash()


def _seeded_run(seed):
    host, built = _setup()
    sched = Scheduler(seed=seed)
    for i in range(4):
        sched.add(_aug_at(host, built.tdr, i, host.alloc_frame()), name=f"aug{i}")
    sched.add(_block(host, built.tdr), name="block")
    sched.run()
    return sched.schedule, host.events.digest(), host.state_hash()


def _aug_at(host, tdr, i, page):
    return (yield from host.tdx.seamcall_op(Leaf.TDH_MEM_PAGE_AUG, GPA + ((i + 1) << 12), tdr << 12,
                                            page << 12, actor=f"aug{i}"))


def test_same_seed_same_schedule_and_event_log():
    assert _seeded_run(3) == _seeded_run(3)
    schedules = {tuple(_seeded_run(s)[0]) for s in range(6)}
    assert len(schedules) > 1                  # the seed really chooses the interleaving


def test_same_seed_same_digest_across_processes_and_hash_seeds():
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from tests.storm.test_module_actors import _seeded_run
        sched, digest, state = _seeded_run(5)
        print(digest, state, ",".join(sched))
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    outs = []
    for hs in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=hs)
        outs.append(subprocess.run([sys.executable, "-c", code, root], env=env, capture_output=True,
                                   text=True, check=True).stdout)
    sched, digest, state = _seeded_run(5)
    assert outs[0] == outs[1] == f"{digest} {state} {','.join(sched)}\n"
