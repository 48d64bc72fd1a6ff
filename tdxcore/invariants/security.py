"""Security properties of the model, TEE-Checking style (SPEC §6; issue 10 part 5; anchors §1).

Four properties, borrowed from the confidentiality/integrity list of UFESL/TEE-Checking. Two are
already built-in invariants and are not repeated here; this module adds the two that were not
checked (registered with ``layer="kvm"`` when :mod:`tdxcore.invariants` is imported):

======================================================  ==========================================
property                                                checked by
======================================================  ==========================================
the host never reads private data, by any path          **S6f** (here, every read) and S6a (state:
                                                        no host-reachable frame holds private data)
no frame is owned by two TDs                            S6b (module records), I02 (PAMT owners)
a TD never maps another TD's frame                      **S6g** (here, KVM's mirror) and S6b / I04
                                                        (the module's S-EPT leaves)
a released HKID's frames are written back before reuse  I17 (frame reuse), I15 (KEY.FREEID only
                                                        after CACHE.WB everywhere), I19 (HKID reuse
                                                        only after KEY.FREEID)
======================================================  ==========================================

* **S6f** — no host read path ever touched a frame holding data written under a private KeyID.
  Every path by which host software reads memory — user memory (``host.read``, what
  ``copy_from_user`` and a VMM's loads see) and a guest_memfd host mapping — reads through
  :meth:`~tdxcore.module.frames.FrameContents.host_read`, which logs a read of a frame whose
  contents were last written under a TDX-private KeyID in ``host.host_private_reads``, whatever
  it returned (the model returns a keyed scramble, never the plaintext). S6a checks the *state*
  at check time (no host-reachable frame is private); S6f catches a read even when the wrong
  mapping that allowed it is gone by the next check. The log is append-only: sticky.
* **S6g** — every present leaf of a KVM TD's mirror S-EPT maps exactly the page the memslot's own
  guest_memfd holds for that gfn (``slot.gmem.pfn_of(gmem_pgoff + gfn - base_gfn)``, the file
  bound to *this* VM), so a TD never maps a frame of another VM's guest_memfd, of user memory or
  of the free pool, even one nobody else maps yet (which the module's PAMT cannot see: an
  unmapped guest_memfd page is PT_NDA). Pages KVM recorded as leaked or pinned after a failed
  zap are exempt (they left the file on purpose), and so are leaves outside every memslot
  (I14 reports those). O(mirror leaves × log memslots).
"""

from __future__ import annotations

from typing import Any, Iterator, Set

from tdxcore.invariants.module import _fail
from tdxcore.invariants.registry import register_invariant

__all__ = ["check_s6f", "check_s6g", "SECURITY_IDS"]

#: The ids this module registers, in check order.
SECURITY_IDS = ("S6f", "S6g")


def check_s6f(host: Any) -> None:
    """S6f: no host read path read a frame holding private-KeyID data."""
    reads = host.host_private_reads
    if reads:
        pfn, keyid, path = reads[0]
        more = f" (and {len(reads) - 1} more)" if len(reads) > 1 else ""
        raise _fail(host, "S6f", f"the host read the frame through {path} while it held data written "
                    f"under private KeyID {keyid}{more}", pfn=pfn)


def _kvm_tds(host: Any) -> Iterator[Any]:
    for vm in host.vms:
        if hasattr(vm, "mmu") and hasattr(vm, "td_state") and not vm.is_destroyed:
            yield vm


def _exempt(host: Any, vm: Any) -> Set[int]:
    out = {rec.pfn for rec in host.leaks if rec.pfn is not None}
    out.update(getattr(vm, "pinned_pfns", ()))
    return out


def check_s6g(host: Any) -> None:
    """S6g: a KVM TD's private leaves map its own guest_memfd's page for each gfn."""
    for vm in _kvm_tds(host):
        leaves = vm.mmu.leaves
        if not leaves:
            continue
        exempt = None
        slots = vm.memslots
        for gfn, pfn in leaves:
            slot = slots.gfn_to_memslot(gfn)
            if slot is None:
                continue                # a leaf outside every memslot is I14's
            f = slot.gmem
            if f is not None and getattr(f, "vm", None) is vm:
                want = f.pfn_of(slot.gmem_pgoff + gfn - slot.base_gfn)
                if want == pfn:
                    continue
                what = ("a hole of its guest_memfd" if want is None else
                        f"its guest_memfd's page is pfn {want:#x}")
            elif f is not None:
                what = f"the memslot's guest_memfd belongs to VM {getattr(f.vm, 'id', '?')}"
            else:
                what = "no guest_memfd backs the gfn"
            if exempt is None:
                exempt = _exempt(host, vm)
            if pfn in exempt:
                continue
            raise _fail(host, "S6g", f"VM {vm.id}'s private leaf at gfn {gfn:#x} maps pfn {pfn:#x}, but "
                        f"{what}: a TD may map only its own guest_memfd pages", gfn=gfn, pfn=pfn)


for _id, _fn in (("S6f", check_s6f), ("S6g", check_s6g)):
    register_invariant(_id, _fn, "kvm")
