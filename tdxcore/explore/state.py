"""The explorer's global state: what two schedules must agree on to be pruned as one (SPEC §5).

SPEC §5 defines the global state as the model's state hash plus every actor's position. Taken
literally, ``host.state_hash()`` cannot serve: it hashes the event log's digest (and leak event
indices), which records the *order* of every step, so no two interleavings would ever meet. The
explorer therefore hashes the same model state **without the order-only parts**, and adds what
the model's hash leaves out:

* **shared** part (:func:`shared_bytes`) — everything more than one actor may read or write: the
  host (CPUs, PAMT, frame allocator and contents, user memory, KeyIDs, the module with its TDs,
  S-EPT trees and injector, RNG streams, leak records without their event index), the KVM layer
  (every fd, VM, guest_memfd; each vCPU's *shared* fields — state, pending signal, kick, queued
  events, armed completion), and what neither hash covers: KVM-side lock holders (``mmu_lock``,
  ``slots_lock``, ``kvm->lock``, vCPU mutexes, the global ``tdx_lock``), SRCU readers, in-flight
  SEAMCALLs (by leaf, actor and registers, never by op id), each vCPU's guest-mode span count and
  VP.ENTER phase, and the position of a pending MapGPA completion (its ``[next, end]`` cells);
* **private** part of each actor (:func:`private_bytes`) — its scheduler position (steps taken,
  done, what it waits on) and, for the vCPU it drives, the fields only that actor reads: the
  guest op index, queue and log lengths, the #VE handler queue, the last ACCEPT status and the
  ``kvm_run`` fields its userspace loop reads;
* **commutative** part (:func:`counter_bytes`) — every counter (host, VM, vCPU). Counters are
  only ever incremented and never read by the model's control flow, so two increments commute;
  they stay in the key because they are what tells a retry loop's iterations apart (a generator's
  local loop counter has a counter twin).

A step is **local** when it changes no shared byte (:class:`StateView`), no other actor's private
byte and no actor's enabledness: it wrote only its own private state and counters. Two local
steps of different actors commute (neither writes what the other reads, and neither changes what
can run), which is the independence relation of the partial-order reduction
(:mod:`tdxcore.explore.engine`). Every other pair of steps is treated as dependent.

Assumption, as in SPEC §5: a generator's local variables are a function of its position and the
hashed state. The counters above, the positions' step counts and the vCPU fields make this hold for
the model's loops; a scenario actor written for the explorer must keep it too.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, Dict, Iterable, List, Optional, Tuple

from tdxcore.sched import Actor, KLock, Wait, WaitOutOfGuest

__all__ = ["shared_bytes", "private_bytes", "counter_bytes", "StateView", "digest"]


def digest(*parts: bytes) -> int:
    """64-bit blake2b of ``parts`` (stable across processes and ``PYTHONHASHSEED``)."""
    h = hashlib.blake2b(digest_size=8, person=b"tdxexpl")
    for p in parts:
        h.update(struct.pack("<Q", len(p)))
        h.update(p)
    return int.from_bytes(h.digest(), "little")


# ---------------------------------------------------------------------------------------------- host
def _host_bytes(host: Any) -> bytes:
    """``host.state_hash()``'s serialization without counters, the event digest, leak event indices."""
    parts = [struct.pack("<QQQQ", host.nr_packages, host.cpus_per_package, host.memory, host.seed),
             bytes(host._online) + bytes(host._booted),
             struct.pack("<Q", host._pamt.state_hash()),
             host.frames.state_bytes(),
             host._contents.digest(),
             host.user.state_bytes(),
             host.keyids.state_bytes(),
             host.tdx.state_bytes()]
    for name in sorted(host._rngs):
        st = host._rngs[name].getstate()
        parts.append(name.encode() + struct.pack(f"<{len(st[1])}Q", *st[1]))
    parts.append(struct.pack("<Q", len(host._vms)))
    for r in host._leaks:
        parts.append(repr((r.pfn, r.page_type, r.what, r.hkid, r.reason)).encode())
    parts.append(_inflight_bytes(host.tdx))
    return b"".join(parts)


def _inflight_bytes(tdx: Any) -> bytes:
    """In-flight SEAMCALLs/TDCALLs as a sorted multiset of (leaf, actor, cpu, regs, in_guest)."""
    ops = sorted(repr((type(op.leaf).__name__, int(op.leaf), op.actor, op.cpu, tuple(op.regs),
                       bool(op.in_guest))) for op in tdx.inflight.values())
    return ("\0".join(ops)).encode()


# ---------------------------------------------------------------------------------------------- kvm
def _vcpu_private_fields(v: Any) -> Tuple[Any, ...]:
    run = v.kvm_run
    ve = v._head_ve
    return (v._next_index, len(v._queue), len(v.guest_log), len(v._ve_ops),
            None if ve is None else repr(ve), int(v._last_accept_status),
            int(run.exit_reason), int(run.ret), int(run.hypercall.ret),
            int(run.memory_fault.gpa), int(run.memory_fault.flags))


def _completion_bytes(fn: Any) -> bytes:
    """Where an armed completion stands: its function's name and the ints/lists in its closure."""
    if fn is None:
        return b"-"
    cells: List[str] = [getattr(fn, "__qualname__", type(fn).__name__)]
    for c in getattr(fn, "__closure__", None) or ():
        try:
            x = c.cell_contents
        except ValueError:          # an empty cell
            continue
        if isinstance(x, (int, list, tuple, str, bytes)) and not isinstance(x, bool):
            cells.append(repr(x))
    return "\0".join(cells).encode()


def _vcpu_shared_bytes(v: Any) -> bytes:
    """Serialize a vCPU's fields other actors read or write (kick, signal, events, entry, completion)."""
    return (struct.pack(f"<QqBBqH{len(v.tdcx)}QBBH", v.vcpu_id, v.fd, int(v.state), not v.is_closed,
                        -1 if v.tdvpr is None else v.tdvpr, len(v.tdcx), *v.tdcx, v._signal,
                        v._kick_pending, len(v._events))
            + bytes(v._events) + struct.pack("<QB", v.guest_mode_seq, v.in_guest)
            + _completion_bytes(v.completion) + _lock_bytes([v.mutex]))


def _lock_bytes(locks: Iterable[KLock]) -> bytes:
    out: List[str] = []
    for lk in locks:
        holders = sorted(getattr(h, "name", repr(h)) for h in lk.holders())
        writer = lk._writer is not None
        out.append(f"{lk.name}:{'W' if writer else 'R'}:{','.join(holders)}")
    return "\0".join(out).encode()


def _vm_bytes(vm: Any) -> bytes:
    """Return the VM's ``state_bytes()`` with every vCPU's bytes replaced by its shared part."""
    b = vm.state_bytes()
    for v in getattr(vm, "vcpus", ()):
        b = b.replace(v.state_bytes(), _vcpu_shared_bytes(v), 1)
    return (b + _lock_bytes([vm.mmu_lock, vm.slots_lock, vm.lock])
            + struct.pack("<Q", vm.srcu.nr_readers))


def _kvm_bytes(kvm: Any) -> bytes:
    """``kvm.state_hash()``'s serialization, with VMs and vCPUs through :func:`_vm_bytes`."""
    from tdxcore.kvm.gmem import GuestMemfd
    from tdxcore.kvm.vcpu import Vcpu
    from tdxcore.kvm.vm import Vm

    parts = [struct.pack("<QQ", kvm._nr_vms, len(kvm.fds))]
    for fd, f in kvm.fds.items():
        kind = ("kvm" if f is kvm else "vm" if isinstance(f, Vm) else
                "gmem" if isinstance(f, GuestMemfd) else "vcpu" if isinstance(f, Vcpu) else "memfd")
        parts.append(struct.pack("<q", fd) + kind.encode() + b"\0")
        if isinstance(f, Vm):
            parts.append(_vm_bytes(f))
        elif isinstance(f, GuestMemfd):
            parts.append(f.state_bytes())
        elif isinstance(f, Vcpu):
            parts.append(_vcpu_shared_bytes(f))
    for vm in sorted((v for v in kvm.host.vms if isinstance(v, Vm) and v.kvm is kvm and v.is_closed),
                     key=lambda v: v.id):
        parts.append(_vm_bytes(vm))
    return b"".join(parts)


def shared_bytes(host: Any, kvms: Iterable[Any]) -> bytes:
    """Canonical bytes of the state more than one actor may touch (see the module docstring)."""
    from tdxcore.kvm.tdx_vm import tdx_lock

    return b"".join([_host_bytes(host)] + [_kvm_bytes(k) for k in kvms] + [_lock_bytes([tdx_lock])])


def counter_bytes(host: Any, kvms: Iterable[Any]) -> bytes:
    """Every counter of the host, its VMs and vCPUs, sorted by name (the commutative part)."""
    parts = [repr(sorted(host._counters.items())).encode()]
    for k in kvms:
        for vm in sorted((v for v in k.host.vms if getattr(v, "kvm", None) is k), key=lambda v: v.id):
            parts.append(repr(sorted(vm._counters.items())).encode())
            for v in getattr(vm, "vcpus", ()):
                parts.append(repr(sorted(v._counters.items())).encode())
    return b"\0".join(parts)


def _wait_bytes(w: Any) -> bytes:
    if isinstance(w, Wait):
        return b"W" + w.lock.name.encode() + b"\0" + w.mode.encode()
    if isinstance(w, WaitOutOfGuest):
        return b"K" + struct.pack("<H", len(w.vcpus))
    return b"P"


def private_bytes(actor: Actor, vcpu: Optional[Any]) -> bytes:
    """Serialize an actor's position (steps, done, wait) and the private fields of the vCPU it drives."""
    head = struct.pack("<QB", actor.nr_steps, actor.done) + _wait_bytes(actor.waiting_on)
    if vcpu is None:
        return head
    return head + repr(_vcpu_private_fields(vcpu)).encode()


class StateView:
    """Computes the state key of a running scenario and tells local steps apart.

    Parameters
    ----------
    host : Host
        The scenario's host.
    kvms : sequence of Kvm
        Its KVM instances.
    actors : sequence of (Actor, vCPU or None)
        Each actor, with the vCPU whose private fields it owns (None for a host actor).
    """

    def __init__(self, host: Any, kvms: Iterable[Any], actors: Iterable[Tuple[Actor, Optional[Any]]]) -> None:
        self.host = host
        self.kvms = tuple(kvms)
        self.actors = tuple(actors)

    def shared(self) -> int:
        """Digest of the shared part alone (a step that keeps it is local)."""
        return digest(shared_bytes(self.host, self.kvms))

    def key(self, extra: bytes = b"") -> Tuple[int, int, Tuple[int, ...]]:
        """Return ``(state key, shared digest, per-actor private digests)``.

        ``extra`` is the explorer's own monitor state (it joins the key only).
        """
        shared = self.shared()
        privs = tuple(digest(a.name.encode(), private_bytes(a, v)) for a, v in self.actors)
        key = digest(struct.pack(f"<Q{len(privs)}Q", shared, *privs), counter_bytes(self.host, self.kvms),
                     extra)
        return key, shared, privs

    def describe(self) -> Dict[str, Any]:
        """Small JSON-ready summary of the positions (for reports)."""
        return {a.name: {"steps": a.nr_steps, "done": a.done} for a, _ in self.actors}
