# KVM's per-VM memory-attribute store, `kvm->mem_attr_array` (SPEC §3.4, tdx-facts §7.3–§7.5).
# See _xarray.pyx for the design of both backends.
#
# Locking contract (tdx-facts §7.3): every writer (set_range, reserve, clear) is serialized by
# the caller, which holds KVM's `slots_lock` (kvm/attributes.py). Readers (get, __getitem__,
# get_many, has_range, runs, state_hash) may run concurrently with each other, with or without
# the GIL, but never with a writer: upstream readers use RCU, which this model replaces by the
# caller's lock. The core takes no lock of its own; no reader writes any field (no caches).
# `_mem` is the only field written concurrently, and only through atomics (_alloc.pxd).
cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from tdxcore._alloc cimport alloc_stats

cdef extern from *:
    int __builtin_popcountll(unsigned long long x) nogil
    int __builtin_ctzll(unsigned long long x) nogil

# Upstream's xarray geometry (include/linux/xarray.h, 64-bit, CONFIG_BASE_SMALL=0): 6 index bits
# per level, 64 slots per node, sizeof(struct xa_node) == 576. These belong in constants.py
# (requested from the lead); until then they live here, once.
cdef enum:
    XA_CHUNK_SHIFT = 6
    XA_CHUNK_SIZE = 64
    XA_CHUNK_MASK = 63
    XA_NODE_BYTES = 576

# The "ranges" backend's own geometry (a model choice, not an upstream value): containers cover
# one aligned window of 2^16 gfns (as a Roaring container does), a window holding more than
# RS_FOLD_RUNS runs of one value becomes a bitmap container, and up to RS_POOL_MAX freed bitmaps
# are kept for reuse so the steady state never allocates.
cdef enum:
    RS_WINDOW_SHIFT = 16
    RS_WINDOW = 65536
    RS_WINDOW_WORDS = 1024
    RS_FOLD_RUNS = 32
    RS_POOL_MAX = 2

cdef struct xa_node:
    uint8_t shift           # index bits below this node's slots; 0 = slots hold attribute words
    uint8_t offset          # this node's slot in its parent
    uint8_t count           # non-empty slots (children, or values when shift == 0)
    uint8_t fresh           # 1 while the node belongs to an unfinished reserve (rollback list)
    uint32_t _pad           # upstream's nr_values + padding; keeps the layout at 576 bytes
    xa_node* parent         # NULL for the root
    xa_node* new_next       # reserve's rollback list (upstream: the `array` back pointer)
    uint64_t _private[2]    # stands for upstream's private_list / rcu_head
    uint64_t slots[64]      # shift == 0: attribute words (0 = absent); else xa_node* children
    uint64_t marks[3]       # upstream's three mark bitmaps; unused here

cdef struct rs_bitmap:
    uint64_t popcount       # set bits in words (0 < popcount < RS_WINDOW while in use)
    uint64_t words[1024]    # bit i set <=> gfn window_start + i holds the container's value

cdef struct rs_item:
    uint64_t start          # first gfn
    uint64_t end            # one past the last gfn (exclusive)
    uint64_t value          # run: its attribute word (never 0); container: its non-zero value
    rs_bitmap* bm           # NULL = run item; else a bitmap container for [start, start + 2^16)

# A run collector / checker fed in ascending gfn order by both backends (readers only; lives on
# the reader's stack, so it needs no lock).
cdef struct rs_sink:
    uint64_t cur_start      # pending run, valid when has_cur
    uint64_t cur_end
    uint64_t cur_value
    bint has_cur
    size_t count            # runs flushed so far
    uint64_t* out           # NULL: count only; else room for 3 * count words
    bint check              # has_range mode instead of collecting
    uint64_t mask           # check mode: the mask and wanted bits
    uint64_t attrs
    uint64_t next           # check mode: first gfn not yet covered
    bint zero_ok            # check mode: an absent gfn (0) satisfies the test
    bint failed             # check mode: a gfn failed the test

cdef void rs_sink_emit(rs_sink* k, uint64_t start, uint64_t end, uint64_t value) noexcept nogil
cdef void rs_sink_flush(rs_sink* k) noexcept nogil
cdef uint64_t bm_next(const uint64_t* words, uint64_t pos, uint64_t lim, bint want_set) noexcept nogil
cdef void bm_fill(rs_bitmap* bm, uint64_t lo, uint64_t hi, bint set_bits) noexcept nogil
cdef uint64_t bm_nr_runs(const rs_bitmap* bm) noexcept nogil


@cython.final
cdef class AttributeStore:
    cdef alloc_stats _mem           # every byte this store holds; atomics (any thread)
    cdef bint _xa                   # True = "xarray" backend; immutable after __cinit__
    cdef int _mutation              # test hook (_testing_mutate); writers' lock (slots_lock)
    cdef size_t _fail_bytes         # size of the allocation that failed last; writers' lock
    # "ranges" backend. All guarded by the caller's slots_lock for writes; readers share them.
    cdef rs_item* _items            # sorted, non-overlapping items; NULL while _cap_items == 0
    cdef size_t _nr_items           # items in use
    cdef size_t _cap_items          # items allocated
    cdef uint64_t* _starts          # readers' search index: _starts[i] == _items[i].start after
                                    # every write (rebuilt at its end); capacity _cap_items
    cdef rs_bitmap* _pool[2]        # freed bitmaps kept for reuse (steady state allocates nothing)
    cdef size_t _nr_pool            # bitmaps in _pool
    # "xarray" backend. Guarded like the above.
    cdef xa_node* _root             # NULL = empty; else the top node (shift grows as needed)
    cdef xa_node* _new_nodes        # nodes made by the reserve in progress (rollback list)

    # ranges backend: lookups (readers; no lock beyond the contract above)
    cdef size_t _rs_upper(self, uint64_t gfn) noexcept nogil
    cdef size_t _rs_upper_index(self, uint64_t gfn) noexcept nogil
    cdef void _rs_sync_starts(self) noexcept nogil
    cdef size_t _rs_first_end_after(self, uint64_t gfn) noexcept nogil
    cdef Py_ssize_t _rs_container_at(self, uint64_t window) noexcept nogil
    cdef size_t _rs_count_in_window(self, uint64_t window) noexcept nogil
    cdef uint64_t _rs_get(self, uint64_t gfn) noexcept nogil
    cdef bint _rs_has_range(self, uint64_t start, uint64_t end, uint64_t mask,
                            uint64_t attrs) noexcept nogil
    cdef void _rs_feed(self, rs_sink* k) noexcept nogil
    # ranges backend: writers (caller holds slots_lock; input validated by the def method)
    cdef int _rs_ensure(self, size_t need_items, size_t need_bitmaps) noexcept nogil
    cdef int _rs_prepare_set(self, uint64_t start, uint64_t end, uint64_t value) noexcept nogil
    cdef int _rs_prepare_any(self, uint64_t start, uint64_t end) noexcept nogil
    cdef void _rs_release(self, rs_bitmap* bm) noexcept nogil
    cdef void _rs_replace(self, size_t lo, size_t hi, const rs_item* repl, size_t n) noexcept nogil
    cdef void _rs_coalesce(self, size_t i) noexcept nogil
    cdef void _rs_unfold(self, size_t i) noexcept nogil
    cdef void _rs_fold(self, uint64_t window, size_t lo, size_t hi) noexcept nogil
    cdef void _rs_fixup(self, uint64_t window) noexcept nogil
    cdef void _rs_put(self, uint64_t start, uint64_t end, uint64_t value) noexcept nogil
    cdef void _rs_assign(self, uint64_t start, uint64_t end, uint64_t value) noexcept nogil
    cdef void _rs_free_all(self) noexcept nogil
    # xarray backend: readers
    cdef uint64_t _xa_get(self, uint64_t gfn) noexcept nogil
    cdef int _xa_walk(self, xa_node* node, uint64_t base, uint64_t start, uint64_t end,
                      rs_sink* k) noexcept nogil
    # xarray backend: writers (caller holds slots_lock; input validated)
    cdef xa_node* _xa_new_node(self, uint8_t shift, xa_node* parent, uint8_t offset) noexcept nogil
    cdef int _xa_reserve(self, uint64_t start, uint64_t end) noexcept nogil
    cdef int _xa_store(self, uint64_t gfn, uint64_t value) noexcept nogil
    cdef void _xa_prune(self, xa_node* node, uint64_t base, uint64_t start,
                        uint64_t end) noexcept nogil
    cdef void _xa_shrink(self) noexcept nogil
    cdef void _xa_free_subtree(self, xa_node* node) noexcept nogil
    # both backends (writers return 0, or -1 after an allocation failure that changed nothing)
    cdef uint64_t _get(self, uint64_t gfn) noexcept nogil
    cdef int _set_range_locked(self, uint64_t start, uint64_t end, uint64_t value) noexcept nogil
    cdef int _reserve_locked(self, uint64_t start, uint64_t end) noexcept nogil
    cdef void _feed(self, rs_sink* k) noexcept nogil
