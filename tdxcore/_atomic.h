/* The only hand-written C in tdxcore: explicit-order atomics over the GCC/Clang __atomic
 * builtins (STYLE 2.6). Acquire to lock, release to unlock, relaxed for statistics. */
#ifndef TDXCORE_ATOMIC_H
#define TDXCORE_ATOMIC_H
#include <stdint.h>

static inline uint64_t tdx_atomic_load_acquire(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint64_t tdx_atomic_load_relaxed(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void tdx_atomic_store_release(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline void tdx_atomic_store_relaxed(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
/* Compare-and-swap, strong, acquire on success (a lock acquire); *expected updated on failure. */
static inline int tdx_atomic_cas_acquire(uint64_t *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}
/* Compare-and-swap, strong, acq_rel on success (publish + observe, e.g. lazy chunk install). */
static inline int tdx_atomic_cas_acq_rel(uint64_t *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline uint64_t tdx_atomic_fetch_add_release(uint64_t *p, uint64_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELEASE);
}
static inline uint64_t tdx_atomic_fetch_sub_release(uint64_t *p, uint64_t v) {
    return __atomic_fetch_sub(p, v, __ATOMIC_RELEASE);
}
static inline uint64_t tdx_atomic_fetch_add_relaxed(uint64_t *p, uint64_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
static inline uint64_t tdx_atomic_fetch_sub_relaxed(uint64_t *p, uint64_t v) {
    return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED);
}
static inline uint64_t tdx_atomic_fetch_or_relaxed(uint64_t *p, uint64_t v) {
    return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}
static inline uint64_t tdx_atomic_fetch_and_release(uint64_t *p, uint64_t v) {
    return __atomic_fetch_and(p, v, __ATOMIC_RELEASE);
}
/* Pointer-sized CAS for lazily installed buffers (acq_rel; *expected updated on failure). */
static inline int tdx_atomic_cas_ptr(void **p, void **expected, void *desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline void *tdx_atomic_load_ptr(void *const *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
#endif
