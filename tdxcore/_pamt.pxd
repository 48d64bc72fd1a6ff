# The PAMT core (tdx-facts §5.9): per-4K-frame page type, owner TDR, BEPOCH, PAMT entry lock word
# and, for PT_TDR frames, TDR.CHLDCNT. Chunked storage: the chunk directory is allocated in
# __cinit__, each chunk lazily on first write and published with a pointer CAS; an absent chunk
# reads as all-PT_NDA. No Python object per frame.
#
# Concurrency contract (STYLE §2.6): the directory pointer and nr_frames are immutable after
# __cinit__; chunk pointers are installed once with tdx_atomic_cas_ptr and read with
# tdx_atomic_load_ptr; `type` is claimed from PT_NDA with a CAS (double assignment is impossible
# even without the caller's lock); `owner`/`bepoch` of a frame are guarded by that frame's PAMT
# entry lock held by the module layer; child counts and per-type counters are atomic.
from libc.stdint cimport uint64_t
from tdxcore._alloc cimport alloc_stats

cdef enum:
    PAMT_CHUNK_SHIFT = 12                       # 4096 frames per chunk
    PAMT_CHUNK_FRAMES = 4096
    PAMT_CHUNK_MASK = 4095
    PAMT_NR_TYPES = 16                          # page type field is 5 bits upstream; our values < 16

cdef struct pamt_chunk:
    uint64_t type[PAMT_CHUNK_FRAMES]      # PageType (atomic: CAS from PT_NDA to assign)
    uint64_t owner[PAMT_CHUNK_FRAMES]     # owner TDR pfn; meaningful for non-NDA/RSVD/TDR (frame lock)
    uint64_t bepoch[PAMT_CHUNK_FRAMES]    # BEPOCH (atomic relaxed; frame lock)
    uint64_t lock[PAMT_CHUNK_FRAMES]      # PAMT entry busylock word (_busylock.pxd primitives)
    uint64_t chldcnt[PAMT_CHUNK_FRAMES]   # TDR.CHLDCNT for PT_TDR frames (atomic add/sub)


cdef inline bint pamt_is_tlb_tracked(uint64_t bepoch, uint64_t td_epoch,
                                     uint64_t refcount_prev) noexcept nogil:
    """True when BEPOCH is TLB-tracked (tdx-facts §3.4): b+1 < E, or b+1 == E with R_prev == 0.

    Written as comparisons against E-1 after ruling out E == 0, so nothing wraps.
    """
    if td_epoch == 0:
        return False
    if bepoch < td_epoch - 1:
        return True
    return bepoch == td_epoch - 1 and refcount_prev == 0


cdef class Pamt:
    cdef alloc_stats _mem                     # allocation accounting (atomic fields)
    cdef pamt_chunk** _chunks                 # chunk directory; immutable pointer, slots via ptr CAS
    cdef uint64_t _nr_chunks                  # immutable after __cinit__
    cdef readonly uint64_t nr_frames          # immutable after __cinit__
    cdef uint64_t _nr_by_type[PAMT_NR_TYPES]  # frames per type, NDA excluded (atomic relaxed)

    cdef pamt_chunk* _chunk(self, uint64_t pfn) noexcept nogil
    # -> the chunk holding pfn or NULL when absent. Caller validated pfn < nr_frames. Any thread.
    cdef pamt_chunk* _chunk_create(self, uint64_t pfn) noexcept nogil
    # -> the chunk holding pfn, allocating+publishing it if absent; NULL only on allocation failure.
    cdef uint64_t page_type_c(self, uint64_t pfn) noexcept nogil
    # -> PageType of pfn (PT_NDA when absent). Caller validated pfn < nr_frames.
    cdef uint64_t owner_c(self, uint64_t pfn) noexcept nogil
    # -> owner TDR pfn, PAMT_NO_OWNER for NDA/RSVD/TDR frames.
    cdef uint64_t bepoch_c(self, uint64_t pfn) noexcept nogil
    # -> BEPOCH of pfn (0 when absent).
    cdef uint64_t set_bepoch_c(self, uint64_t pfn, uint64_t epoch) noexcept nogil
    # -> TDX_SUCCESS, or U64_MAX when the chunk could not be allocated (no change).
    cdef uint64_t child_count_c(self, uint64_t pfn) noexcept nogil
    # -> TDR.CHLDCNT of a PT_TDR frame, 0 for any other frame.
    cdef uint64_t assign_c(self, uint64_t pfn, uint64_t page_type, uint64_t owner,
                           uint64_t operand) noexcept nogil
    # PT_NDA -> page_type (owner PAMT_NO_OWNER for PT_TDR, else `owner`, a PT_TDR frame whose
    # CHLDCNT is incremented); BEPOCH := 0. -> TDX_SUCCESS, TDX_PAGE_METADATA_INCORRECT|operand
    # (not NDA, or owner not a TDR), or U64_MAX on allocation failure (no change). pfn validated.
    cdef uint64_t release_c(self, uint64_t pfn, uint64_t operand) noexcept nogil
    # -> PT_NDA; TDX_PAGE_METADATA_INCORRECT|operand for NDA/RSVD, TDX_TD_ASSOCIATED_PAGES_EXIST
    # for a TDR with CHLDCNT != 0; decrements the owner's CHLDCNT. pfn validated.
    cdef uint64_t* lock_word_c(self, uint64_t pfn) noexcept nogil
    # -> the PAMT entry lock word of pfn (chunk created if needed); NULL on allocation failure.
