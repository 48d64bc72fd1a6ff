"""A custom retry/zap ``Policy``: batch the TRACK of a range zap (SPEC §3.5, §4.1).

``BatchedTrackPolicy`` (tdxcore/kvm/policy_batched.py) is Linux 6.18's policy plus one method,
``zap_range(vm, gfns)``, which the TD's range zap calls when the policy has it. It BLOCKs every
page, then issues ONE TDH.MEM.TRACK + kick, then REMOVEs each page. Not upstream: an
optimisation a policy may add (anchors A24); Linux 6.18 tracks once per page.

This example converts 32 private pages to shared in one KVM_SET_MEMORY_ATTRIBUTES under each
policy and prints the SEAMCALLs of the zap.  Run: ``python3 examples/batched_policy.py``.
"""

from __future__ import annotations

from tdxcore import Host, Kvm, Policy, check_invariants, helpers
from tdxcore.constants import PAGE_SIZE
from tdxcore.kvm.policy_batched import BATCHED_TRACK, BatchedTrackPolicy
from tdxcore.status import Leaf  # type: ignore[attr-defined]

PAGES = 32
GPA = 4 << 30
ZAP_LEAVES = ("TDH_MEM_RANGE_BLOCK", "TDH_MEM_TRACK", "TDH_MEM_PAGE_REMOVE", "TDH_PHYMEM_PAGE_WBINVD")


class QuietBatchedPolicy(BatchedTrackPolicy):
    """A policy of your own: subclass one, give it a new ``name``, override what differs.

    Here nothing differs but the name; a real one might, say, override ``zap_seamcall`` to
    retry BUSY without a kick (see Linux618Policy / Series2023Policy in tdxcore/kvm/policy.py).
    """

    name = "QUIET_BATCHED"


def zap_counts(policy: Policy) -> dict:
    """Build a TD with PAGES private pages under ``policy``, convert them all; return the counts."""
    host = Host(packages=1, cpus_per_package=2, memory=64 << 20, tdx_keyids=4, seed=1)
    kvm = Kvm(host, policy=policy)                       # every VM of this Kvm uses the policy
    td = helpers.td_create(kvm, vcpus=2, memory=2 * PAGES * PAGE_SIZE, gpa=GPA, initial_pages=PAGES)
    before = dict(host.stats.nr_seamcalls)
    kicks = host.stats.as_dict().get("nr_kicks", 0)
    td.vm.set_memory_attributes(GPA, PAGES * PAGE_SIZE, 0)   # private -> shared: one zap range
    check_invariants(host)                               # the model agrees the zap was legal
    out = {name: host.stats.nr_seamcalls.get(Leaf[name], 0) - before.get(Leaf[name], 0)
           for name in ZAP_LEAVES}
    out["kicks"] = host.stats.as_dict().get("nr_kicks", 0) - kicks
    td.close()
    assert not host.leaks
    return out


def main() -> dict:
    """Print the zap's SEAMCALLs under the three policies and return them by policy name."""
    res = {p.name: zap_counts(p) for p in (Policy.LINUX_6_18, BATCHED_TRACK, QuietBatchedPolicy())}
    for name, counts in res.items():
        print(f"{name:14s} " + " ".join(f"{k.split('_', 2)[-1]}={v}" for k, v in counts.items()))
    assert res["LINUX_6_18"]["TDH_MEM_TRACK"] == PAGES and res["BATCHED_TRACK"]["TDH_MEM_TRACK"] == 1
    return res


if __name__ == "__main__":
    main()
