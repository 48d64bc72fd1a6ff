# The busy try-lock (see _busylock.pyx for details). SEAMCALLs never block (SPEC §4.4): a try
# either takes the lock or returns TDX_OPERAND_BUSY|operand. These inline word operations are the
# contract every core uses for its lock words (S-EPT tree, S-EPT entry, PAMT entry, TD epoch, KOT).
#
# Word layout (constants.py): bit 63 BUSYLOCK_EXCL_BIT = held exclusively; bit 52
# BUSYLOCK_HOST_PRIORITY_BIT = a host exclusive try lost and asked for priority; bits 51:0 the
# number of shared holders. Acquire ordering on lock, release on unlock (_atomic.h).
from libc.stdint cimport uint64_t
from tdxcore._atomic cimport (
    tdx_atomic_load_relaxed, tdx_atomic_cas_acquire, tdx_atomic_fetch_or_relaxed,
    tdx_atomic_fetch_and_release, tdx_atomic_fetch_sub_release,
)
from tdxcore._defs cimport (
    BUSYLOCK_EXCL_BIT, BUSYLOCK_HOST_PRIORITY_BIT, BUSYLOCK_SHARED_MASK,
    TDX_SUCCESS, TDX_OPERAND_BUSY, TDX_OPERAND_BUSY_HOST_PRIORITY,
)

cdef inline uint64_t busylock_try_excl(uint64_t* word, uint64_t operand, bint host) noexcept nogil:
    """Try to take `word` exclusively; TDX_SUCCESS or a BUSY status. Never waits.

    A host try that loses sets the host-priority bit (the only side effect of a failed try, as the
    module's entry lock does); a guest try that finds that bit set gets
    TDX_OPERAND_BUSY_HOST_PRIORITY|operand. A host acquire clears the bit.
    """
    cdef uint64_t w = tdx_atomic_load_relaxed(word)
    if not host and (w & BUSYLOCK_HOST_PRIORITY_BIT):
        return TDX_OPERAND_BUSY_HOST_PRIORITY | operand
    if (w & (BUSYLOCK_EXCL_BIT | BUSYLOCK_SHARED_MASK)) == 0:
        if tdx_atomic_cas_acquire(word, &w, BUSYLOCK_EXCL_BIT if host else (w | BUSYLOCK_EXCL_BIT)):
            return TDX_SUCCESS
    # Held (or taken by another CPU between the load and the CAS): a conflict, never a spin.
    if host:
        tdx_atomic_fetch_or_relaxed(word, BUSYLOCK_HOST_PRIORITY_BIT)
    return TDX_OPERAND_BUSY | operand

cdef inline uint64_t busylock_try_shared(uint64_t* word, uint64_t operand, bint host) noexcept nogil:
    """Try to take `word` shared; TDX_SUCCESS or a BUSY status. Never waits on a holder.

    The CAS loop only repeats when another *shared* holder changed the count at the same moment
    (lock-free progress); an exclusive holder ends it with BUSY at once.
    """
    cdef uint64_t w = tdx_atomic_load_relaxed(word)
    while True:
        if not host and (w & BUSYLOCK_HOST_PRIORITY_BIT):
            return TDX_OPERAND_BUSY_HOST_PRIORITY | operand
        if w & BUSYLOCK_EXCL_BIT:
            return TDX_OPERAND_BUSY | operand
        if (w & BUSYLOCK_SHARED_MASK) == BUSYLOCK_SHARED_MASK:
            return TDX_OPERAND_BUSY | operand   # count saturated: refuse rather than overflow
        if tdx_atomic_cas_acquire(word, &w, w + 1):
            return TDX_SUCCESS

cdef inline void busylock_unlock_excl(uint64_t* word) noexcept nogil:
    """Release an exclusive hold, keeping a host-priority request made meanwhile."""
    tdx_atomic_fetch_and_release(word, ~BUSYLOCK_EXCL_BIT)

cdef inline void busylock_unlock_shared(uint64_t* word) noexcept nogil:
    """Release one shared hold."""
    tdx_atomic_fetch_sub_release(word, 1)

# ---------------------------------------------------------------------------------------------
# BusyLock: one lock word as a Python-visible object (SPEC §3.4). Other cores may hold a typed
# reference and call the cdef methods below without Python overhead.
# ---------------------------------------------------------------------------------------------
cdef class BusyLock:
    cdef uint64_t _word             # the lock word; touched only through atomics (busylock_* above)
    cdef readonly uint64_t operand  # operand id ORed into BUSY statuses; immutable after __cinit__
    cdef int _mutation              # test hook (_testing_mutate); set before use, immutable after
    cdef uint64_t _test_owner       # _testing_hammer only: current holder id (relaxed atomics)
    cdef uint64_t _test_counter     # _testing_hammer only: plain RMW, guarded by this lock (exclusive)

    # Never wait; TDX_SUCCESS or TDX_OPERAND_BUSY[_HOST_PRIORITY]|operand. Callable from any thread.
    cdef uint64_t try_excl_c(self, bint host) noexcept nogil
    cdef uint64_t try_shared_c(self, bint host) noexcept nogil
    # 0 released; -1 nothing of that kind was held (no change).
    cdef int unlock_excl_c(self) noexcept nogil
    cdef int unlock_shared_c(self) noexcept nogil
