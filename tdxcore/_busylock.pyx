"""The module's busy try-lock as an object (SPEC §3.4, §4.4; STYLE §2.6; anchors §2.3).

Every lockable resource of the TDX module (S-EPT tree, S-EPT entry, PAMT entry, TD epoch, KOT) has
one 64-bit lock word (layout in ``_busylock.pxd``). A try either takes the lock or returns
``TDX_OPERAND_BUSY|operand`` — or ``TDX_OPERAND_BUSY_HOST_PRIORITY|operand`` for a guest try while
a host has asked for priority — and a failed try changes nothing, except that a failed *host
exclusive* try sets the host-priority bit; a host exclusive acquire clears it. Nothing here ever
waits or retries: retry loops are bounded, counted generators in ``kvm/`` (SPEC §2).

Other cores either embed a bare word and call the inline ``busylock_*`` operations of the .pxd, or
hold a typed :class:`BusyLock` and call its ``cdef`` methods; both are safe without the GIL.
The Python methods call the same ``cdef`` methods with the GIL held: a try is one atomic
compare-and-swap, far cheaper than a GIL release, and nothing in it relies on the GIL.
"""

cimport cython
from libc.stdint cimport uint64_t

from tdxcore._atomic cimport (
    tdx_atomic_cas_acq_rel, tdx_atomic_cas_acquire, tdx_atomic_fetch_and_release,
    tdx_atomic_fetch_or_relaxed, tdx_atomic_load_acquire, tdx_atomic_load_relaxed,
    tdx_atomic_store_relaxed,
)
from tdxcore._defs cimport (
    BUSYLOCK_EXCL_BIT, BUSYLOCK_HOST_PRIORITY_BIT, BUSYLOCK_SHARED_MASK, TDX_OPERAND_BUSY, TDX_SUCCESS,
)

import hashlib
import struct
import threading

from tdxcore.errors import TdxTypeError, TdxValueError, check_int

# Test-only mutations (_testing_mutate): each breaks exactly one rule of the lock word.
cdef enum:
    MUT_NONE = 0
    MUT_GUEST_IGNORES_HOST_PRIORITY = 1   # a guest try acts as if the host-priority bit were clear
    MUT_HOST_LOSS_NO_PRIORITY = 2         # a failed host exclusive try does not set the bit
    MUT_HOST_ACQUIRE_KEEPS_PRIORITY = 3   # a host exclusive acquire leaves the bit set

_MUTATIONS = {
    "guest_ignores_host_priority": MUT_GUEST_IGNORES_HOST_PRIORITY,
    "host_loss_no_priority": MUT_HOST_LOSS_NO_PRIORITY,
    "host_acquire_keeps_priority": MUT_HOST_ACQUIRE_KEEPS_PRIORITY,
}

# Operand ids are the low 32 bits of a status.
_OPERAND_LIMIT = 1 << 32


cdef inline bint _check_bool(str name, object value) except -1:
    if value is True:
        return True
    if value is False:
        return False
    msg = f"{name}={value!r} must be a bool (type={type(value).__name__})"
    raise TdxTypeError(msg, name=name, value=value)


cdef uint64_t _mutated_try(BusyLock l, bint excl, bint host) noexcept nogil:
    """The try with the lock's test mutation applied (slow path, tests only, never concurrent)."""
    cdef uint64_t before = tdx_atomic_load_relaxed(&l._word)
    cdef uint64_t st, w
    if l._mutation == MUT_GUEST_IGNORES_HOST_PRIORITY and not host:
        w = before
        if excl and (w & (BUSYLOCK_EXCL_BIT | BUSYLOCK_SHARED_MASK)) == 0:
            if tdx_atomic_cas_acquire(&l._word, &w, w | BUSYLOCK_EXCL_BIT):
                return TDX_SUCCESS
        elif not excl and not (w & BUSYLOCK_EXCL_BIT) and (w & BUSYLOCK_SHARED_MASK) != BUSYLOCK_SHARED_MASK:
            if tdx_atomic_cas_acquire(&l._word, &w, w + 1):
                return TDX_SUCCESS
        return TDX_OPERAND_BUSY | l.operand
    if excl:
        st = busylock_try_excl(&l._word, l.operand, host)
    else:
        st = busylock_try_shared(&l._word, l.operand, host)
    if excl and host and l._mutation == MUT_HOST_LOSS_NO_PRIORITY and st != TDX_SUCCESS:
        if not (before & BUSYLOCK_HOST_PRIORITY_BIT):
            tdx_atomic_fetch_and_release(&l._word, ~BUSYLOCK_HOST_PRIORITY_BIT)
    if excl and host and l._mutation == MUT_HOST_ACQUIRE_KEEPS_PRIORITY and st == TDX_SUCCESS:
        if before & BUSYLOCK_HOST_PRIORITY_BIT:
            tdx_atomic_fetch_or_relaxed(&l._word, BUSYLOCK_HOST_PRIORITY_BIT)
    return st


@cython.auto_pickle(False)
cdef class BusyLock:
    """One module try-lock word: shared/exclusive, with the entry lock's host-priority bit.

    Parameters
    ----------
    operand_id : int
        The operand id ORed into BUSY statuses (``OPERAND_ID_SEPT_TREE``, ``OPERAND_ID_RCX``...),
        in ``[0, 2**32)``.

    Notes
    -----
    Models the module's ``acquire_sharex_lock_*`` try-locks and the S-EPT entry lock's host
    priority (TDX module 1.5; anchors §2.3 lock table); SPEC §3.4, §4.4. Canonical serialization
    for :meth:`state_hash` (shared with the twin): ``struct.pack("<QQ", operand, word)``, hashed
    with ``blake2b(digest_size=8)`` and read little-endian. Pickling is refused: a lock word is
    live state of one module object.
    """

    def __cinit__(self, operand_id):
        self._word = 0
        self._mutation = MUT_NONE
        self._test_owner = 0
        self._test_counter = 0
        self.operand = check_int("operand_id", operand_id, 0, _OPERAND_LIMIT)

    def __init__(self, operand_id):
        # Everything happens in __cinit__ (so a subclass cannot skip it); this only gives
        # Python the signature.
        pass

    def __reduce__(self):
        msg = "BusyLock cannot be pickled: it is live lock state"
        raise TypeError(msg)

    def __repr__(self):
        return f"BusyLock(operand={self.operand:#x}, word={self.word:#018x})"

    # ------------------------------------------------------------------ cdef API (nogil)

    cdef uint64_t try_excl_c(self, bint host) noexcept nogil:
        """Try exclusive; never waits. Any thread, no GIL needed."""
        if self._mutation != MUT_NONE:
            return _mutated_try(self, True, host)
        return busylock_try_excl(&self._word, self.operand, host)

    cdef uint64_t try_shared_c(self, bint host) noexcept nogil:
        """Try shared; never waits on a holder. Any thread, no GIL needed."""
        if self._mutation != MUT_NONE:
            return _mutated_try(self, False, host)
        return busylock_try_shared(&self._word, self.operand, host)

    cdef int unlock_excl_c(self) noexcept nogil:
        """Release an exclusive hold (the caller's); -1 with no change if none is held."""
        if not (tdx_atomic_load_relaxed(&self._word) & BUSYLOCK_EXCL_BIT):
            return -1
        busylock_unlock_excl(&self._word)
        return 0

    cdef int unlock_shared_c(self) noexcept nogil:
        """Release one shared hold; -1 with no change if there is none."""
        # Checked decrement (a CAS) rather than the bare fetch-sub: a stray unlock must not
        # borrow from the host-priority bit.
        cdef uint64_t w = tdx_atomic_load_relaxed(&self._word)
        while (w & BUSYLOCK_SHARED_MASK) != 0:
            if tdx_atomic_cas_acq_rel(&self._word, &w, w - 1):
                return 0
        return -1

    # ------------------------------------------------------------------ Python API

    def try_shared(self, host=True):
        """Try to take the lock shared; return ``TDX_SUCCESS`` or a BUSY status (an int).

        Parameters
        ----------
        host : bool
            True for a host SEAMCALL, False for a guest TDCALL.

        Returns
        -------
        int
            ``TDX_SUCCESS``; ``TDX_OPERAND_BUSY|operand`` if held exclusively (or the shared count
            is saturated); ``TDX_OPERAND_BUSY_HOST_PRIORITY|operand`` for a guest try while the
            host-priority bit is set. A failure changes nothing.
        """
        cdef bint h = _check_bool("host", host)
        return self.try_shared_c(h)

    def try_exclusive(self, host=True):
        """Try to take the lock exclusively; return ``TDX_SUCCESS`` or a BUSY status (an int).

        Returns
        -------
        int
            ``TDX_SUCCESS`` (a host acquire also clears the host-priority bit);
            ``TDX_OPERAND_BUSY|operand`` if held (a host loser sets the host-priority bit, the
            only side effect of a failed try); ``TDX_OPERAND_BUSY_HOST_PRIORITY|operand`` for a
            guest try while that bit is set.
        """
        cdef bint h = _check_bool("host", host)
        return self.try_excl_c(h)

    def unlock_shared(self):
        """Release one shared hold.

        Raises
        ------
        TdxValueError
            No shared hold exists (unlock without lock); nothing changes.
        """
        if self.unlock_shared_c() < 0:
            msg = (f"unlock_shared: lock (operand {self.operand:#x}) has no shared holder "
                   f"(word={self.word:#x})")
            raise TdxValueError(msg, name="lock", value=self.word)

    def unlock_exclusive(self):
        """Release the exclusive hold, keeping a host-priority request made meanwhile.

        Raises
        ------
        TdxValueError
            The lock is not held exclusively; nothing changes.
        """
        if self.unlock_excl_c() < 0:
            msg = (f"unlock_exclusive: lock (operand {self.operand:#x}) is not held exclusively "
                   f"(word={self.word:#x})")
            raise TdxValueError(msg, name="lock", value=self.word)

    def clear_host_priority(self):
        """Drop a pending host-priority request (the holders, if any, are untouched)."""
        tdx_atomic_fetch_and_release(&self._word, ~BUSYLOCK_HOST_PRIORITY_BIT)

    @property
    def word(self):
        """The raw 64-bit lock word."""
        return tdx_atomic_load_acquire(&self._word)

    @property
    def is_locked(self):
        """Held exclusively or by at least one shared holder."""
        return (tdx_atomic_load_acquire(&self._word) & (BUSYLOCK_EXCL_BIT | BUSYLOCK_SHARED_MASK)) != 0

    @property
    def is_exclusive(self):
        """Held exclusively."""
        return (tdx_atomic_load_acquire(&self._word) & BUSYLOCK_EXCL_BIT) != 0

    @property
    def nr_shared(self):
        """Number of shared holders."""
        return tdx_atomic_load_acquire(&self._word) & BUSYLOCK_SHARED_MASK

    @property
    def host_priority(self):
        """A host exclusive try lost and no host has acquired since."""
        return (tdx_atomic_load_acquire(&self._word) & BUSYLOCK_HOST_PRIORITY_BIT) != 0

    def state_hash(self):
        """Return a stable 64-bit hash of (operand, word) (serialization: class docstring)."""
        data = struct.pack("<QQ", self.operand, tdx_atomic_load_acquire(&self._word))
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _testing_mutate(BusyLock lock, name):
    """Test hook: break one rule on ``lock`` (names in ``_MUTATIONS``; ``None`` undoes)."""
    if name is None:
        lock._mutation = MUT_NONE
        return
    if name not in _MUTATIONS:
        msg = f"name={name!r} is not a mutation of _busylock (one of {sorted(_MUTATIONS)})"
        raise TdxValueError(msg, name="name", value=name)
    lock._mutation = _MUTATIONS[name]


def _testing_counter(BusyLock lock):
    """Test hook: the plain counter ``_testing_hammer`` increments inside exclusive holds."""
    return lock._test_counter


def _testing_hammer(BusyLock lock, n_iters, host, shared=False, actor=None, n_acquire=0):
    """Test hook: try/unlock ``n_iters`` times without the GIL; return the outcome counts.

    With ``n_acquire > 0`` the loop also stops after that many acquisitions (``n_iters`` is then
    only a bound), so a test can ask every thread to get in a fixed number of times: readers can
    starve a writer and a host's priority bit a guest, but not once the others are done.

    Each exclusive success checks that no other holder is recorded in the lock's owner field,
    records itself, does a plain (non-atomic) increment of the lock's counter and re-checks the
    owner a few times, then clears the owner and unlocks. A shared success (``shared=True``)
    checks that no exclusive owner is recorded. Run from several threads at once, a correct
    lock gives ``n_violations == 0`` and a counter equal to the exclusive acquisitions.

    Returns
    -------
    tuple[int, int, int]
        ``(n_acquired, n_busy, n_violations)``.
    """
    cdef uint64_t n = check_int("n_iters", n_iters, 0, 1 << 40)
    cdef bint h = _check_bool("host", host)
    cdef bint sh = _check_bool("shared", shared)
    cdef uint64_t me = check_int("actor", threading.get_ident() if actor is None else actor, 1, 1 << 64)
    cdef uint64_t want = check_int("n_acquire", n_acquire, 0, 1 << 40)
    cdef uint64_t _i, _k, st, n_acq = 0, n_busy = 0, n_viol = 0
    with nogil:
        for _i in range(n):
            if want != 0 and n_acq == want:
                break
            st = lock.try_shared_c(h) if sh else lock.try_excl_c(h)
            if st != TDX_SUCCESS:
                n_busy += 1
                continue
            n_acq += 1
            if sh:
                for _k in range(4):
                    if tdx_atomic_load_relaxed(&lock._test_owner) != 0:
                        n_viol += 1
                lock.unlock_shared_c()
                continue
            if tdx_atomic_load_relaxed(&lock._test_owner) != 0:
                n_viol += 1
            tdx_atomic_store_relaxed(&lock._test_owner, me)
            lock._test_counter += 1
            for _k in range(4):
                if tdx_atomic_load_relaxed(&lock._test_owner) != me:
                    n_viol += 1
            tdx_atomic_store_relaxed(&lock._test_owner, 0)
            lock.unlock_excl_c()
    return (n_acq, n_busy, n_viol)
