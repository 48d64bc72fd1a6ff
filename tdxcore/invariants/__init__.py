"""Model invariants (SPEC §3.5, §6; tdx-facts "Invariants a faithful model must enforce").

``check_invariants(host, ids=None)`` raises :class:`~tdxcore.errors.InvariantViolation` naming
the invariant id, the frame (pfn) or gfn, the event index and a one-line replay hint;
``register_invariant(id, fn, layer="module")`` adds one. Built-ins, in check order:

* structural (:mod:`.module`, over the live TDs' records): I01, I02, I03, I04, I15, I18, I19,
  I20, S6b, S6c;
* over the event log, incrementally (:mod:`.temporal`): the sequence parts of I02, I03, I05,
  I07, I15, I18, I19, I22.

One id may have both a structural and a sequence part; both run under that id.
"""

from tdxcore.invariants import exits as _exits  # noqa: F401  (I23: unknown TDVMCALLs stay in KVM)
from tdxcore.invariants import kvm as _kvm  # noqa: F401  (KVM-layer invariants: I16, I21, I20kvm)
from tdxcore.invariants import kvm_memory as _kvm_memory  # noqa: F401  (I06, I08-I14, S6a, S6d, S6e)
from tdxcore.invariants import module as _module  # noqa: F401  (registers the built-ins)
from tdxcore.invariants import security as _security  # noqa: F401  (S6f, S6g: security properties)
from tdxcore.invariants import temporal as _temporal  # noqa: F401
from tdxcore.invariants.registry import (
    LAYERS,
    check_invariants,
    invariant_ids,
    register_invariant,
    replay_hint,
    unregister_invariant,
)

__all__ = ["check_invariants", "register_invariant", "unregister_invariant", "invariant_ids", "replay_hint",
           "LAYERS", "BUILTIN_IDS"]

#: The built-in ids, in check order.
BUILTIN_IDS = ("I01", "I02", "I03", "I04", "I05", "I07", "I15", "I18", "I19", "I20", "I22", "S6b", "S6c")
