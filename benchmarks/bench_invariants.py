"""Cost of ``check_invariants`` on a RUNNABLE TD with N mapped 4K pages.

SPEC §3.5: the cost is O(live TD pages), never O(host frames).

Group ``invariants.check``; impls ``all`` (every built-in id) and ``structural_only`` (the ids
with a state part: I01 I02 I03 I04 I15 I18 I19 I20 S6b S6c — the records walk, without the
sequence-only ids I05 I07 I22). N = 512 and 4096 pages AUGed and accepted through the module API
(seeded shuffled GPAs over N/512 level-1 tables, 2 vCPUs), on a 64 MiB host. The event log is
already folded in before timing (one warm-up check), so a round measures the steady state: the
records walk plus an empty event-log increment. ``extra_info`` has N, the S-EPT entries walked
and the host's frames (to show the cost does not follow them).
"""

from __future__ import annotations

import numpy as np
import pytest

from tdxcore.invariants import BUILTIN_IDS, check_invariants
from tdxcore.module import Host
from tdxcore.module.td import add_sept_path, build_td

SEED = 20261122
GPA = 0x4000_0000
MEM = 64 << 20
STRUCTURAL = tuple(i for i in BUILTIN_IDS if i not in ("I05", "I07", "I22"))
IDS = {"all": None, "structural_only": STRUCTURAL}

_HOSTS: dict = {}


def _host(n):
    """Return a host with one RUNNABLE TD mapping ``n`` pages (built once per n)."""
    if n in _HOSTS:
        return _HOSTS[n]
    h = Host(memory=MEM, seed=SEED)
    h.tdx.enable()
    b = build_td(h, vcpus=2)
    t = h.tdx
    for k in range(-(-n // 512)):
        add_sept_path(h, b.tdr, GPA + (k << 21), 1)
    order = np.random.default_rng(SEED).permutation(n)
    for i in order:
        g = GPA + (int(i) << 12)
        assert t.tdh_mem_page_aug(b.tdr, g, 0, h.alloc_frame()).status == 0
        assert t.tdg_mem_page_accept(b.vcpus[0], g, 0).status == 0
    check_invariants(h)                   # warm-up: the event log is folded in once
    _HOSTS[n] = (h, b)
    return h, b


@pytest.mark.parametrize("n", [512, 4096])
@pytest.mark.parametrize("impl", list(IDS))
def test_check(benchmark, impl, n):
    """Time one ``check_invariants`` of the N-page host (``impl`` picks the ids)."""
    h, b = _host(n)
    ids = IDS[impl]
    benchmark.group = "invariants.check"
    benchmark.extra_info.update({"n_pages": n, "host_frames": h.nr_frames, "events": len(h.events),
                                 "ids": "all" if ids is None else " ".join(ids)})
    benchmark.pedantic(check_invariants, args=(h,), kwargs={"ids": ids}, rounds=20, iterations=1,
                       warmup_rounds=1)
    # still clean, and the TD still maps all n pages
    check_invariants(h)
    assert len(h.tdx.td(b.tdr).sept.entries(0)) == n
