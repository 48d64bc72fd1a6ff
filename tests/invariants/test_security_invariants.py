"""Security invariants S6f, S6g (issue 10 part 5) and their mutation tests.

Clean runs — a TD that writes and reads private and shared memory, converts, and a host that
reads its own user memory, two TDs on one host — keep ``host.host_private_reads`` empty and pass
every registered invariant. Each mutation breaks the model in one place and ``check_invariants``
reports exactly that id (with an event index and a replay hint) while every other id still holds.
The other two security properties are built-ins with their own mutation tests (S6b/I02/I04:
``test_mutations.py``; I17/I15/I19: ``test_kvm_invariants.py``, ``test_mutations.py``).
"""

from __future__ import annotations

from tdxcore import guest
from tdxcore.constants import PAGE_SHIFT, PAGE_SIZE, FallocFlag, GmemFlag
from tdxcore.invariants import check_invariants, invariant_ids
from tdxcore.invariants.security import SECURITY_IDS
from tdxcore.kvm import Kvm, fault, helpers
from tdxcore.module.host import Host
from tests.invariants.only import only

BASE = 4 << 30
FRESH = BASE + 0x10000          # a private page no initial region covers (first touch faults)
SECRET = 0x5EC2E7_C0FFEE


def make_tds(n=1):
    """``n`` RUNNABLE TDs on one host, each with 1 MiB of guest_memfd memory; checked once."""
    host = Host(packages=1, cpus_per_package=2, memory=48 << 20)
    kvm = Kvm(host)
    tds = [helpers.td_create(kvm, vcpus=1, memory=1 << 20, initial_pages=1) for _ in range(n)]
    check_invariants(host)
    return host, tds


def test_registered_in_the_kvm_layer():
    assert set(SECURITY_IDS) <= set(invariant_ids("kvm"))


def test_clean_private_shared_and_host_reads():
    host, (td,) = make_tds()
    vm, v0 = td.vm, td.vcpus[0]
    v0.run([guest.write(FRESH, SECRET, 8), guest.read(FRESH, 8)])
    assert v0.guest_log[-1].value == SECRET
    check_invariants(host)
    vm.set_memory_attributes(FRESH, PAGE_SIZE, 0)                    # private -> shared
    v0.run([guest.write(FRESH | vm.gpa_shared_mask, 7, 8), guest.read(FRESH | vm.gpa_shared_mask, 8)])
    hva = host.mmap(2 * PAGE_SIZE)
    host.write(hva, b"host data")
    assert host.read(hva, 9) == b"host data"
    check_invariants(host)
    assert host.host_private_reads == []


def test_clean_two_tds_on_one_host():
    host, tds = make_tds(2)
    for td in tds:
        td.vcpus[0].run([guest.write(FRESH, SECRET, 8)])
    check_invariants(host)
    a, b = (td.vm.mmu.leaf(FRESH >> PAGE_SHIFT)[0] for td in tds)
    assert a != b


def test_s6f_host_reads_a_private_frame_through_a_transient_mapping():
    """S6f: a host user mapping briefly points at a TD's private frame and the host reads it.

    The wrong mapping is gone by the next check, so the state check (S6a) cannot see it; the
    read log can. The read returned the scramble, not the secret, and is still a violation.
    """
    host, (td,) = make_tds()
    v0 = td.vcpus[0]
    v0.run([guest.write(FRESH, SECRET, 8)])
    pfn = td.vm.mmu.leaf(FRESH >> PAGE_SHIFT)[0]
    hva = host.mmap(PAGE_SIZE)
    host.user._pages[hva] = pfn                  # mutation: a stale user PTE to the private frame
    data = host.read(hva, 8)
    del host.user._pages[hva]
    assert int.from_bytes(data, "little") != SECRET
    e = only(host, "S6f", pfn=pfn)
    assert "user memory" in str(e)


def test_s6f_host_reads_a_tds_guest_memfd_through_a_host_mapping():
    """S6f: a TD's guest_memfd carries MMAP|INIT_SHARED (6.18 refuses INIT_SHARED for a VM with
    private memory) and the host reads a private page through that mapping.

    guest_memfd pages are not host-reachable in S6a's sense (no user or shared mapping): only
    the read log sees it.
    """
    host, (td,) = make_tds()
    td.vcpus[0].run([guest.write(FRESH, SECRET, 8)])
    pfn = td.vm.mmu.leaf(FRESH >> PAGE_SHIFT)[0]
    td.gmem.flags |= GmemFlag.MMAP | GmemFlag.INIT_SHARED    # mutation: a flag check skipped
    data = td.gmem.read(FRESH - BASE, 8)
    assert int.from_bytes(data, "little") != SECRET
    e = only(host, "S6f", pfn=pfn)
    assert "guest_memfd" in str(e)


def test_s6g_fault_maps_another_tds_guest_memfd_page(monkeypatch):
    """S6g: TD 0's private fault gets a page of TD 1's guest_memfd (not mapped by TD 1 yet).

    The module cannot tell (the page is PT_NDA until the AUG, then TD 0's), S6b sees no frame
    twice; only the gfn → guest_memfd page check does.
    """
    host, (td0, td1) = make_tds(2)
    f1 = td1.gmem
    index = (FRESH - BASE) >> PAGE_SHIFT
    f1.fallocate(FallocFlag.KEEP_SIZE, index << PAGE_SHIFT, PAGE_SIZE)
    theirs = f1.pfn_of(index)
    assert theirs is not None
    real = fault._faultin_private

    def wrong(vcpu, slot, gfn):
        return theirs if vcpu.vm is td0.vm else real(vcpu, slot, gfn)

    monkeypatch.setattr(fault, "_faultin_private", wrong)   # mutation: the wrong file's page
    td0.vcpus[0].run([guest.write(FRESH, SECRET, 8)])
    assert td0.vm.mmu.leaf(FRESH >> PAGE_SHIFT)[0] == theirs
    only(host, "S6g", gfn=FRESH >> PAGE_SHIFT, pfn=theirs)
