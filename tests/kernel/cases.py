"""The guest_memfd / memslot cases run against the real ``/dev/kvm`` and the model (SPEC §4.11).

The case list is **data**: each case is a name, a one-line doc and a sequence of steps run on a
fresh DEFAULT VM (type 0). Every step produces one outcome, and a case's result is the list of its
step outcomes: ``"ok"`` (the call returned 0 or a new fd), an int (what ``KVM_CHECK_EXTENSION``
returned), ``"fill:xx"``/``"mixed"`` (a read of guest_memfd contents through a host mapping), or
an errno name (``"EINVAL"``; EOPNOTSUPP is spelled ``"ENOTSUP"``, the same value on Linux). The
recorded answers of the real kernel are in ``kvm_answers.json``, for these cases and for the
:func:`random_cases` of ``RANDOM_SEED`` (the live test also runs three more seeds, unrecorded).

What the real 6.18 kernel taught the model (where a first guess was wrong or upstream reading
was ambiguous; SPEC §4.11 — the kernel wins):

* guest_memfd is sparse: any positive aligned size up to ``2^63 - 4096`` is accepted;
  ``reserved[]`` is not checked; INIT_SHARED without MMAP is accepted on a DEFAULT VM.
* fallocate: ``offset + len`` past ``LLONG_MAX`` is EFBIG (``vfs_fallocate``), not EINVAL; the
  mode is checked before alignment; a punch at or past the end succeeds, an allocate does not.
* A DEFAULT VM binds guest_memfd (``CONFIG_KVM_GUEST_MEMFD``), and its
  ``KVM_CAP_GUEST_MEMFD_FLAGS`` is MMAP|INIT_SHARED.
* Setting an existing gmem slot again, even identically, is EINVAL (a plain slot: a no-op 0).
  Closing a bound guest_memfd keeps the slot; it can be deleted and its range bound anew.
* Deleting (size 0) still runs the flag and alignment checks first; guest_memfd fields are
  ignored without the GUEST_MEMFD flag.
* ``userspace_addr + memory_size`` may reach ``TASK_SIZE_MAX`` (2^47 - 4096) exactly.
* This kernel is built without SMM: ``KVM_CAP_MULTI_ADDRESS_SPACE`` is 0 and address space 1 is
  EINVAL, so the model has one address space. ``KVM_CAP_READONLY_MEM`` is 81 (not 31).
* Kernel-configuration answers are left out on purpose: ``KVM_CAP_VM_TYPES`` (1 here: no
  SW_PROTECTED, no TDX; the model offers SW_PROTECTED) and ``KVM_CAP_MEMORY_ATTRIBUTES`` on
  ``/dev/kvm`` (0 here: no memory attributes built; the model answers PRIVATE).

Steps (``op``, ``args``); names in ``as``/``fd``/``gmem``/``vm`` refer to objects made by earlier
steps of the same case; ``"vm"`` is the case's VM, ``"kvm"`` the ``/dev/kvm`` fd:

==================  =========================================================================
``check_extension``  ``cap``, ``fd`` ("vm") — KVM_CHECK_EXTENSION on the VM or ``/dev/kvm`` fd
``vm``               ``as`` — another DEFAULT VM
``gmem``             ``size``, ``flags`` (0), ``reserved`` (0: value of reserved[0]), ``vm``
                     ("vm"), ``as`` — KVM_CREATE_GUEST_MEMFD
``memfd``            ``as`` — memfd_create
``close``            ``fd`` — close(2) of a named fd
``fallocate``        ``fd``, ``mode``, ``offset``, ``len``
``gmem_write``       ``fd``, ``offset``, ``len``, ``byte`` — store through a shared mapping
``gmem_read``        ``fd``, ``offset``, ``len`` — load through a shared mapping
``region``           ``slot``, ``flags``, ``gpa``, ``size``, ``uaddr`` (offset into the case's
                     64 MiB anonymous mapping) or ``uaddr_abs`` — KVM_SET_USER_MEMORY_REGION
``region2``          as ``region`` plus ``gmem`` (a name or a raw int fd; default 0) and
                     ``gmem_offset`` (0) — KVM_SET_USER_MEMORY_REGION2
==================  =========================================================================
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from tdxcore.constants import (
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_READONLY_MEM,
    KVM_USER_MEM_SLOTS,
    Cap,
    FallocFlag,
    GmemFlag,
    MemFlag,
)

__all__ = ["CASES", "Step", "Case", "USER_MAP_SIZE"]

Step = Tuple[str, Dict[str, Any]]
Case = Dict[str, Any]

#: Bytes of anonymous user memory each case gets (``uaddr`` is an offset into it).
USER_MAP_SIZE = 64 << 20

MiB = 1 << 20
P = 4096
KEEP = int(FallocFlag.KEEP_SIZE)
PUNCH = int(FallocFlag.PUNCH_HOLE)
GM = int(MemFlag.GUEST_MEMFD)
RO = int(MemFlag.READONLY)
LOG = int(MemFlag.LOG_DIRTY_PAGES)
MMAP = int(GmemFlag.MMAP)
SHARED = int(GmemFlag.INIT_SHARED)
GPA = 0xC000_0000  # set_memory_region_test's MEM_REGION_GPA


def _case(name: str, doc: str, *steps: Step) -> Case:
    return {"name": name, "doc": doc, "steps": list(steps)}


def _g(size: int = 4 * P, flags: int = 0, as_: str = "g0", **kw: Any) -> Step:
    return ("gmem", {"size": size, "flags": flags, "as": as_, **kw})


def _fa(mode: int, offset: int, length: int, fd: str = "g0") -> Step:
    return ("fallocate", {"fd": fd, "mode": mode, "offset": offset, "len": length})


def _r2(slot: int = 0, flags: int = 0, gpa: int = GPA, size: int = 2 * MiB, uaddr: int = 0,
        **kw: Any) -> Step:
    return ("region2", {"slot": slot, "flags": flags, "gpa": gpa, "size": size, "uaddr": uaddr, **kw})


def _r1(slot: int = 0, flags: int = 0, gpa: int = GPA, size: int = 2 * MiB, uaddr: int = 0,
        **kw: Any) -> Step:
    return ("region", {"slot": slot, "flags": flags, "gpa": gpa, "size": size, "uaddr": uaddr, **kw})


def _gm(slot: int = 0, gmem: Any = "g0", gmem_offset: int = 0, gpa: int = GPA, size: int = 4 * P,
        flags: int = GM, **kw: Any) -> Step:
    return _r2(slot, flags, gpa, size, gmem=gmem, gmem_offset=gmem_offset, **kw)


CASES: List[Case] = [
    _case("caps", "KVM_CHECK_EXTENSION on a DEFAULT VM fd",
          ("check_extension", {"cap": int(Cap.GUEST_MEMFD)}),
          ("check_extension", {"cap": int(Cap.USER_MEMORY2)}),
          ("check_extension", {"cap": int(Cap.USER_MEMORY)}),
          ("check_extension", {"cap": int(Cap.NR_MEMSLOTS)}),
          ("check_extension", {"cap": KVM_CAP_GUEST_MEMFD_FLAGS}),
          ("check_extension", {"cap": KVM_CAP_READONLY_MEM}),
          ("check_extension", {"cap": KVM_CAP_MULTI_ADDRESS_SPACE}),
          ("check_extension", {"cap": int(Cap.MEMORY_ATTRIBUTES)}),
          ("check_extension", {"cap": 99999})),
    # ---- KVM_CREATE_GUEST_MEMFD
    _case("gmem_size_zero", "size 0", _g(0)),
    _case("gmem_size_unaligned", "sizes 1, 4095, 4097", _g(1), _g(4095, as_="g1"), _g(4097, as_="g2")),
    _case("gmem_size_negative", "size with bit 63 set is a negative loff_t", _g(1 << 63), _g((1 << 64) - P)),
    _case("gmem_size_huge", "huge aligned sizes: the file is sparse", _g(1 << 40), _g(1 << 62, as_="g1"),
          _g((1 << 63) - P, as_="g2")),
    _case("gmem_flags_mmap", "GUEST_MEMFD_FLAG_MMAP, INIT_SHARED, both", _g(flags=MMAP),
          _g(flags=SHARED, as_="g1"), _g(flags=MMAP | SHARED, as_="g2")),
    _case("gmem_flags_unknown", "flag bits outside KVM_CAP_GUEST_MEMFD_FLAGS",
          _g(flags=1 << 2), _g(flags=1 << 63, as_="g1"), _g(flags=MMAP | (1 << 5), as_="g2")),
    _case("gmem_flags_before_size", "bad flags and bad size: the flags check is first",
          _g(0, flags=1 << 2)),
    _case("gmem_reserved_nonzero", "reserved[0] != 0 is not checked", _g(reserved=1)),
    _case("gmem_two_files", "two guest_memfds of one VM", _g(), _g(8 * P, as_="g1")),
    # ---- fallocate on guest_memfd
    _case("falloc_no_keep_size", "mode 0 (would grow the file)", _g(), _fa(0, 0, P)),
    _case("falloc_keep_size", "allocate all, then a middle page", _g(), _fa(KEEP, 0, 4 * P), _fa(KEEP, P, P)),
    _case("falloc_punch_without_keep", "PUNCH_HOLE without KEEP_SIZE", _g(), _fa(PUNCH, 0, P)),
    _case("falloc_punch", "PUNCH_HOLE|KEEP_SIZE inside and at/past the end", _g(), _fa(KEEP, 0, 4 * P),
          _fa(KEEP | PUNCH, P, P), _fa(KEEP | PUNCH, 4 * P, P), _fa(KEEP | PUNCH, 8 * P, 2 * P),
          _fa(KEEP | PUNCH, 2 * P, 8 * P)),
    _case("falloc_unaligned", "unaligned offset or length, allocate and punch", _g(),
          _fa(KEEP, 1, P), _fa(KEEP, 0, P - 1), _fa(KEEP, P, 1), _fa(KEEP | PUNCH, 1, P),
          _fa(KEEP | PUNCH, 0, P + 1), _fa(KEEP | PUNCH, P - 1, P + 1)),
    _case("falloc_past_end", "allocate at, across and past the end", _g(), _fa(KEEP, 4 * P, P),
          _fa(KEEP, 3 * P, 2 * P), _fa(KEEP, 8 * P, P)),
    _case("falloc_len_zero", "len 0 and negative offset/len", _g(), _fa(KEEP, 0, 0), _fa(KEEP | PUNCH, 0, 0),
          _fa(KEEP, -P, P), _fa(KEEP, 0, -P)),
    _case("falloc_other_modes", "ZERO_RANGE, COLLAPSE_RANGE, INSERT_RANGE, unknown bits", _g(),
          _fa(KEEP | int(FallocFlag.ZERO_RANGE), 0, P), _fa(int(FallocFlag.COLLAPSE_RANGE), 0, P),
          _fa(int(FallocFlag.INSERT_RANGE), 0, P), _fa(KEEP | int(FallocFlag.UNSHARE_RANGE), 0, P),
          _fa(KEEP | (1 << 10), 0, P)),
    _case("falloc_overflow", "offset + len beyond LLONG_MAX", _g(), _fa(KEEP, 1 << 62, 1 << 62),
          _fa(KEEP | PUNCH, 1 << 62, 1 << 62)),
    _case("falloc_mode_before_alignment", "mode 0 with an unaligned offset: the mode check is first",
          _g(), _fa(0, 1, P), _fa(PUNCH, 1, 1)),
    _case("falloc_huge_file", "allocate and punch far into a 1 TiB file", _g(1 << 40),
          _fa(KEEP, (1 << 40) - P, P), _fa(KEEP | PUNCH, 1 << 39, 1 << 39)),
    _case("falloc_closed", "fallocate on a closed guest_memfd", _g(), ("close", {"fd": "g0"}),
          _fa(KEEP, 0, P)),
    _case("punch_reads_zero", "a punched page reads back zero; the others keep their bytes",
          _g(flags=MMAP | SHARED),
          ("gmem_read", {"fd": "g0", "offset": 0, "len": 4 * P}),
          ("gmem_write", {"fd": "g0", "offset": 0, "len": 4 * P, "byte": 0xAA}),
          _fa(KEEP | PUNCH, P, P),
          ("gmem_read", {"fd": "g0", "offset": 0, "len": P}),
          ("gmem_read", {"fd": "g0", "offset": P, "len": P}),
          ("gmem_read", {"fd": "g0", "offset": 2 * P, "len": 2 * P}),
          ("gmem_read", {"fd": "g0", "offset": 0, "len": 4 * P})),
    # ---- memslots without guest_memfd
    _case("slot_create_delete_readd", "create, identical again, delete, delete again, re-add",
          _r2(), _r2(), _r2(size=0), _r2(size=0), _r2()),
    _case("slot_delete_missing", "delete a slot that never existed", _r2(slot=3, size=0)),
    _case("slot_unaligned", "unaligned gpa, size, userspace_addr",
          _r2(gpa=GPA + 1), _r2(gpa=GPA + P - 1), _r2(size=2 * MiB + 1), _r2(size=P - 1), _r2(uaddr=1),
          _r2(uaddr=P + 8)),
    _case("slot_overlap", "overlapping GPA ranges, adjacent ranges",
          _r2(slot=0, gpa=GPA, size=2 * MiB), _r2(slot=1, gpa=GPA + MiB, size=2 * MiB, uaddr=4 * MiB),
          _r2(slot=1, gpa=GPA - MiB, size=2 * MiB, uaddr=4 * MiB),
          _r2(slot=1, gpa=GPA, size=P, uaddr=4 * MiB),
          _r2(slot=1, gpa=GPA + 2 * MiB, size=2 * MiB, uaddr=4 * MiB),
          _r2(slot=2, gpa=GPA - 2 * MiB, size=2 * MiB, uaddr=8 * MiB)),
    _case("slot_overlap_same_uaddr", "two slots may share userspace memory",
          _r2(slot=0), _r2(slot=1, gpa=GPA + 4 * MiB)),
    _case("slot_ids", "slot id limits and the address-space id in bits 16+",
          _r2(slot=KVM_USER_MEM_SLOTS - 1), _r2(slot=KVM_USER_MEM_SLOTS, gpa=GPA + 4 * MiB),
          _r2(slot=0xFFFF, gpa=GPA + 4 * MiB), _r2(slot=(1 << 16) | 5, gpa=GPA),
          _r2(slot=(2 << 16) | 5, gpa=GPA + 8 * MiB), _r2(slot=(1 << 16) | KVM_USER_MEM_SLOTS, gpa=GPA)),
    _case("slot_id_before_flags", "a bad slot id and a bad flag: the slot check is first",
          _r2(slot=KVM_USER_MEM_SLOTS, flags=1 << 7), _r2(slot=0, flags=1 << 7, gpa=GPA + 1)),
    _case("slot_move", "move, move onto another slot, change size/uaddr/flags",
          _r2(slot=0), _r2(slot=1, gpa=GPA + 4 * MiB, uaddr=4 * MiB),
          _r2(slot=0, gpa=GPA + 8 * MiB), _r2(slot=0, gpa=GPA + 5 * MiB),
          _r2(slot=0, gpa=GPA + 8 * MiB, size=MiB), _r2(slot=0, gpa=GPA + 8 * MiB, uaddr=8 * MiB),
          _r2(slot=0, gpa=GPA + 8 * MiB, flags=RO), _r2(slot=0, gpa=GPA + 8 * MiB, flags=LOG),
          _r2(slot=0, gpa=GPA + 8 * MiB, flags=0), _r2(slot=0, gpa=GPA)),
    _case("slot_flags", "flag rules of both ioctls",
          _r2(slot=0, flags=RO), _r2(slot=1, flags=LOG, gpa=GPA + 4 * MiB),
          _r2(slot=2, flags=1 << 3, gpa=GPA + 8 * MiB), _r1(slot=2, flags=1 << 3, gpa=GPA + 8 * MiB),
          _r1(slot=2, flags=GM, gpa=GPA + 8 * MiB), _r1(slot=2, flags=RO | LOG, gpa=GPA + 8 * MiB)),
    _case("slot_v1", "the v1 ioctl creates, moves and deletes too",
          _r1(slot=0), _r1(slot=0, gpa=GPA + 4 * MiB), _r2(slot=1, gpa=GPA + 4 * MiB),
          _r1(slot=0, size=0), _r1(slot=0, size=0)),
    _case("slot_wrap", "gpa + size wraps; gpa past the max gfn",
          _r2(gpa=(1 << 64) - MiB), _r2(gpa=1 << 52), _r2(gpa=(1 << 52) - MiB)),
    _case("slot_uaddr", "userspace_addr is checked by access_ok only, never for a mapping",
          _r2(slot=0, uaddr_abs=0), _r2(slot=1, uaddr_abs=0x10000, gpa=GPA + 4 * MiB),
          _r2(slot=2, uaddr_abs=1 << 47, gpa=GPA + 8 * MiB),
          _r2(slot=2, uaddr_abs=(1 << 47) - 2 * MiB, gpa=GPA + 8 * MiB),
          _r2(slot=3, uaddr_abs=(1 << 47) - MiB, gpa=GPA + 16 * MiB),
          _r2(slot=4, uaddr_abs=1 << 63, gpa=GPA + 32 * MiB),
          _r2(slot=5, uaddr_abs=(1 << 47) - P - 2 * MiB, gpa=GPA + 64 * MiB),
          _r2(slot=6, uaddr_abs=(1 << 47) - 2 * P - 2 * MiB, gpa=GPA + 128 * MiB)),
    # ---- memslots bound to guest_memfd
    _case("gmem_bind", "bind, then rebinding an identical slot is a change of a private slot",
          _g(), _gm(), _gm(), _gm(gpa=GPA + MiB), _gm(size=0), _gm()),
    _case("gmem_bind_fd_kinds", "GUEST_MEMFD flag with fds that are not a guest_memfd",
          _g(), ("memfd", {"as": "m0"}), _gm(gmem="m0"), _gm(gmem="vm"), _gm(gmem="kvm"),
          _gm(gmem=100000), _gm(gmem=(1 << 32) - 1), ("close", {"fd": "m0"}), _gm(gmem="m0")),
    _case("gmem_bind_closed", "a closed guest_memfd", _g(), ("close", {"fd": "g0"}), _gm()),
    _case("gmem_bind_other_vm", "another VM's guest_memfd",
          ("vm", {"as": "vm2"}), _g(vm="vm2", as_="g1"), _gm(gmem="g1")),
    _case("gmem_bind_offsets", "unaligned offsets, range past the file, offset overflow",
          _g(), _gm(gmem_offset=1), _gm(gmem_offset=P - 1), _gm(gmem_offset=P),
          _gm(gmem_offset=4 * P, size=P), _gm(gmem_offset=(1 << 64) - P),
          _gm(size=8 * P), _gm(gmem_offset=3 * P, size=P)),
    _case("gmem_bind_twice", "a guest_memfd range already bound (disjoint GPAs)",
          _g(8 * P), _gm(slot=0, size=4 * P),
          _gm(slot=1, gpa=GPA + MiB, size=4 * P),
          _gm(slot=1, gpa=GPA + MiB, size=4 * P, gmem_offset=2 * P),
          _gm(slot=1, gpa=GPA + MiB, size=P, gmem_offset=3 * P),
          _gm(slot=1, gpa=GPA + MiB, size=4 * P, gmem_offset=4 * P)),
    _case("gmem_bind_overlap_both", "GPA and gmem ranges both overlap: EEXIST comes first",
          _g(8 * P), _gm(slot=0, size=4 * P), _gm(slot=1, gpa=GPA + 2 * P, size=4 * P, gmem_offset=2 * P)),
    _case("gmem_flag_rules", "READONLY or LOG_DIRTY_PAGES with GUEST_MEMFD",
          _g(), _gm(flags=GM | RO), _gm(flags=GM | LOG), _gm(flags=GM | (1 << 3))),
    _case("gmem_flag_before_fd", "a bad flag with a bad fd: the flag check is first",
          _gm(flags=GM | RO, gmem=100000), _gm(gmem=100000, gpa=GPA + 1)),
    _case("gmem_slot_immutable", "a gmem slot cannot move or change flags; a plain slot cannot gain gmem",
          _g(), _gm(slot=0), _gm(slot=0, gpa=GPA + MiB), _r2(slot=0, size=4 * P),
          _r2(slot=0, size=4 * P, gpa=GPA + MiB), _r2(slot=1, gpa=GPA + 4 * MiB, size=4 * P),
          _gm(slot=1, gpa=GPA + 4 * MiB)),
    _case("gmem_delete_rebind", "delete a gmem slot, bind its range again", _g(), _gm(slot=0),
          _gm(slot=0, size=0), _gm(slot=1, gpa=GPA + MiB), _gm(slot=0, gpa=GPA + 2 * MiB)),
    _case("gmem_close_while_bound", "close a bound guest_memfd; the slot stays until deleted", _g(),
          _gm(slot=0), ("close", {"fd": "g0"}), _gm(slot=0, size=0), _g(as_="g1"), _gm(slot=0, gmem="g1"),
          _gm(slot=1, gmem="g1", gpa=GPA + MiB)),
    _case("gmem_ignored_without_flag", "guest_memfd fields are ignored without the flag",
          _r2(slot=0, gmem=100000, gmem_offset=1)),
    _case("gmem_negative_offset", "guest_memfd_offset with bit 63 set (negative loff_t, no u64 wrap)",
          _g(), _gm(gmem_offset=1 << 63)),
    _case("gmem_delete_v1", "a gmem slot deleted through the v1 ioctl", _g(), _gm(slot=0),
          _r1(slot=0, size=0), _gm(slot=1)),
    _case("delete_checks_first", "deleting still runs the flag and alignment checks first",
          _r2(slot=0), _r2(slot=0, size=0, flags=1 << 3), _r2(slot=0, size=0, gpa=GPA + 1),
          _r2(slot=0, size=0, uaddr=1), _r2(slot=0, size=0, gpa=GPA + 8 * MiB, uaddr=8 * MiB)),
    _case("gmem_outlives_vm_fd", "a guest_memfd still works after the VM fd is closed", _g(),
          ("close", {"fd": "vm"}), _fa(KEEP, 0, 4 * P), _fa(KEEP | PUNCH, 0, P), ("close", {"fd": "g0"})),
    _case("caps_system", "KVM_CHECK_EXTENSION on /dev/kvm",
          ("check_extension", {"cap": KVM_CAP_GUEST_MEMFD_FLAGS, "fd": "kvm"}),
          ("check_extension", {"cap": int(Cap.GUEST_MEMFD), "fd": "kvm"}),
          ("check_extension", {"cap": int(Cap.NR_MEMSLOTS), "fd": "kvm"}),
          ("check_extension", {"cap": KVM_CAP_READONLY_MEM, "fd": "kvm"})),
]


#: Seed and count of :func:`random_cases` that are recorded beside the hand-written cases.
RANDOM_SEED = 0
RANDOM_COUNT = 200


def random_cases(seed: int = RANDOM_SEED, count: int = RANDOM_COUNT, nr_steps: int = 14) -> List[Case]:
    """Return ``count`` seeded random memslot/guest_memfd sequences (a small, collision-rich space).

    Few slots, GPAs, sizes and offsets, so overlaps, moves, re-binds and deletes of existing
    slots happen often; the same seed always gives the same cases (``random.Random(seed)``).
    """
    import random

    rng = random.Random(seed)
    out: List[Case] = []
    for i in range(count):
        steps: List[Step] = [_g(8 * P), _g(4 * P, as_="g1", flags=MMAP), ("memfd", {"as": "m0"})]
        for _ in range(nr_steps):
            r = rng.random()
            if r < 0.7:
                flags = rng.choice([0, 0, GM, GM, GM, LOG, RO, GM | RO, GM | LOG, 1 << 3])
                kw: Dict[str, Any] = {"gmem": rng.choice(["g0", "g0", "g1", "m0", "vm", 100000]),
                                      "gmem_offset": rng.choice([0, 0, 2 * P, 4 * P, 6 * P, 1])}
                steps.append(_r2(slot=rng.choice([0, 1, 2, 3]), flags=flags,
                                 gpa=GPA + rng.choice([0, 2, 4, 6, 8, 64]) * P,
                                 size=rng.choice([0, 2 * P, 4 * P, 4 * P, 8 * P]),
                                 uaddr=rng.choice([0, 0, 4 * P]), **kw))
            elif r < 0.8:
                steps.append(_r1(slot=rng.choice([0, 1, 2, 3]), flags=rng.choice([0, LOG, RO, GM]),
                                 gpa=GPA + rng.choice([0, 2, 4, 8]) * P, size=rng.choice([0, 4 * P]),
                                 uaddr=rng.choice([0, 4 * P])))
            elif r < 0.95:
                steps.append(_fa(rng.choice([KEEP, KEEP, KEEP | PUNCH, PUNCH, 0]),
                                 rng.choice([0, 2, 4, 7, 8]) * P, rng.choice([1, 2, 4, 8]) * P,
                                 fd=rng.choice(["g0", "g1"])))
            else:
                steps.append(("close", {"fd": "g0"}))
                break  # "g0" is closed: its number must not be reused by a later step
        out.append(_case(f"random_{seed}_{i}", f"seeded random sequence {i} of seed {seed}", *steps))
    return out
