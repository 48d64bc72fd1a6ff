# The secure-EPT radix tree (SPEC §3.4, §4.2; tdx-facts §3.1-§3.4). Tables are 512-entry pages
# from a pool the tree owns (every table through the tree's alloc_stats); there is no Python
# object per node. Each table records the host frame it stands for: SEPT.ADD consumes a frame,
# SEPT.REMOVE returns it; the root stands for a TDCS page and records PAMT_NO_OWNER.
#
# Concurrency contract: the tree has no lock of its own. Entry words and child pointers are
# guarded by the module layer's S-EPT tree BusyLock (TDCS SEPT_TREE: shared for walks, AUG,
# ADD, BLOCK, REMOVE together with the per-entry lock below; exclusive for SEPT.REMOVE, which
# frees a table) -- the module layer holds it around every call. Entry lock words are only
# touched through the _busylock.pxd primitives (atomics). levels/gpaw/shared_bit/tdr/pamt/_root
# are immutable after __cinit__; _nr_tables is atomic.
from libc.stdint cimport uint64_t
from tdxcore._alloc cimport alloc_stats
from tdxcore._pamt cimport Pamt

cdef enum:
    SEPT_NR_ENTRIES = 512

cdef struct sept_table:
    uint64_t entry[SEPT_NR_ENTRIES]     # S-EPT entries (module layout); tree lock + entry lock
    uint64_t lock[SEPT_NR_ENTRIES]      # per-entry host lock words (busylock, atomic)
    sept_table** child                  # level >= 1: child table per non-leaf entry; NULL at level 0
    uint64_t pfn                        # host frame this table stands for (PAMT_NO_OWNER: root)
    int level                           # level of the entries in this table (0 = 4K leaves)

cdef struct sept_result:
    uint64_t status                     # module status (U64_MAX: allocation failure, no change)
    uint64_t entry                      # RCX out: the S-EPT entry concerned
    uint64_t level_state                # RDX out: level | public_state << 8

cdef class SeptTree:
    cdef alloc_stats _mem               # allocation accounting (atomic fields)
    cdef sept_table* _root              # root table (level levels-1); immutable pointer
    cdef readonly Pamt pamt             # PAMT the tree assigns/releases frames in; immutable
    cdef readonly int levels            # 4 or 5; immutable
    cdef readonly int gpaw              # 48 or 52; immutable
    cdef readonly int shared_bit        # GPA bit number of the shared bit (gpaw - 1); immutable
    cdef readonly uint64_t tdr          # owner TDR pfn recorded for assigned frames; immutable
    cdef uint64_t _private_limit        # 1 << shared_bit: private GPAs are below; immutable
    cdef uint64_t _nr_tables            # tables incl. the root (atomic relaxed)
    cdef int _mutation                  # test-only transition flip (_testing_mutate); GIL
    cdef uint64_t _force_next           # test-only frame supply cursor (_testing_force_state); GIL

    cdef sept_table* _table_new(self, int level, uint64_t pfn) noexcept nogil
    # -> a FREE|SVE-filled table (NULL on allocation failure). No lock needed.
    cdef void _table_free(self, sept_table* t) noexcept nogil
    # Free one table's memory (not its children). Caller unlinked it under the tree lock (X).
    cdef void _subtree_free(self, sept_table* t) noexcept nogil
    # Free t and every table below it (memory only; PAMT untouched). __dealloc__ only.
    cdef uint64_t _check(self, uint64_t gpa, int level, int lo, int hi) noexcept nogil
    # Module operand check of GPA|level: TDX_SUCCESS or TDX_OPERAND_INVALID|RCX.
    cdef uint64_t _walk(self, uint64_t gpa, int level, sept_table** tbl, uint64_t* idx,
                        sept_result* r) noexcept nogil
    # Descend through non-leaf entries to `level`; fills r with EPT_WALK_FAILED|RCX on failure.
    cdef uint64_t _bepoch_of(self, uint64_t e) noexcept nogil
    # -> BEPOCH of the frame entry e points to (0 when beyond the PAMT).
    cdef uint64_t _add_range(self, sept_table* t, int L, uint64_t base, uint64_t lo,
                             uint64_t hi, const uint64_t* pages, uint64_t npages,
                             uint64_t* used, bint dry, sept_result* r) noexcept nogil
    # sept_add_range's recursion; dry=True only counts and checks (t may then be NULL).
    cdef uint64_t _collect(self, sept_table* t, uint64_t base, int target, uint64_t* buf,
                           uint64_t n) noexcept nogil
    cdef uint64_t _collect_tables(self, sept_table* t, uint64_t base, uint64_t* buf,
                                  uint64_t n) noexcept nogil
    # Inspection DFS (buf NULL = count only); the caller holds the tree lock shared.
    cdef uint64_t sept_add_c(self, uint64_t gpa, int level, uint64_t page, bint allow_existing,
                             sept_result* r) noexcept nogil
    cdef uint64_t page_add_c(self, uint64_t gpa, int level, uint64_t page,
                             sept_result* r) noexcept nogil
    cdef uint64_t page_aug_c(self, uint64_t gpa, int level, uint64_t page,
                             sept_result* r) noexcept nogil
    cdef uint64_t range_block_c(self, uint64_t gpa, int level, uint64_t td_epoch,
                                sept_result* r) noexcept nogil
    cdef uint64_t range_unblock_c(self, uint64_t gpa, int level, uint64_t td_epoch,
                                  uint64_t refcount_prev, bint tracking,
                                  sept_result* r) noexcept nogil
    cdef uint64_t page_remove_c(self, uint64_t gpa, int level, uint64_t td_epoch,
                                uint64_t refcount_prev, bint tracking,
                                sept_result* r) noexcept nogil
    cdef uint64_t sept_remove_c(self, uint64_t gpa, int level, uint64_t td_epoch,
                                uint64_t refcount_prev, bint tracking,
                                sept_result* r) noexcept nogil
    cdef uint64_t page_accept_c(self, uint64_t gpa, int level, sept_result* r) noexcept nogil
    # The leaves above: validated Python ints in, r filled, r.status returned (U64_MAX = OOM).
    # Callers (this module's def wrappers, the module layer) hold the tree lock as documented.
