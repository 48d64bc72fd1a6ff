# KVM's mmu_invalidate sequence/range tracking (see _invalidate.pyx for details; SPEC §4.7,
# tdx-facts §8). One InvalidateTracker per VM.
#
# Lock contract: writers (begin, range_add, end) are serialized by the caller's mmu_lock held for
# write, as upstream. Readers of the locked checks (retry, retry_gfn) hold mmu_lock for read; the
# lockless pre-check (retry_gfn_unsafe) holds nothing. Every field is nevertheless read and written
# through _atomic.h, so no nogil section ever performs a data race: the seq store is release and
# the in_progress decrement follows it (upstream's smp_wmb), and the locked checks load in_progress
# before seq with acquire ordering (upstream's smp_rmb).
from libc.stdint cimport uint64_t

cdef class InvalidateTracker:
    # mmu_invalidate_seq (unsigned long, wraps); atomic; written under mmu_lock (write)
    cdef uint64_t _seq
    # mmu_invalidate_in_progress; never negative (end refuses); atomic; written under mmu_lock (write)
    cdef uint64_t _in_progress
    # mmu_invalidate_range_start/_end: gfn range [start, end) or INVALID_GFN (all ones, upstream's
    # INVALID_GPA); relaxed atomics; written under mmu_lock (write); stale once in_progress is 0
    cdef uint64_t _range_start
    cdef uint64_t _range_end
    cdef uint64_t _nr_warnings    # non-fatal upstream WARNs (end with no range added); relaxed atomic
    cdef int _mutation            # test hook (_testing_mutate); set before use, immutable afterwards

    # Writers: the caller holds mmu_lock for write and has validated start < end <= MAX_GFN.
    cdef void begin_c(self) noexcept nogil
    # -1: not in progress (no change); 0: added
    cdef int range_add_c(self, uint64_t start, uint64_t end) noexcept nogil
    # -1: in_progress would go negative (no change); 1: ended but WARNed (no range); 0: ended
    cdef int end_c(self) noexcept nogil
    # Readers: retry_c / retry_gfn_c need mmu_lock (read or write); retry_gfn_unsafe_c needs nothing.
    cdef bint retry_c(self, uint64_t seq) noexcept nogil
    cdef bint retry_gfn_c(self, uint64_t seq, uint64_t gfn) noexcept nogil
    cdef bint retry_gfn_unsafe_c(self, uint64_t seq, uint64_t gfn) noexcept nogil
