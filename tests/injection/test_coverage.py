"""Injection coverage (issue 10 part 3): every status of every SEAMCALL KVM issues, at every call site.

Each case of :func:`tests.injection.outcomes.cases` builds a fresh TD up to its call site, arms
``host.tdx.inject(leaf, status, count, match)``, runs the site's user-visible operation and checks
the outcome 6.18 KVM has for it (``outcomes.RULES``): the errno userspace gets, whether the VM is
bugged, KVM_RUN's exit, ``hw_error``, that a retried call really was issued again; then
``check_invariants``; then it destroys the VM and checks the invariants again, that the
deliberate leaks recorded are exactly the expected kinds, and that every host frame is free or
recorded as leaked (S6c).
"""

from __future__ import annotations

import pytest

from tdxcore.invariants import check_invariants
from tests.injection.outcomes import (
    ALWAYS,
    COUNTS,
    KVM_LEAVES,
    ONCE,
    RULES,
    SITES,
    TWICE,
    Case,
    cases,
)
from tests.injection.scenarios import DRIVERS

CASES = cases()


def _calls(host, leaf) -> int:
    return int(host.stats.nr_seamcalls.get(int(leaf), 0))


def run_case(case: Case) -> None:
    """Inject ``case`` at its site and check everything its outcome says (see the module docstring)."""
    out = case.rule.outcome
    env = DRIVERS[case.site](case.leaf)
    host, vm = env.host, env.vm
    n0 = _calls(host, case.leaf)
    h = host.tdx.inject(case.leaf, case.status, count=COUNTS[case.mode], match=env.match)
    obs = env.trigger()
    n = _calls(host, case.leaf) - n0
    fired = h.nr_fired
    host.tdx.injector.clear()
    vm = vm if vm is not None else env.vm
    check_invariants(host)
    want_fired = {ONCE: 1, TWICE: 2}.get(case.mode)
    assert fired >= 1, f"the site never issued {case.leaf.name}"
    if want_fired is not None:
        assert fired == want_fired, (fired, n)
    assert obs.errno == out.errno, (obs, out)
    if out.exit_reason is not None:
        assert obs.exit_reason == out.exit_reason, obs
    assert vm.last_hw_error == (case.status if out.hw_error else env.hw_error), hex(vm.last_hw_error)
    if out.retried:
        assert n > fired, f"{case.leaf.name} was not issued again after the injected status"
    if env.runs and obs.errno is None and out.exit_reason is None:
        assert obs.exit_reason == "HLT", obs          # the guest's write completed
    if env.zap_pfn is not None and not out.leaks:
        assert host.pamt.page_type(env.zap_pfn) == 0, "the zapped page is still the TD's"
    assert not vm.wait_for_sept_zap
    env.teardown()
    check_invariants(host)
    assert vm.is_bugged == out.bugged, vm.bug_reason
    assert {lk.what for lk in host.leaks} == set(out.leaks), [(lk.what, lk.reason) for lk in host.leaks]
    assert host.free_frames + sum(1 for lk in host.leaks if lk.pfn is not None) == env.free0


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_injected_status_has_the_upstream_outcome(case):
    run_case(case)


def test_every_kvm_leaf_and_status_is_covered():
    """Every leaf KVM issues has cases, every status of it is injected at each of its sites."""
    from tdxcore.module.inject import LEAF_STATUSES

    by_site = {}
    for c in CASES:
        by_site.setdefault((c.leaf, c.site), set()).add(c.status)
    assert {lf for lf, _ in by_site} == set(KVM_LEAVES)
    for (leaf, site), statuses in by_site.items():
        assert statuses == set(LEAF_STATUSES[leaf]), (leaf.name, site)
    assert {s for r in RULES for s in r.sites} == set(SITES) == set(DRIVERS)
    assert {c.mode for c in CASES} == {ONCE, TWICE, ALWAYS}


def test_finding_mng_rd_failure_reads_zero_without_kvm_bug():
    """Finding (fixed): the model KVM_BUGged the TD when TDH.MNG.RD failed in KVM_TDX_INIT_VM.

    6.18's ``td_tdcs_exec_read64`` only logs (``pr_err``) and returns 0; INIT_VM goes on.
    """
    from tdxcore.kvm import TdState
    from tdxcore.status import OPERAND_ID_RCX, TDX_OPERAND_BUSY, Leaf

    env = DRIVERS["KVM_TDX_INIT_VM"](Leaf.TDH_MNG_RD)
    env.host.tdx.inject(Leaf.TDH_MNG_RD, TDX_OPERAND_BUSY | OPERAND_ID_RCX, count=2)
    assert env.trigger().errno is None
    vm = env.vm
    assert not vm.is_bugged and vm.td_state == TdState.INITIALIZED
    assert vm.tsc_offset == 0 and vm.tsc_multiplier == 0
    env.teardown()
    assert vm.leaks == ()
    check_invariants(env.host)


@pytest.mark.parametrize("interrupts", [1, 3])
def test_a_real_cache_wb_interruption_is_resumed(interrupts):
    """The resume loop the injected INTERRUPTED_RESUMABLE rows cannot show (an injection saves no
    resume point): a real host interrupt makes CACHE.WB return it with the point saved, KVM resumes
    with RCX = 1 and the HKID is released with nothing leaked."""
    from tdxcore.status import TDX_INTERRUPTED_RESUMABLE, Leaf

    env = DRIVERS["VM destruction"](Leaf.TDH_PHYMEM_CACHE_WB)
    host = env.host
    host.tdx.pending_interrupt(0, interrupts)
    n0 = len(host.events)
    assert env.trigger().errno is None
    wb = [e[1] for e in host.events.filter(kind="seamcall_end", leaf=Leaf.TDH_PHYMEM_CACHE_WB) if e[0] >= n0]
    assert [int(e[4]) for e in wb] == [TDX_INTERRUPTED_RESUMABLE] * interrupts + [0]
    assert not env.vm.is_bugged and not host.leaks
    assert host.free_frames == env.free0
    check_invariants(host)
