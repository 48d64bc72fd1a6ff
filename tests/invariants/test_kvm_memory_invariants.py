"""KVM run-time memory invariants (I06, I08–I14, S6a, S6d, S6e; issue 6) and their mutation tests.

Clean runs of the memory paths (faults, #VE accepts, conversions both ways, shared accesses, punch,
MADV_DONTNEED, slot deletion, BUSY on a zap under both policies, a SEPT_VE_DISABLE death) pass
every registered invariant. Each mutation breaks the model in one place — a monkeypatched KVM
function, a Cython core's test-only mutation, an injected status — and ``check_invariants``
reports exactly that id (with an event index and a replay hint) while every other id still holds.
"""

from __future__ import annotations

import errno
import random

import pytest

from tdxcore import _testing, guest
from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE, FallocFlag, MemAttr, TdAttr
from tdxcore.errors import KvmError
from tdxcore.invariants import check_invariants, invariant_ids
from tdxcore.invariants.kvm_memory import KVM_MEMORY_IDS
from tdxcore.kvm import Kvm, helpers
from tdxcore.kvm.policy import Policy
from tdxcore.module.host import Host
from tdxcore.sched import PREEMPT
from tdxcore.status import OPERAND_ID_RCX, OPERAND_ID_SEPT_TREE, TDX_OPERAND_BUSY, Leaf  # type: ignore[attr-defined]
from tdxcore.storm.scheduler import Scheduler
from tests.invariants.only import only

BASE = 4 << 30
FRESH = BASE + 0x10000          # a private page no initial region covers (first touch faults)
BUSY_SEPT = TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE


def make_td(policy=Policy.LINUX_6_18, vcpus=2, **init_vm):
    """Build a RUNNABLE TD with 2 initial private pages at BASE, checked once (observers installed)."""
    host = Host(packages=1, cpus_per_package=2, memory=32 << 20)
    td = helpers.td_create(Kvm(host, policy=policy), vcpus=vcpus, memory=1 << 20, initial_pages=2,
                           **init_vm)
    check_invariants(host)
    return host, td


def shared(vm, gpa):
    """Return the shared-view alias of private ``gpa``."""
    return gpa | vm.gpa_shared_mask


def noop_gen(*args, **kwargs):
    """Do nothing, as a generator (a removed kick or flush)."""
    return
    yield


# ---------------------------------------------------------------------------------- clean runs
def test_registered_in_the_kvm_layer():
    """Every id of this module is registered in the kvm layer."""
    assert set(KVM_MEMORY_IDS) <= set(invariant_ids("kvm"))


@pytest.mark.parametrize("policy", [Policy.LINUX_6_18, Policy.SERIES_2023], ids=lambda p: p.name)
def test_clean_memory_paths_pass(policy):
    """Faults, #VE accepts, conversions, shared accesses, punch, madvise, slot delete: clean."""
    host, td = make_td(policy)
    vm, (v0, v1), gmem = td.vm, td.vcpus, td.gmem
    v0.run([guest.write(FRESH, 0x11, 8), guest.read(BASE, 8), guest.accept(FRESH + PAGE_SIZE)])
    v1.run([guest.write(FRESH + 2 * PAGE_SIZE, 0x22, 8)])
    check_invariants(host)
    vm.set_memory_attributes(FRESH, 2 * PAGE_SIZE, 0)                 # to shared: zap 2 leaves
    v0.run([guest.write(shared(vm, FRESH), 0x33, 8), guest.read(shared(vm, FRESH + PAGE_SIZE), 8)])
    check_invariants(host)
    v1.run([guest.read(FRESH, 8)])                                     # mismatch: MEMORY_FAULT exit
    check_invariants(host)
    vm.set_memory_attributes(FRESH, PAGE_SIZE, MemAttr.PRIVATE)       # back: zap the shared mapping
    vm.set_memory_attributes(FRESH, PAGE_SIZE, MemAttr.PRIVATE)       # no-op
    v0.run([guest.read(FRESH, 8)])
    assert v0.guest_log[-1].value == 0
    slot = vm.memslots.id_to_memslot(0, 0)
    host.madvise_dontneed(slot.userspace_addr + (FRESH + PAGE_SIZE - BASE), PAGE_SIZE)
    gmem.fallocate(FallocFlag.PUNCH_HOLE | FallocFlag.KEEP_SIZE, FRESH + 2 * PAGE_SIZE - BASE, PAGE_SIZE)
    check_invariants(host)
    vm.set_user_memory_region2(0, 0, BASE, 0, slot.userspace_addr)    # delete the slot: zap all
    check_invariants(host)
    td.close()
    check_invariants(host)


@pytest.mark.parametrize("policy", [Policy.LINUX_6_18, Policy.SERIES_2023], ids=lambda p: p.name)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_clean_under_interleaving(policy, seed):
    """VCPUs in the guest while pages convert and punch (BUSY on a BLOCK too): clean at every step."""
    host, td = make_td(policy)
    vm, (v0, v1), gmem = td.vm, td.vcpus, td.gmem
    pages = [FRESH + k * PAGE_SIZE for k in range(4)]
    rng = random.Random(seed)
    s = Scheduler(seed=seed)
    s.add(v0.run_gen([guest.write(p, k + 1, 8) for k, p in enumerate(pages)] + [guest.read(BASE, 8)]), "v0")
    # v1 stays in the guest (reads of a page nobody converts) while the zaps kick
    s.add(v1.run_gen([guest.read(pages[3], 8)] * 40 + [guest.accept(pages[3])]), "v1")

    def host_ops():
        for _ in range(6):
            yield PREEMPT
        yield from vm.set_memory_attributes_gen(pages[1], PAGE_SIZE, 0)
        yield from vm.set_memory_attributes_gen(pages[1], PAGE_SIZE, MemAttr.PRIVATE)
        yield from vm.set_memory_attributes_gen(BASE, 2 * PAGE_SIZE, 0)
        yield from vm.set_memory_attributes_gen(pages[0], PAGE_SIZE, 0)
        yield from gmem._fallocate(FallocFlag.PUNCH_HOLE | FallocFlag.KEEP_SIZE, pages[2] - BASE, PAGE_SIZE)
        return (0, "")
    s.add(host_ops(), "host")
    host.tdx.inject(Leaf.TDH_MEM_RANGE_BLOCK, BUSY_SEPT, count=1)
    for _ in range(20_000):
        ready = s.runnable()
        if not ready:
            break
        s.step(ready[rng.randrange(len(ready))])
        check_invariants(host)
    assert s.done
    v1.pre_fault_memory(pages[3] + PAGE_SIZE, 2 * PAGE_SIZE)          # fault events outside KVM_RUN
    check_invariants(host)


@pytest.mark.parametrize("policy", [Policy.LINUX_6_18, Policy.SERIES_2023], ids=lambda p: p.name)
def test_clean_busy_zap_and_busy_map(policy):
    """BUSY on BLOCK and on AUG as each policy survives it (and 6.18's double BUSY bug): clean."""
    host, td = make_td(policy)
    vm, v0 = td.vm, td.vcpus[0]
    host.tdx.inject(Leaf.TDH_MEM_RANGE_BLOCK, BUSY_SEPT, count=1)      # 6.18: kick + one retry
    vm.set_memory_attributes(BASE, PAGE_SIZE, 0)
    host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, BUSY_SEPT, count=17)       # 2023: wrapper gives up once
    v0.run([guest.write(FRESH, 1, 8)])
    assert not vm.is_dead
    check_invariants(host)
    if policy is Policy.LINUX_6_18:
        host.tdx.inject(Leaf.TDH_MEM_RANGE_BLOCK, BUSY_SEPT, count=2)  # a second BUSY: KVM_BUG
        vm.set_memory_attributes(BASE + PAGE_SIZE, PAGE_SIZE, 0)
        assert vm.is_bugged
        check_invariants(host)


def test_clean_sept_ve_disable_pending_access_kills_the_vm():
    """A PENDING access with SEPT_VE_DISABLE kills the VM: clean."""
    host, td = make_td(attributes=int(TdAttr.SEPT_VE_DISABLE))
    v0 = td.vcpus[0]
    with pytest.raises(KvmError) as ei:
        v0.run([guest.read(FRESH, 8)])               # EPT violation → AUG → PENDING access: fatal
    assert ei.value.errno == errno.EIO and td.vm.is_dead
    check_invariants(host)


# ---------------------------------------------------------------------------------- mutations
def test_i06_pending_access_not_fatal_with_sept_ve_disable(monkeypatch):
    """I06: the unexpected-PENDING EPT violation does not kill the VM."""
    import tdxcore.kvm.vcpu_run as vr

    host, td = make_td(attributes=int(TdAttr.SEPT_VE_DISABLE))
    real = vr.tdx_handle_ept_violation

    def handler(vcpu, gpa, pending):
        if pending:                     # mutation: the unexpected-PENDING check returns to userspace
            return -errno.EFAULT
            yield
        return (yield from real(vcpu, gpa, pending))
    monkeypatch.setattr(vr, "tdx_handle_ept_violation", handler)
    v0 = td.vcpus[0]
    v0.run([guest.read(FRESH, 8)])
    v0.run([])                          # the vCPU enters again: KVM never killed the VM
    only(host, "I06", gfn=FRESH >> PAGE_SHIFT, pfn=td.vm.tdr)


def test_i08_track_without_kick(monkeypatch):
    """I08: tdx_track does not kick after TRACK."""
    import tdxcore.kvm.tdx_mmu as tm

    host, td = make_td()
    monkeypatch.setattr(tm, "kick_all_vcpus", noop_gen)      # mutation: tdx_track forgets the kick
    td.vm.set_memory_attributes(BASE, 2 * PAGE_SIZE, 0)      # two zaps: TRACK, TRACK
    only(host, "I08", pfn=td.vm.tdr)


def test_i09_zap_retried_without_kick(monkeypatch):
    """I09: the 6.18 BUSY retry of a BLOCK does not kick first."""
    import tdxcore.kvm.policy as pol

    host, td = make_td()
    monkeypatch.setattr(pol, "kick_all_vcpus", noop_gen)     # mutation: the BUSY retry skips the kick
    host.tdx.inject(Leaf.TDH_MEM_RANGE_BLOCK, BUSY_SEPT, count=1)
    td.vm.set_memory_attributes(BASE, PAGE_SIZE, 0)
    only(host, "I09", gfn=BASE >> PAGE_SHIFT, pfn=td.vm.tdr)


def test_i09_second_busy_does_not_bug_the_vm(monkeypatch):
    """I09: a failed retry does not bug the VM."""
    host, td = make_td()
    vm = td.vm
    monkeypatch.setattr(vm, "bug", lambda reason: None)      # mutation: KVM_BUG_ON forgotten
    host.tdx.inject(Leaf.TDH_MEM_RANGE_BLOCK, BUSY_SEPT, count=2)
    vm.set_memory_attributes(BASE, PAGE_SIZE, 0)
    assert not vm.is_bugged and vm.leaks                     # leaked, as the real path does
    only(host, "I09", pfn=vm.tdr)


def test_i10_private_fault_maps_a_shared_gfn(monkeypatch):
    """I10: the fault path's attribute check passes a private access to a shared gfn."""
    host, td = make_td()
    vm = td.vm
    vm.set_memory_attributes(FRESH, PAGE_SIZE, 0)
    monkeypatch.setattr(vm, "is_private", lambda gfn: True)  # mutation: the attribute check says private
    td.vcpus[0].run([guest.read(FRESH, 8)])
    only(host, "I10", gfn=FRESH >> PAGE_SHIFT)


class _SeqOnly:
    """``mmu_invalidate`` whose retry checks look at ``seq`` only (the in-progress test dropped)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def retry_gfn(self, seq, gfn):
        return seq != self._real.seq

    retry_gfn_unsafe = retry_gfn


def test_i11_fault_maps_inside_the_invalidation_window(monkeypatch):
    """I11: a fault inside an attribute change's invalidation maps."""
    host, td = make_td()
    vm, v0 = td.vm, td.vcpus[0]
    vm.set_memory_attributes(FRESH + PAGE_SIZE, PAGE_SIZE, 0)
    check_invariants(host)
    # mutation: mmu_invalidate_retry_gfn ignores an invalidation in progress (only seq counts)
    monkeypatch.setattr(vm, "mmu_invalidate", _SeqOnly(vm.mmu_invalidate))
    ran = []

    def fault_in_window(vm, **info):
        if not ran:
            ran.append(v0.run([guest.read(FRESH, 8)]))
    vm.add_hook("pre_set_memory_attributes", fault_in_window)
    vm.set_memory_attributes(FRESH, 2 * PAGE_SIZE, MemAttr.PRIVATE)   # [FRESH, +2) is invalidated
    assert ran and vm.mmu.leaf(FRESH >> PAGE_SHIFT) is not None
    only(host, "I11", gfn=FRESH >> PAGE_SHIFT)


def test_i11_store_outside_the_window(monkeypatch):
    """I11: the invalidation range does not cover the changed gfns."""
    host, td = make_td()
    vm = td.vm
    real = vm.invalidate_begin_locked

    def narrow(ranges):                 # mutation: range_add covers only the first page of each range
        real([(s, lo, lo + 1) for s, lo, _ in ranges])
    monkeypatch.setattr(vm, "invalidate_begin_locked", narrow)
    vm.set_memory_attributes(FRESH, 4 * PAGE_SIZE, 0)
    only(host, "I11", gfn=FRESH >> PAGE_SHIFT)


def test_i12_end_without_seq_bump():
    """I12: mmu_invalidate_end does not bump seq."""
    host, td = make_td()
    _testing.invalidate_mutate(td.vm.mmu_invalidate, "end_no_seq_bump")   # mutation: core rule flipped
    td.vm.set_memory_attributes(FRESH, PAGE_SIZE, 0)
    only(host, "I12", gfn=FRESH >> PAGE_SHIFT)


def test_i13_noop_request_invalidates(monkeypatch):
    """I13: an all-already-set request goes through the change path."""
    import tdxcore.kvm.attributes as attrs

    host, td = make_td()
    monkeypatch.setattr(attrs, "_ALL", 0)                # mutation: the no-op check never matches
    td.vm.set_memory_attributes(FRESH, PAGE_SIZE, MemAttr.PRIVATE)     # already private
    only(host, "I13", gfn=FRESH >> PAGE_SHIFT)


class _PartialStore:
    """The seed's rollback bug as a store: ``reserve`` changes half the range, then fails."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def reserve(self, start, end):
        self._real.set_range(start, (start + end) // 2, 0)
        msg = "injected: xa_reserve failed half way"
        raise MemoryError(msg)


def test_i13_failed_request_changed_attributes(monkeypatch):
    """I13: an ENOMEM request leaves half its range changed."""
    host, td = make_td()
    vm = td.vm
    monkeypatch.setattr(vm, "mem_attr", _PartialStore(vm.mem_attr))
    with pytest.raises(KvmError) as ei:
        vm.set_memory_attributes(FRESH, 4 * PAGE_SIZE, 0)
    assert ei.value.errno == errno.ENOMEM
    only(host, "I13", gfn=FRESH >> PAGE_SHIFT)


def test_i14_mappings_left_outside_a_deleted_slot(monkeypatch):
    """I14: a memslot delete leaves its mappings."""
    host, td = make_td()
    vm = td.vm
    vm.set_memory_attributes(FRESH, PAGE_SIZE, 0)
    td.vcpus[0].run([guest.read(shared(vm, FRESH), 8)])
    monkeypatch.setattr(vm, "kvm_arch_flush_shadow_memslot", noop_gen)   # mutation: delete zaps nothing
    slot = vm.memslots.id_to_memslot(0, 0)
    vm.set_user_memory_region2(0, 0, BASE, 0, slot.userspace_addr)
    only(host, "I14")


def test_i14_private_2m_leaf():
    """I14: a 2M private leaf (the map path AUGs at level 1) is reported."""
    host, td = make_td()
    vm = td.vm
    huge = BASE + (2 << 20)
    vm.set_memory_attributes(huge, 2 << 20, MemAttr.PRIVATE)          # no slot there: no invalidation
    first = host.frames.alloc_contig(1024)
    pfn = (first + 511) & ~511
    # mutation: a 2M TDH.MEM.PAGE.AUG where 6.18 maps private memory 4K only
    assert host.tdx.tdh_mem_page_aug(vm.tdr, huge, 1, pfn).status == 0
    only(host, "I14", gfn=huge >> PAGE_SHIFT, pfn=vm.tdr)


def test_s6a_shared_fault_maps_a_private_frame(monkeypatch):
    """S6a: a shared fault maps the frame that held private data."""
    host, td = make_td()
    vm, v0 = td.vm, td.vcpus[0]
    v0.run([guest.write(FRESH, 0x5EC2E7, 8)])
    pfn = vm.mmu.leaf(FRESH >> PAGE_SHIFT)[0]
    vm.set_memory_attributes(FRESH, PAGE_SIZE, 0)            # zapped; the frame stays in guest_memfd
    monkeypatch.setattr(host, "fault_in", lambda hva: pfn)   # mutation: gup hands out the gmem frame
    v0.run([guest.read(shared(vm, FRESH), 8)])
    only(host, "S6a", pfn=pfn)


def test_s6d_sept_wrapper_exceeds_its_bound(monkeypatch):
    """S6d: the 2023 SEPT wrapper retries past SEAMCALL_RETRY_MAX."""
    import tdxcore.kvm.policy as pol

    host, td = make_td(Policy.SERIES_2023)
    declared = dict(Policy.SERIES_2023.bounds())
    monkeypatch.setattr(pol, "SEAMCALL_RETRY_MAX", 20)       # mutation: the loop's bound is off
    monkeypatch.setattr(pol.Series2023Policy, "bounds", lambda self: declared)
    host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, BUSY_SEPT, count=18)
    td.vcpus[0].run([guest.write(FRESH, 1, 8)])
    only(host, "S6d", gfn=FRESH >> PAGE_SHIFT, pfn=td.vm.tdr)


def test_s6d_local_retry_under_series_2023(monkeypatch):
    """S6d: SERIES_2023 retries a fault locally."""
    import tdxcore.kvm.policy as pol

    host, td = make_td(Policy.SERIES_2023)
    monkeypatch.setattr(pol.Series2023Policy, "local_retry", True)   # mutation: 6.18's loop in 2023
    host.tdx.inject(Leaf.TDH_MEM_PAGE_AUG, TDX_OPERAND_BUSY | OPERAND_ID_RCX, count=1)
    td.vcpus[0].run([guest.write(FRESH, 1, 8)])
    only(host, "S6d", gfn=FRESH >> PAGE_SHIFT)


def test_s6e_invalidation_not_counted_as_open(monkeypatch):
    """S6e: a begun invalidation is not counted as open in KVM."""
    host, td = make_td()
    vm = td.vm
    real = vm.invalidate_begin_locked

    def begin(ranges):                  # mutation: a begin KVM does not count as open
        real(ranges)
        vm.nr_open_invalidations -= 1
    monkeypatch.setattr(vm, "invalidate_begin_locked", begin)
    vm.set_memory_attributes(FRESH, PAGE_SIZE, 0)
    only(host, "S6e")
