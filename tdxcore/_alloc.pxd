# The one allocation helper every core uses (STYLE 2.6): overflow-checked sizes, exact byte
# accounting for `nbytes`, and a test-only failure injector (tdxcore._testing).
#
# Each core object embeds one `alloc_stats` and passes its address to every call. All fields are
# updated with atomics, so a core may allocate from a nogil section on any thread.
from libc.stdint cimport uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from tdxcore._atomic cimport (
    tdx_atomic_fetch_add_relaxed, tdx_atomic_fetch_sub_relaxed, tdx_atomic_load_relaxed,
    tdx_atomic_cas_acq_rel,
)

cdef struct alloc_stats:
    uint64_t nbytes        # bytes currently allocated through this struct (atomic, relaxed)
    uint64_t nr_allocs     # successful allocations so far (atomic, relaxed)
    uint64_t fail_at       # test hook: the allocation with this 1-based number fails; 0 = never
    uint64_t nr_attempts   # allocation attempts so far (atomic), compared with fail_at

cdef inline bint _alloc_should_fail(alloc_stats* st) noexcept nogil:
    """Count one attempt; true when the test hook says this one fails."""
    cdef uint64_t n = tdx_atomic_fetch_add_relaxed(&st.nr_attempts, 1) + 1
    cdef uint64_t at = tdx_atomic_load_relaxed(&st.fail_at)
    return at != 0 and n == at

cdef inline void* tdx_alloc(alloc_stats* st, size_t count, size_t size, bint zero) noexcept nogil:
    """Allocate count*size bytes (zeroed if asked); NULL on overflow, failure or injected failure."""
    if size != 0 and count > (<size_t>-1) / size:
        return NULL
    if _alloc_should_fail(st):
        return NULL
    cdef size_t n = count * size
    cdef void* p
    if n == 0:
        n = 1
    p = calloc(1, n) if zero else malloc(n)
    if p != NULL:
        tdx_atomic_fetch_add_relaxed(&st.nbytes, n)
        tdx_atomic_fetch_add_relaxed(&st.nr_allocs, 1)
    return p

cdef inline void* tdx_realloc(alloc_stats* st, void* p, size_t old_bytes, size_t count,
                              size_t size) noexcept nogil:
    """Resize a block from tdx_alloc; NULL (old block untouched) on overflow or failure."""
    if size != 0 and count > (<size_t>-1) / size:
        return NULL
    if _alloc_should_fail(st):
        return NULL
    cdef size_t n = count * size
    if n == 0:
        n = 1
    cdef void* q = realloc(p, n)
    if q != NULL:
        if p != NULL:
            tdx_atomic_fetch_sub_relaxed(&st.nbytes, old_bytes if old_bytes != 0 else 1)
        tdx_atomic_fetch_add_relaxed(&st.nbytes, n)
        tdx_atomic_fetch_add_relaxed(&st.nr_allocs, 1)
    return q

cdef inline void tdx_free(alloc_stats* st, void* p, size_t nbytes) noexcept nogil:
    """Free a block from tdx_alloc of `nbytes` bytes (as allocated; 0-byte blocks count as 1)."""
    if p == NULL:
        return
    if nbytes == 0:
        nbytes = 1
    tdx_atomic_fetch_sub_relaxed(&st.nbytes, nbytes)
    free(p)
