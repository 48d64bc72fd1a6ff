"""A custom storm actor: a host thread of your own next to the storm's vCPU actors (SPEC §3.5, §5).

An actor is a generator. Every KVM operation is one too (``vm.set_memory_attributes_gen``,
``vcpu.run_gen``, ...): ``yield from`` it and the actor yields at each of the operation's
preemption points (``PREEMPT``, lock waits, kicks), where the seeded ``Scheduler`` may switch to
another actor. Yield ``PREEMPT`` yourself between operations.

The actor here converts a random 4-page range of the area to shared and back to private (one
range zap each way), while four vCPUs run the storm's guest programs. Invariants are checked
after every step. Run: ``python3 examples/custom_actor.py``.
"""

from __future__ import annotations

import errno
from typing import Any, Generator

from tdxcore import PREEMPT, Host, Kvm, Scheduler, check_invariants, helpers
from tdxcore.constants import PAGE_SIZE, MemAttr
from tdxcore.storm.actors import ActorState, StormContext, make_slot_flags, vcpu_actor
from tdxcore.storm.config import ROLES

PAGES, GPA, STEPS, SEED = 64, 4 << 30, 1500, 5


def range_flipper(ctx: StormContext, rng: Any, st: ActorState) -> Generator[Any, Any, None]:
    """Flip 4 pages private → shared → private until ``ctx.stop``."""
    vm = ctx.vm
    while not ctx.stop:
        gpa = GPA + rng.randrange(PAGES - 4) * PAGE_SIZE
        st.in_op = True
        try:
            for attrs in (0, MemAttr.PRIVATE):
                ret, msg = yield from vm.set_memory_attributes_gen(gpa, 4 * PAGE_SIZE, attrs)
                if ret == -errno.EIO:            # the VM was bugged: stop, as the storm's actors do
                    ctx.dead.append(f"{st.name}: {msg}")
                    return
                assert ret == 0, msg
                ctx.count("flips")
        finally:
            st.in_op = False
        st.ops += 1
        yield PREEMPT                            # let the vCPUs run between operations


def main() -> dict:
    """Run 4 vCPU actors and the flipper for STEPS steps; return the per-kind counts."""
    host = Host(packages=2, cpus_per_package=2, memory=128 << 20, tdx_keyids=8, seed=SEED)
    kvm = Kvm(host)
    td = helpers.td_create(kvm, vcpus=4, memory=PAGES * PAGE_SIZE, gpa=GPA, initial_pages=0)
    slot = td.vm.memslots.id_to_memslot(0, 0)          # td_create made slot 0 over the area
    assert slot is not None
    ctx = StormContext(host, td.vm, td.gmem, 0, make_slot_flags(), slot.userspace_addr, GPA, PAGES, 4)
    sched = Scheduler(rng=host.rng("scheduler"))        # seeded: same seed, same interleaving
    for i, v in enumerate(td.vcpus):                    # the storm's vCPU actors, in its roles
        name = f"vcpu{i}.{ROLES[i % len(ROLES)]}"
        sched.add(vcpu_actor(ctx, v, ROLES[i % len(ROLES)], host.rng(name), ActorState(name)), name)
    sched.add(range_flipper(ctx, host.rng("flipper"), ActorState("flipper")), "flipper")
    for step in range(STEPS):
        a = sched.choose()
        if a is None:
            break
        sched.step(a)
        check_invariants(host)                          # raises InvariantViolation naming the id
        if step == STEPS - 1:
            ctx.stop = True                             # then drain: each actor finishes its op
    while (a := sched.choose()) is not None:
        sched.step(a)
    check_invariants(host)
    td.close()
    check_invariants(host)
    assert not host.leaks and not ctx.dead
    print(f"{STEPS} steps + drain, schedule of {len(sched.schedule)}: {dict(sorted(ctx.counts.items()))}")
    return dict(ctx.counts)


if __name__ == "__main__":
    main()
