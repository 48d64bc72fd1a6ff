"""host.tdx.enable() and the SYS leaves: detect, one-time init, sticky ERROR, races, NOT_READY."""

from __future__ import annotations

import errno
import threading

import pytest

from tdxcore import status as st
from tdxcore.constants import PageType
from tdxcore.errors import HostError, TdxTypeError, TdxValueError
from tdxcore.module import BRINGUP_STEPS, Host, ModuleStatus, SeamcallResult, SysState
from tdxcore.module.leaves.sys import TDMR_INIT_PAMT_ENTRIES
from tdxcore.sched import PREEMPT, Actor, Driver
from tdxcore.status import Leaf, TdcallLeaf, TdxStatus

MEM = 64 << 20  # one 1 GiB TDMR, PAMT 1027 frames


def _host(**kw):
    return Host(**{"memory": MEM, **kw})


def _sys_calls(h, leaf):
    return [e for _, e in h.events.filter(kind="seamcall_end", leaf=leaf)]


def test_enable_initializes_once_in_order():
    h = _host()
    assert h.tdx.status == ModuleStatus.UNINITIALIZED
    assert h.tdx.enable() == 0
    assert h.tdx.status == ModuleStatus.INITIALIZED and h.tdx.sys_state == SysState.SYS_READY
    leaves = [e[2] for _, e in h.events.filter(kind="seamcall_begin")]
    nr_chunks = (1 << 30) // (TDMR_INIT_PAMT_ENTRIES * 4096)
    assert leaves == ([33] + [35] * 4 + [45] + [31] * 2 + [36] * nr_chunks)
    assert [e[3] for _, e in h.events.filter(kind="seamcall_begin", leaf=Leaf.TDH_SYS_LP_INIT)] == [0, 1, 2, 3]
    # KEY.CONFIG once per package, on its first CPU
    assert [e[3] for e in _sys_calls(h, Leaf.TDH_SYS_KEY_CONFIG)] == [0, 2]
    steps = [e[2] for _, e in h.events.filter(kind="bringup")]
    assert steps == ["detect", "sys_init", "lp_init", "construct_tdmrs", "config", "key_config",
                     "tdmr_init", "done"]
    assert all(e[4] == 0 for e in _sys_calls(h, Leaf.TDH_SYS_TDMR_INIT))
    # idempotent: no new SEAMCALL
    n = len(h.events)
    assert h.tdx.enable() == 0 and len(h.events) == n


def test_tdmr_and_pamt():
    h = _host()
    free0 = h.free_frames
    h.tdx.enable()
    (t,) = h.tdx.tdmrs
    assert (t.base, t.size, t.last_initialized) == (0, 1 << 30, 1 << 30)
    (pfn, nr), = h.tdx.pamt_frames
    assert nr == 1024 + 2 + 1  # 4K, 2M, 1G levels of a 1 GiB TDMR, each rounded to 4 KiB
    # PAMT frames and the first 1 MiB are PT_RSVD; nothing else
    assert h.pamt.nr_assigned(PageType.PT_RSVD) == nr + 256
    assert all(h.pamt.page_type(p) == PageType.PT_RSVD for p in (0, 255, pfn, pfn + nr - 1))
    assert h.pamt.page_type(pfn + nr) == PageType.PT_NDA
    assert h.free_frames == free0 - nr - 2  # + TDMR_INFO array and entry frames
    assert h.tdx.global_keyid == h.keyids.global_keyid == 32


def test_two_tdmrs_for_two_nodes():
    h = Host(memory=4 << 30)
    h.tdx.enable()
    assert [(t.base, t.size) for t in h.tdx.tdmrs] == [(0, 2 << 30), (2 << 30, 2 << 30)]


# ---------------------------------------------------------------- detect
@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"seamrr": False}, errno.ENODEV, "SEAMRR"),
        ({"tdx_keyids": 1}, errno.ENODEV, r"too few private KeyIDs available \(1\)"),
        ({"tdx_keyids": 0}, errno.ENODEV, "too few"),
        ({"booted_cpus": [0, 1, 3]}, errno.EINVAL, r"never booted: \[2\]"),
    ],
)
def test_detect_failures(kw, err, match):
    h = _host(**kw)
    for _ in range(2):  # no state change: same answer again
        with pytest.raises(HostError, match=match) as ei:
            h.tdx.enable()
        assert ei.value.errno == err
    assert h.tdx.status == ModuleStatus.UNINITIALIZED
    assert h.events.filter(kind="seamcall_begin") == []
    assert h.events[-1][2:5] == ("detect", None, err)


def test_detect_precedence_seamrr_first():
    with pytest.raises(HostError, match="SEAMRR"):
        _host(seamrr=False, tdx_keyids=1, booted_cpus=[0]).tdx.enable()


def test_booting_the_missing_cpu_then_enable_works():
    h = _host(booted_cpus=[0, 1, 2])
    with pytest.raises(HostError):
        h.tdx.enable()
    h.cpu_online(3)
    assert h.tdx.enable() == 0


def test_offline_cpu_at_enable_fails_config():
    h = _host()
    h.cpu_offline(3)
    with pytest.raises(HostError) as ei:
        h.tdx.enable()
    assert ei.value.errno == errno.EIO and "TDX_SYS_CONFIG_NOT_PENDING" in str(ei.value)
    assert h.tdx.status == ModuleStatus.ERROR


# ---------------------------------------------------------------- injected step failures
_STATUS = {
    "sys_init": st.TDX_SYS_BUSY,
    "lp_init": st.TDX_SYS_BUSY,
    "config": st.TDX_INVALID_TDMR,
    "key_config": st.TDX_KEY_GENERATION_FAILED,
    "tdmr_init": st.TDX_SYS_BUSY,
}


@pytest.mark.parametrize("step", BRINGUP_STEPS)
def test_injected_failure_is_sticky_error(step):
    h = _host()
    free0 = h.free_frames
    h.tdx.fail_bringup(step, _STATUS[step])
    with pytest.raises(HostError) as ei:
        h.tdx.enable()
    assert ei.value.errno == errno.EIO and step in str(ei.value)
    assert TdxStatus(_STATUS[step]).name in str(ei.value)
    assert h.tdx.status == ModuleStatus.ERROR
    # PAMT and TDMR_INFO frames returned, PAMT metadata gone
    assert h.free_frames == free0 and h.tdx.pamt_frames == []
    assert h.pamt.nr_assigned(PageType.PT_RSVD) == 0
    assert h.stats.nr_bringup_failures == 1 and h.stats.nr_injected == 1
    n = len(h.events)
    for _ in range(2):  # sticky: fails at once, no SEAMCALL, no retry
        with pytest.raises(HostError, match="failed earlier") as ei2:
            h.tdx.enable()
        assert ei2.value.errno == errno.EINVAL and str(ei.value) in str(ei2.value)
    assert len(h.events) == n


def test_rnd_no_entropy_is_retried_by_sc_retry():
    h = _host()
    h.tdx.fail_bringup("key_config", st.TDX_RND_NO_ENTROPY, count=3)
    assert h.tdx.enable() == 0 and h.stats.nr_sc_retries == 3


def test_rnd_no_entropy_retry_is_bounded():
    h = _host()
    h.tdx.fail_bringup("sys_init", st.TDX_RND_NO_ENTROPY, count=100)
    with pytest.raises(HostError, match="TDX_RND_NO_ENTROPY"):
        h.tdx.enable()
    assert h.stats.nr_sc_retries == 10


def test_pamt_allocation_enomem_is_sticky():
    h = _host()
    while h.free_frames > 500:
        h.alloc_frame()
    with pytest.raises(HostError) as ei:
        h.tdx.enable()
    assert ei.value.errno == errno.ENOMEM and h.tdx.status == ModuleStatus.ERROR
    assert h.free_frames == 500


def test_fail_bringup_bad_input():
    h = _host()
    with pytest.raises(TdxValueError, match="step='boot'"):
        h.tdx.fail_bringup("boot", st.TDX_SYS_BUSY)
    with pytest.raises(TdxValueError, match="TDX_SUCCESS"):
        h.tdx.fail_bringup("config", 0)
    with pytest.raises(TdxValueError, match="count"):
        h.tdx.fail_bringup("config", st.TDX_SYS_BUSY, count=0)
    h.tdx.fail_bringup("config", st.TDX_SYS_BUSY)
    h.tdx.fail_bringup("config", None)  # disarm
    assert h.tdx.enable() == 0


# ---------------------------------------------------------------- concurrency
def test_threads_racing_enable_see_one_init():
    h = _host()
    results, errors = [], []
    barrier = threading.Barrier(8)

    def run():
        barrier.wait()
        try:
            results.append(h.tdx.enable())
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    ts = [threading.Thread(target=run) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == [] and results == [0] * 8
    assert len(h.events.filter(kind="seamcall_begin", leaf=Leaf.TDH_SYS_INIT)) == 1
    assert len(h.events.filter(kind="bringup", actor="tdx_enable")) == 8  # one init's steps


def test_threads_racing_a_failing_enable_see_one_failure():
    h = _host()
    h.tdx.fail_bringup("config", st.TDX_SYS_BUSY)
    errs = []

    def run():
        try:
            h.tdx.enable()
        except HostError as e:
            errs.append(e.errno)

    ts = [threading.Thread(target=run) for _ in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(errs) == sorted([errno.EIO] + [errno.EINVAL] * 5)
    assert len(h.events.filter(kind="seamcall_begin", leaf=Leaf.TDH_SYS_CONFIG)) == 1


def test_generator_path_serializes_on_the_klock():
    h = _host()
    d = Driver()
    a, b = Actor("a", h.tdx.enable_op()), Actor("b", h.tdx.enable_op())
    d.step(a)  # a yields Wait(tdx_module_lock)
    d.step(b)
    d.step(a)  # a takes the lock, runs to the first TDMR.INIT chunk's PREEMPT
    assert h.tdx.module_lock.is_held_by(a, "write") and not d.runnable(b)
    while not a.done:
        d.step(a)
    assert a.result == 0 and d.runnable(b)
    d.step(b)
    assert b.done and b.result == 0
    assert len(h.events.filter(kind="seamcall_begin", leaf=Leaf.TDH_SYS_INIT)) == 1


def test_enable_op_yields_preempt_between_tdmr_chunks():
    h = _host()
    g = h.tdx.enable_op()
    w = next(g)
    owner = object()
    h.tdx.module_lock.try_acquire(owner, w.mode)
    ys = []
    try:
        y = g.send(owner)
        while True:
            ys.append(y)
            y = g.send(None)
    except StopIteration as stop:
        assert stop.value == 0
    assert set(ys) == {PREEMPT} and len(ys) == 256


# ---------------------------------------------------------------- seamcall rules
def test_td_scope_leaf_before_init_is_not_ready():
    h = _host()
    for leaf in (Leaf.TDH_MNG_CREATE, Leaf.TDH_MEM_PAGE_AUG, Leaf.TDH_VP_ENTER, Leaf.TDH_MR_EXTEND,
                 Leaf.TDH_PHYMEM_PAGE_RECLAIM, Leaf.TDH_SYS_TDMR_INIT):
        r = h.tdx.seamcall(leaf, rcx=0x1000)
        assert isinstance(r, SeamcallResult) and r.status == st.TDX_SYS_NOT_READY
    assert h.events[-1][0] == "seamcall_end" and h.events[-1][4] == st.TDX_SYS_NOT_READY


def test_unmodelled_leaf_after_init_raises():
    h = _host()
    h.tdx.enable()
    n = len(h.events)
    with pytest.raises(TdxValueError, match="TDH.MEM.PAGE.DEMOTE is not modelled yet"):
        h.tdx.seamcall(Leaf.TDH_MEM_PAGE_DEMOTE)
    with pytest.raises(TdxValueError, match="not modelled yet"):
        h.tdx.seamcall(Leaf.TDH_SYS_RD)
    assert len(h.events) == n


def test_seamcall_rejects_bad_input():
    h = _host()
    with pytest.raises(TdxTypeError, match="leaf=33"):
        h.tdx.seamcall(33)  # type: ignore[arg-type]
    with pytest.raises(TdxTypeError, match="leaf"):
        h.tdx.seamcall(TdcallLeaf.TDG_MEM_PAGE_ACCEPT)  # type: ignore[arg-type]
    with pytest.raises(TdxValueError, match="rdx"):
        h.tdx.seamcall(Leaf.TDH_SYS_INIT, rdx=1 << 64)
    with pytest.raises(TdxValueError, match="r8"):
        h.tdx.seamcall(Leaf.TDH_SYS_INIT, r8=-1)
    with pytest.raises(TdxValueError, match="cpu=0x9"):
        h.tdx.seamcall(Leaf.TDH_SYS_INIT, cpu=9)
    h.cpu_offline(1)
    with pytest.raises(TdxValueError, match="offline"):
        h.tdx.tdh_sys_lp_init(1)
    with pytest.raises(TdxTypeError, match="actor"):
        h.tdx.seamcall(Leaf.TDH_SYS_INIT, actor=3)  # type: ignore[arg-type]
    assert [e[0] for e in h.events] == ["cpu"]  # the offline only: refused calls log nothing
    assert h.tdx.sys_state == SysState.SYSINIT_PENDING


def test_sys_leaf_order_rules():
    h = _host()
    tdx = h.tdx
    assert tdx.tdh_sys_lp_init(0).status == st.TDX_SYS_LP_INIT_NOT_PENDING
    assert tdx.tdh_sys_config(0, 1, 32).status == st.TDX_SYS_CONFIG_NOT_PENDING
    assert tdx.tdh_sys_key_config(0).status == st.TDX_SYS_KEY_CONFIG_NOT_PENDING
    assert tdx.seamcall(Leaf.TDH_SYS_INIT, rcx=1).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX
    assert tdx.tdh_sys_init().status == st.TDX_SUCCESS
    assert tdx.tdh_sys_init().status == st.TDX_SYS_INIT_NOT_PENDING
    assert tdx.tdh_sys_lp_init(0).status == st.TDX_SUCCESS
    assert tdx.tdh_sys_lp_init(0).status == st.TDX_SYS_LP_INIT_DONE
    # not every LP initialized yet
    assert tdx.tdh_sys_config(0, 1, 32).status == st.TDX_SYS_CONFIG_NOT_PENDING
    for c in (1, 2, 3):
        tdx.tdh_sys_lp_init(c)
    assert tdx.tdh_sys_config(0x1001, 1, 32).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX
    pa = 0x200000
    assert tdx.tdh_sys_config(pa, 0, 32).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RDX
    assert tdx.tdh_sys_config(pa, 65, 32).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RDX
    assert tdx.tdh_sys_config(pa, 1, 31).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_R8
    assert tdx.tdh_sys_config(pa, 1, 64).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_R8
    # the kernel's enable() then fails at SYS.INIT: the module already left SYSINIT_PENDING
    with pytest.raises(HostError, match="TDX_SYS_INIT_NOT_PENDING"):
        tdx.enable()


def test_tdmr_info_validation_by_config():
    import struct

    h = _host()
    tdx = h.tdx
    tdx.tdh_sys_init()
    for c in range(4):
        tdx.tdh_sys_lp_init(c)
    arr, info = h.alloc_frame(), h.alloc_frame()
    h.frame_write(arr, 0, struct.pack("<Q", info << 12), 0)

    def cfg(base, size, pamt4k=0x400000, s4k=4 << 20, rsvd=()):
        hdr = struct.pack("<8Q", base, size, pamt4k + s4k + 8192, 4096, pamt4k + s4k, 8192, pamt4k, s4k)
        h.frame_write(info, 0, (hdr + b"".join(struct.pack("<QQ", *r) for r in rsvd)).ljust(512, b"\0"), 0)
        return tdx.tdh_sys_config(arr << 12, 1, 32).status

    assert cfg(0x1000, 1 << 30) == st.TDX_INVALID_TDMR
    assert cfg(0, 0) == st.TDX_INVALID_TDMR
    assert cfg(0, 1 << 30, s4k=4096) == st.TDX_INVALID_PAMT
    assert cfg(0, 1 << 30, pamt4k=0x400800) == st.TDX_INVALID_PAMT
    assert cfg(0, 1 << 30, rsvd=((0x1001, 4096),)) == st.TDX_INVALID_RESERVED_IN_TDMR
    assert cfg(0, 1 << 30, rsvd=((0x100000, 4096), (0, 4096))) == st.TDX_NON_ORDERED_RESERVED_IN_TDMR
    assert cfg(0, 1 << 30, rsvd=((0, 1 << 20),)) == st.TDX_SUCCESS
    assert tdx.sys_state == SysState.SYSCONFIG_DONE
    assert tdx.tdh_sys_config(arr << 12, 1, 32).status == st.TDX_SYS_CONFIG_NOT_PENDING
    # TDMR.INIT is gated until every package ran KEY.CONFIG
    assert tdx.tdh_sys_tdmr_init(0).status == st.TDX_SYS_NOT_READY
    assert tdx.tdh_sys_key_config(0).status == st.TDX_SUCCESS
    assert tdx.tdh_sys_key_config(1).status == st.TDX_KEY_CONFIGURED  # same package
    assert not tdx.tdh_sys_key_config(1).status.is_error
    assert tdx.tdh_sys_key_config(2).status == st.TDX_SUCCESS and tdx.is_ready
    assert tdx.tdh_sys_tdmr_init(1 << 20).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX
    assert tdx.tdh_sys_tdmr_init(1 << 30).status == st.TDX_OPERAND_INVALID | st.OPERAND_ID_RCX
    r = tdx.tdh_sys_tdmr_init(0)
    assert r.status == st.TDX_SUCCESS and r.rdx == 0 and tdx.tdmrs[0].last_initialized == 4 << 20
    assert h.pamt.page_type(0) == PageType.PT_RSVD and h.pamt.page_type(256) == PageType.PT_NDA
    for _ in range(255):
        r = tdx.tdh_sys_tdmr_init(0)
    assert r.rdx == 1 << 30
    assert tdx.tdh_sys_tdmr_init(0).status == st.TDX_TDMR_ALREADY_INITIALIZED


def test_two_tdmrs_out_of_order_and_pamt_overlap():
    import struct

    h = _host()
    tdx = h.tdx
    tdx.tdh_sys_init()
    for c in range(4):
        tdx.tdh_sys_lp_init(c)
    arr, i0, i1 = h.alloc_frame(), h.alloc_frame(), h.alloc_frame()
    h.frame_write(arr, 0, struct.pack("<2Q", i0 << 12, i1 << 12), 0)

    def put(f, base, pamt4k):
        hdr = struct.pack("<8Q", base, 1 << 30, pamt4k + (4 << 20) + 8192, 4096, pamt4k + (4 << 20), 8192,
                          pamt4k, 4 << 20)
        h.frame_write(f, 0, hdr.ljust(512, b"\0"), 0)

    put(i0, 1 << 30, 0x400000)
    put(i1, 0, 0x1000000)
    assert tdx.tdh_sys_config(arr << 12, 2, 32).status == st.TDX_NON_ORDERED_TDMR | 1
    put(i0, 0, 0x400000)
    put(i1, 1 << 30, 0x400000)
    assert tdx.tdh_sys_config(arr << 12, 2, 32).status == st.TDX_PAMT_OVERLAP | 1


def test_cpu_online_after_sys_init_runs_lp_init():
    h = _host(booted_cpus=[0, 1, 2])
    h.tdx.tdh_sys_init()
    h.tdx.kernel_sysinit_done = True  # as the kernel's tdx_cpu_enable() records it
    h.cpu_online(3)
    assert 3 in h.tdx.lp_initialized
    assert h.events.filter(kind="seamcall_begin", actor="cpuhp")
    h.tdx.fail_bringup("lp_init", st.TDX_SYS_BUSY)
    h.cpu_offline(2)
    h.tdx.kernel_lp_done.pop(2, None)
    h.tdx.lp_initialized.pop(2, None)
    with pytest.raises(HostError) as ei:
        h.cpu_online(2)
    assert ei.value.errno == errno.EIO and not h.is_cpu_online(2)
