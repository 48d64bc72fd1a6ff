# Declarations of tdxcore/_atomic.h (see the header for the memory orders).
from libc.stdint cimport uint64_t

cdef extern from "_atomic.h" nogil:
    uint64_t tdx_atomic_load_acquire(const uint64_t* p)
    uint64_t tdx_atomic_load_relaxed(const uint64_t* p)
    void tdx_atomic_store_release(uint64_t* p, uint64_t v)
    void tdx_atomic_store_relaxed(uint64_t* p, uint64_t v)
    int tdx_atomic_cas_acquire(uint64_t* p, uint64_t* expected, uint64_t desired)
    int tdx_atomic_cas_acq_rel(uint64_t* p, uint64_t* expected, uint64_t desired)
    uint64_t tdx_atomic_fetch_add_release(uint64_t* p, uint64_t v)
    uint64_t tdx_atomic_fetch_sub_release(uint64_t* p, uint64_t v)
    uint64_t tdx_atomic_fetch_add_relaxed(uint64_t* p, uint64_t v)
    uint64_t tdx_atomic_fetch_sub_relaxed(uint64_t* p, uint64_t v)
    uint64_t tdx_atomic_fetch_or_relaxed(uint64_t* p, uint64_t v)
    uint64_t tdx_atomic_fetch_and_release(uint64_t* p, uint64_t v)
    int tdx_atomic_cas_ptr(void** p, void** expected, void* desired)
    void* tdx_atomic_load_ptr(void* const* p)
