"""KVM's per-VM memory-attribute store (`kvm->mem_attr_array`), two backends.

`AttributeStore` maps a gfn (0 <= gfn < MAX_GFN) to a u64 attribute word; 0 means "no entry"
as in KVM (tdx-facts §7.3). SPEC §3.4, §9 rows 1-4.

Backend "ranges" (default)
--------------------------
A sorted array of *items*, searched by binary search. An item is either

* a **run**: one non-zero value over an arbitrary span ``[start, end)`` (a 1 TiB all-private
  guest is one item), or
* a **bitmap container** for one aligned window of 2^16 gfns whose values are only ``{0, v}``:
  8 KiB, one bit per gfn, plus the value ``v`` and a popcount (the Roaring idea).

Gaps between items are 0. A window that ends up holding more than RS_FOLD_RUNS runs of a single
value after a set is *folded* into a container, so fragmentation never grows the item array past
~RS_FOLD_RUNS items per window, and a lookup is a binary search over a short array plus one bit
test. A container whose window becomes uniform turns back into a run (or nothing). A container
that receives a third value on part of its window is *unfolded* back into runs (a window with
several distinct non-zero values stays as runs: correct and logarithmic to look up, linear to
edit, and absent from KVM, which only stores PRIVATE). Adjacent runs of equal value are always
merged, so uniform regions cost one item.

A set runs in two phases. ``_rs_prepare_set`` computes an upper bound on what the set can need
(item slots, bitmaps) and allocates it, freeing anything new if one allocation fails, so a failure
changes nothing, not even ``nbytes`` (tdx-facts §7.5 step 3). ``_rs_assign`` then cannot fail.
Capacity is never given back during a set and freed bitmaps go to a two-entry pool, so toggling a
range (the conversion steady state) allocates nothing. ``reserve()`` computes the bound for any
value over any sub-range, which is why a set inside a reserved range cannot fail.

Backend "xarray"
----------------
A faithful per-index radix tree in upstream's shape: 6 index bits per level, 64-slot nodes of
576 bytes like Linux's ``struct xa_node``, internal nodes pointing to children, leaf slots holding
the attribute word (0 = absent), the height growing as needed (up to 9 levels for 52 bits), empty
nodes freed and the root shrunk after an erase. A set reserves every node the range needs first
(``xa_reserve`` in ``kvm_vm_set_mem_attributes``; a failure frees the new nodes and restores the
height), then stores gfn by gfn, each store walking from the root as ``xa_store`` does. This is
upstream's cost model: ~9 B per gfn dense, 512 stores per 2 MiB.

Locking: see the .pxd header. Writers are serialized by the caller (KVM's slots_lock); readers
may run concurrently with each other. `get_many` always releases the GIL. Other operations release
it only when their work is large (xarray loops over > XA_NOGIL_GFNS gfns, runs()): handing the GIL
over costs more than an O(log n) set or lookup does (SPEC §9 rows 1-2), and a short call keeps it.

Mirrors ``kvm_vm_set_mem_attributes()``, ``kvm_range_has_memory_attributes()`` and
``kvm_get_memory_attributes()`` in ``virt/kvm/kvm_main.c`` / ``include/linux/kvm_host.h`` (6.18).
"""

cimport cython
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy, memmove, memset
cimport numpy as cnp

import hashlib

import numpy as np

from tdxcore._alloc cimport alloc_stats, tdx_alloc, tdx_free
from tdxcore._atomic cimport tdx_atomic_load_relaxed, tdx_atomic_store_relaxed
from tdxcore._defs cimport MAX_GFN

from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.errors import check_int as _check_int
from tdxcore.errors import check_u64_array

cnp.import_array()

cdef extern from *:
    """
    /* Exact int -> u64 without building objects or raising: 1 and *out on success, 0 when the
       caller must take the slow (validating) path. On CPython < 3.12 a gfn-sized int is at most
       two 30-bit digits, read directly; later versions use the public API. */
    static CYTHON_INLINE int tdx_xa_fast_u64(PyObject* o, uint64_t limit, uint64_t* out) {
        uint64_t x;
        if (!PyLong_CheckExact(o)) return 0;
    #if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
        {
            Py_ssize_t size = Py_SIZE(o);
            const digit* d = ((PyLongObject*)o)->ob_digit;
            if (size == 0) x = 0;
            else if (size == 1) x = (uint64_t)d[0];
            else if (size == 2) x = (uint64_t)d[0] | ((uint64_t)d[1] << PyLong_SHIFT);
            else return 0;
        }
    #else
        {
            int overflow = 0;
            long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
            if (overflow != 0 || v < 0) { if (v == -1 && PyErr_Occurred()) PyErr_Clear(); return 0; }
            x = (uint64_t)v;
        }
    #endif
        if (x >= limit) return 0;
        *out = x;
        return 1;
    }
    """
    bint tdx_xa_fast_u64(object o, uint64_t limit, uint64_t* out) noexcept


# The mutations _testing_mutate can switch on (one per store; 0 = none).
cdef enum:
    MUT_NONE = 0
    MUT_SET_RANGE_SKIP_LAST = 1      # set_range leaves its last gfn unchanged (the seed's off-by-one)
    MUT_HAS_RANGE_IGNORE_GAPS = 2    # has_range treats absent gfns as matching any attrs

# Below this many gfns an xarray loop keeps the GIL (a GIL hand-over costs ~0.1 µs).
cdef enum:
    XA_NOGIL_GFNS = 4096

cdef dict _MUTATIONS = {
    "set_range_skip_last": MUT_SET_RANGE_SKIP_LAST,
    "has_range_ignore_gaps": MUT_HAS_RANGE_IGNORE_GAPS,
}

if sizeof(xa_node) != XA_NODE_BYTES:
    raise ImportError(f"xa_node is {sizeof(xa_node)} bytes, upstream's is {XA_NODE_BYTES}")


# --------------------------------------------------------------------------------------------
# Argument checks (with the GIL). The fast path takes an exact int in range without building any
# object; everything else goes through errors.check_int, which raises the right error.
# --------------------------------------------------------------------------------------------
cdef inline bint _fast_u64(object v, uint64_t limit, uint64_t* out) noexcept:
    """True and *out = v when v is an exact int with 0 <= v < limit (limit <= 2^60)."""
    return tdx_xa_fast_u64(v, limit, out)


cdef uint64_t _slow_u64(str name, object v, object hi) except? 0xFFFFFFFFFFFFFFFF:
    """Validate v as an int in [0, hi) (raises TdxTypeError / TdxValueError) and return it."""
    return _check_int(name, v, 0, hi)


cdef inline uint64_t _gfn_arg(str name, object v, bint inclusive) except? 0xFFFFFFFFFFFFFFFF:
    """A gfn in [0, MAX_GFN) or, for a range bound (inclusive), in [0, MAX_GFN]."""
    cdef uint64_t g
    cdef uint64_t limit = MAX_GFN + 1 if inclusive else MAX_GFN
    if _fast_u64(v, limit, &g):
        return g
    return _slow_u64(name, v, int(limit))


cdef inline uint64_t _u64_arg(str name, object v) except? 0xFFFFFFFFFFFFFFFF:
    """Any u64 (attribute word or mask)."""
    cdef uint64_t g
    if _fast_u64(v, <uint64_t>1 << 60, &g):
        return g
    return _slow_u64(name, v, 1 << 64)


cdef inline void _check_order(uint64_t start, uint64_t end) except *:
    if start > end:
        msg = f"start={start:#x} is greater than end={end:#x} (ranges are half-open [start, end))"
        raise TdxValueError(msg, name="start", value=start)


# --------------------------------------------------------------------------------------------
# Run sink and bitmap helpers (no lock: callers hold the store's contract).
# --------------------------------------------------------------------------------------------
cdef void rs_sink_flush(rs_sink* k) noexcept nogil:
    """Write out the pending run (collect mode)."""
    if k.has_cur:
        if k.out != NULL:
            k.out[3 * k.count] = k.cur_start
            k.out[3 * k.count + 1] = k.cur_end
            k.out[3 * k.count + 2] = k.cur_value
        k.count += 1
        k.has_cur = False


cdef void rs_sink_emit(rs_sink* k, uint64_t start, uint64_t end, uint64_t value) noexcept nogil:
    """Feed one non-zero run; runs arrive in ascending, non-overlapping order."""
    if k.check:
        if start > k.next and not k.zero_ok:
            k.failed = True
        if (value & k.mask) != k.attrs:
            k.failed = True
        k.next = end
        return
    if k.has_cur and k.cur_end == start and k.cur_value == value:
        k.cur_end = end
        return
    rs_sink_flush(k)
    k.cur_start = start
    k.cur_end = end
    k.cur_value = value
    k.has_cur = True


cdef uint64_t bm_next(const uint64_t* words, uint64_t pos, uint64_t lim, bint want_set) noexcept nogil:
    """First bit index in [pos, lim) whose bit equals want_set, or lim."""
    cdef uint64_t wi, w, r
    while pos < lim:
        wi = pos >> 6
        w = words[wi] if want_set else ~words[wi]
        w &= (~<uint64_t>0) << (pos & 63)
        if w != 0:
            r = (wi << 6) + <uint64_t>__builtin_ctzll(w)
            return r if r < lim else lim
        pos = (wi + 1) << 6
    return lim


cdef void bm_fill(rs_bitmap* bm, uint64_t lo, uint64_t hi, bint set_bits) noexcept nogil:
    """Set (or clear) bits [lo, hi) and keep popcount exact."""
    cdef uint64_t wi, b, n, m, old, new
    while lo < hi:
        wi = lo >> 6
        b = lo & 63
        n = 64 - b
        if hi - lo < n:
            n = hi - lo
        m = ((~<uint64_t>0) >> (64 - n)) << b
        old = bm.words[wi]
        new = (old | m) if set_bits else (old & ~m)
        bm.popcount = bm.popcount + <uint64_t>__builtin_popcountll(new) - <uint64_t>__builtin_popcountll(old)
        bm.words[wi] = new
        lo += n


cdef uint64_t bm_nr_runs(const rs_bitmap* bm) noexcept nogil:
    """Number of maximal runs of set bits (what an unfold turns into items)."""
    cdef uint64_t n = 0, carry = 0, w
    cdef size_t i
    for i in range(<size_t>RS_WINDOW_WORDS):
        w = bm.words[i]
        n += <uint64_t>__builtin_popcountll(w & ~((w << 1) | carry))
        carry = w >> 63
    return n


@cython.final
cdef class AttributeStore:
    """Map gfn -> u64 attribute word (0 = absent), as KVM's ``kvm->mem_attr_array``.

    Parameters
    ----------
    backend : {"ranges", "xarray"}
        ``"ranges"``: runs plus 2^16-gfn bitmap containers (O(1) items for uniform memory).
        ``"xarray"``: upstream's per-gfn radix tree and cost model (576-byte 64-slot nodes).

    Raises
    ------
    TdxTypeError
        `backend` is not a str.
    TdxValueError
        `backend` is not one of the two names.

    Notes
    -----
    Mirrors ``kvm->mem_attr_array`` in ``virt/kvm/kvm_main.c`` (6.18); SPEC §3.4, tdx-facts §7.3.
    Writers (`set_range`, `reserve`, `clear`) must be serialized by the caller (KVM's
    ``slots_lock``); readers (`get`, `get_many`, `has_range`, `runs`) may run concurrently with
    each other but not with a writer.
    """

    def __cinit__(self, backend="ranges"):
        self._items = NULL
        self._nr_items = 0
        self._cap_items = 0
        self._starts = NULL
        self._pool[0] = NULL
        self._pool[1] = NULL
        self._nr_pool = 0
        self._root = NULL
        self._new_nodes = NULL
        self._mutation = MUT_NONE
        self._fail_bytes = 0
        memset(&self._mem, 0, sizeof(alloc_stats))
        if not isinstance(backend, str):
            msg = f"backend={backend!r} must be a str (type={type(backend).__name__})"
            raise TdxTypeError(msg, name="backend", value=backend)
        if backend == "ranges":
            self._xa = False
        elif backend == "xarray":
            self._xa = True
        else:
            msg = f"backend={backend!r} is not one of 'ranges', 'xarray'"
            raise TdxValueError(msg, name="backend", value=backend)

    def __init__(self, backend="ranges"):
        pass    # everything happens in __cinit__; this gives Python the signature

    def __dealloc__(self):
        self._rs_free_all()
        if self._root != NULL:
            self._xa_free_subtree(self._root)
            self._root = NULL

    def __reduce__(self):
        raise TypeError("AttributeStore holds C memory and cannot be pickled")

    def __repr__(self):
        return f"AttributeStore(backend={self.backend!r}, nbytes={self.nbytes})"

    # ---------------------------------------------------------------------------------------
    # ranges backend: readers
    # ---------------------------------------------------------------------------------------
    cdef size_t _rs_upper(self, uint64_t gfn) noexcept nogil:
        """Number of items with start <= gfn.

        Branch-free binary search down to 8 candidates, then a branch-free count over them:
        with random keys (SPEC §9 rows 1 and 4) a branchy search mispredicts every other step,
        and a count has no dependency chain between its loads.
        """
        cdef size_t base = 0, n = self._nr_items, half, i, c = 0
        cdef const rs_item* items = self._items
        while n > 8:
            half = n >> 1
            base = base + half if items[base + half].start <= gfn else base
            n -= half
        for i in range(n):
            c += <size_t>(items[base + i].start <= gfn)
        return base + c

    cdef size_t _rs_upper_index(self, uint64_t gfn) noexcept nogil:
        """Number of items with start <= gfn, searched in the contiguous ``_starts`` index.

        Readers only: the index is rebuilt at the end of every write, so a writer part-way
        through a splice must use :meth:`_rs_upper`. Eight 8-byte starts share one cache line,
        where eight 32-byte items span four (SPEC §9 row 4: random lookups in a fragmented store).
        """
        cdef size_t base = 0, n = self._nr_items, half, i, c = 0
        cdef const uint64_t* starts = self._starts
        while n > 8:
            half = n >> 1
            base = base + half if starts[base + half] <= gfn else base
            n -= half
        for i in range(n):
            c += <size_t>(starts[base + i] <= gfn)
        return base + c

    cdef void _rs_sync_starts(self) noexcept nogil:
        """Rebuild the readers' search index after a write (O(items), like the write's splice)."""
        cdef size_t i
        for i in range(self._nr_items):
            self._starts[i] = self._items[i].start

    cdef size_t _rs_first_end_after(self, uint64_t gfn) noexcept nogil:
        """Index of the first item with end > gfn (ends are sorted like starts)."""
        cdef size_t i = self._rs_upper(gfn)
        if i > 0 and self._items[i - 1].end > gfn:
            return i - 1
        return i

    cdef Py_ssize_t _rs_container_at(self, uint64_t window) noexcept nogil:
        """Index of the bitmap container of `window`, or -1."""
        cdef uint64_t ws = window << RS_WINDOW_SHIFT
        cdef size_t i = self._rs_upper(ws)
        if i > 0 and self._items[i - 1].start == ws and self._items[i - 1].bm != NULL:
            return <Py_ssize_t>(i - 1)
        return -1

    cdef size_t _rs_count_in_window(self, uint64_t window) noexcept nogil:
        """Number of items intersecting `window`."""
        cdef uint64_t ws = window << RS_WINDOW_SHIFT
        cdef size_t lo = self._rs_first_end_after(ws)
        cdef size_t hi = self._rs_upper(ws + RS_WINDOW - 1)
        return hi - lo if hi > lo else 0

    cdef uint64_t _rs_get(self, uint64_t gfn) noexcept nogil:
        """The attribute word of gfn (0 if absent). Reader."""
        cdef size_t i = self._rs_upper_index(gfn)
        cdef rs_item* it
        cdef uint64_t off
        if i == 0:
            return 0
        it = &self._items[i - 1]
        if gfn >= it.end:
            return 0
        if it.bm == NULL:
            return it.value
        off = gfn - it.start
        # Mask instead of branch: fragmented bits are unpredictable.
        return it.value & (<uint64_t>0 - ((it.bm.words[off >> 6] >> (off & 63)) & 1))

    cdef bint _rs_has_range(self, uint64_t start, uint64_t end, uint64_t mask,
                            uint64_t attrs) noexcept nogil:
        """True iff every gfn in [start, end) has (attr & mask) == attrs. Reader; start < end."""
        cdef bint zero_ok = attrs == 0 or self._mutation == MUT_HAS_RANGE_IGNORE_GAPS
        cdef bint c_ok
        cdef size_t i = self._rs_first_end_after(start)
        cdef uint64_t pos = start, hi, lo_off, hi_off
        cdef rs_item* it
        while pos < end:
            if i >= self._nr_items or self._items[i].start >= end:
                return zero_ok
            it = &self._items[i]
            if it.start > pos:
                if not zero_ok:
                    return False
                pos = it.start
            hi = it.end if it.end < end else end
            c_ok = (it.value & mask) == attrs
            if it.bm == NULL:
                if not c_ok:
                    return False
            elif not (c_ok and zero_ok):
                lo_off = pos - it.start
                hi_off = hi - it.start
                if c_ok:
                    if bm_next(it.bm.words, lo_off, hi_off, False) != hi_off:
                        return False
                elif zero_ok:
                    if bm_next(it.bm.words, lo_off, hi_off, True) != hi_off:
                        return False
                else:
                    return False
            pos = hi
            i += 1
        return True

    cdef void _rs_feed(self, rs_sink* k) noexcept nogil:
        """Feed every non-zero run, ascending. Reader."""
        cdef size_t i
        cdef uint64_t a, b
        cdef rs_item* it
        for i in range(self._nr_items):
            it = &self._items[i]
            if it.bm == NULL:
                rs_sink_emit(k, it.start, it.end, it.value)
                continue
            b = 0
            while True:
                a = bm_next(it.bm.words, b, RS_WINDOW, True)
                if a == RS_WINDOW:
                    break
                b = bm_next(it.bm.words, a, RS_WINDOW, False)
                rs_sink_emit(k, it.start + a, it.start + b, it.value)

    # ---------------------------------------------------------------------------------------
    # ranges backend: writers (caller holds slots_lock; arguments validated)
    # ---------------------------------------------------------------------------------------
    cdef int _rs_ensure(self, size_t need_items, size_t need_bitmaps) noexcept nogil:
        """Make room for need_items items and need_bitmaps pooled bitmaps; all or nothing.

        Returns 0, or -1 after freeing whatever it allocated (``_fail_bytes`` says how much the
        failed allocation asked for).
        """
        cdef rs_item* new_items = NULL
        cdef uint64_t* new_starts = NULL
        cdef size_t new_cap = 0
        cdef rs_bitmap* got[2]
        cdef size_t nr_got = 0, j
        if need_bitmaps > RS_POOL_MAX:
            need_bitmaps = RS_POOL_MAX
        if need_items > self._cap_items:
            new_cap = self._cap_items * 2
            if new_cap < need_items:
                new_cap = need_items
            if new_cap < 8:
                new_cap = 8
            new_items = <rs_item*>tdx_alloc(&self._mem, new_cap, sizeof(rs_item), False)
            if new_items == NULL:
                self._fail_bytes = new_cap * sizeof(rs_item)
                return -1
            new_starts = <uint64_t*>tdx_alloc(&self._mem, new_cap, sizeof(uint64_t), False)
            if new_starts == NULL:
                self._fail_bytes = new_cap * sizeof(uint64_t)
                tdx_free(&self._mem, new_items, new_cap * sizeof(rs_item))
                return -1
        while self._nr_pool + nr_got < need_bitmaps:
            got[nr_got] = <rs_bitmap*>tdx_alloc(&self._mem, 1, sizeof(rs_bitmap), False)
            if got[nr_got] == NULL:
                self._fail_bytes = sizeof(rs_bitmap)
                for j in range(nr_got):
                    tdx_free(&self._mem, got[j], sizeof(rs_bitmap))
                tdx_free(&self._mem, new_items, new_cap * sizeof(rs_item))
                tdx_free(&self._mem, new_starts, new_cap * sizeof(uint64_t))
                return -1
            nr_got += 1
        # Everything is allocated: commit (nothing below can fail).
        if new_items != NULL:
            if self._nr_items:
                memcpy(new_items, self._items, self._nr_items * sizeof(rs_item))
            tdx_free(&self._mem, self._items, self._cap_items * sizeof(rs_item))
            if self._nr_items:
                memcpy(new_starts, self._starts, self._nr_items * sizeof(uint64_t))
            tdx_free(&self._mem, self._starts, self._cap_items * sizeof(uint64_t))
            self._items = new_items
            self._starts = new_starts
            self._cap_items = new_cap
        for j in range(nr_got):
            self._pool[self._nr_pool] = got[j]
            self._nr_pool += 1
        return 0

    cdef int _rs_prepare_set(self, uint64_t start, uint64_t end, uint64_t value) noexcept nogil:
        """Allocate what set_range(start, end, value) can need (start < end); 0 or -1."""
        cdef size_t need_items = self._nr_items + 3
        cdef size_t need_bitmaps = 0
        cdef uint64_t ws = start >> RS_WINDOW_SHIFT
        cdef uint64_t we = (end - 1) >> RS_WINDOW_SHIFT
        cdef uint64_t w, wstart
        cdef Py_ssize_t ci
        cdef int k
        for k in range(2):
            w = ws if k == 0 else we
            if k == 1 and we == ws:
                break
            wstart = w << RS_WINDOW_SHIFT
            ci = self._rs_container_at(w)
            if ci >= 0:
                # A partial write of a third value unfolds the container into runs (and the
                # window may fold again afterwards).
                if (not (start <= wstart and end >= wstart + RS_WINDOW)
                        and value != 0 and value != self._items[ci].value):
                    need_items += <size_t>bm_nr_runs(self._items[ci].bm) + 1
                    need_bitmaps += 1
            elif self._rs_count_in_window(w) + 2 > RS_FOLD_RUNS:
                need_bitmaps += 1
        if need_items <= self._cap_items and need_bitmaps <= self._nr_pool:
            return 0
        return self._rs_ensure(need_items, need_bitmaps)

    cdef int _rs_prepare_any(self, uint64_t start, uint64_t end) noexcept nogil:
        """Allocate what any set_range over any sub-range of [start, end) can need; 0 or -1."""
        cdef size_t need_bitmaps = 0
        cdef uint64_t r1 = 0, r2 = 0, r, w, last_w = <uint64_t>-1
        cdef size_t i = self._rs_first_end_after(start)
        cdef int k
        cdef rs_item* it
        # The edge windows of [start, end) count items outside the range too.
        for k in range(2):
            w = (start if k == 0 else end - 1) >> RS_WINDOW_SHIFT
            if self._rs_container_at(w) < 0 and self._rs_count_in_window(w) + 2 > RS_FOLD_RUNS:
                need_bitmaps += 1
        while i < self._nr_items and self._items[i].start < end:
            it = &self._items[i]
            if it.bm != NULL:
                r = bm_nr_runs(it.bm) + 1
                if r > r1:
                    r2 = r1
                    r1 = r
                elif r > r2:
                    r2 = r
                need_bitmaps += 1
            else:
                # Only windows holding item edges can gather enough runs to fold.
                for k in range(2):
                    w = (it.start if k == 0 else it.end - 1) >> RS_WINDOW_SHIFT
                    if w != last_w:
                        last_w = w
                        if (self._rs_container_at(w) < 0
                                and self._rs_count_in_window(w) + 2 > RS_FOLD_RUNS):
                            need_bitmaps += 1
            i += 1
        return self._rs_ensure(self._nr_items + 3 + <size_t>(r1 + r2), need_bitmaps)

    cdef void _rs_release(self, rs_bitmap* bm) noexcept nogil:
        """Give a container's bitmap back to the pool (or free it when the pool is full)."""
        if self._nr_pool < RS_POOL_MAX:
            self._pool[self._nr_pool] = bm
            self._nr_pool += 1
        else:
            tdx_free(&self._mem, bm, sizeof(rs_bitmap))

    cdef void _rs_replace(self, size_t lo, size_t hi, const rs_item* repl, size_t n) noexcept nogil:
        """Replace items[lo:hi] by repl[:n]; capacity was ensured by the prepare step."""
        cdef size_t tail = self._nr_items - hi
        if n != hi - lo and tail:
            memmove(&self._items[lo + n], &self._items[hi], tail * sizeof(rs_item))
        if n:
            memcpy(&self._items[lo], repl, n * sizeof(rs_item))
        self._nr_items = lo + n + tail

    cdef void _rs_coalesce(self, size_t i) noexcept nogil:
        """Merge run item i with equal adjacent runs on both sides."""
        cdef rs_item* it = &self._items[i]
        if it.bm != NULL:
            return
        if (i + 1 < self._nr_items and self._items[i + 1].bm == NULL
                and self._items[i + 1].start == it.end and self._items[i + 1].value == it.value):
            it.end = self._items[i + 1].end
            self._rs_replace(i + 1, i + 2, NULL, 0)
        if (i > 0 and self._items[i - 1].bm == NULL
                and self._items[i - 1].end == it.start and self._items[i - 1].value == it.value):
            self._items[i - 1].end = it.end
            self._rs_replace(i, i + 1, NULL, 0)

    cdef void _rs_unfold(self, size_t i) noexcept nogil:
        """Turn container i back into run items (room for them was ensured)."""
        cdef rs_bitmap* bm = self._items[i].bm
        cdef uint64_t base = self._items[i].start, value = self._items[i].value
        cdef size_t n = <size_t>bm_nr_runs(bm), j = 0
        cdef uint64_t a, b = 0
        cdef size_t tail = self._nr_items - i - 1
        if tail:
            memmove(&self._items[i + n], &self._items[i + 1], tail * sizeof(rs_item))
        self._nr_items += n - 1
        while j < n:
            a = bm_next(bm.words, b, RS_WINDOW, True)
            b = bm_next(bm.words, a, RS_WINDOW, False)
            self._items[i + j].start = base + a
            self._items[i + j].end = base + b
            self._items[i + j].value = value
            self._items[i + j].bm = NULL
            j += 1
        self._rs_release(bm)
        self._rs_coalesce(i + n - 1)
        self._rs_coalesce(i)

    cdef void _rs_fold(self, uint64_t window, size_t lo, size_t hi) noexcept nogil:
        """Turn run items[lo:hi] (all intersecting `window`, one value) into a container."""
        cdef uint64_t ws = window << RS_WINDOW_SHIFT
        cdef uint64_t we = ws + RS_WINDOW
        cdef uint64_t value = self._items[lo].value, a, b
        cdef rs_item repl[3]
        cdef size_t n = 0, k
        cdef rs_bitmap* bm
        self._nr_pool -= 1
        bm = self._pool[self._nr_pool]
        memset(bm, 0, sizeof(rs_bitmap))
        for k in range(lo, hi):
            a = self._items[k].start if self._items[k].start > ws else ws
            b = self._items[k].end if self._items[k].end < we else we
            bm_fill(bm, a - ws, b - ws, True)
        if self._items[lo].start < ws:
            repl[n].start = self._items[lo].start
            repl[n].end = ws
            repl[n].value = value
            repl[n].bm = NULL
            n += 1
        repl[n].start = ws
        repl[n].end = we
        repl[n].value = value
        repl[n].bm = bm
        n += 1
        if self._items[hi - 1].end > we:
            repl[n].start = we
            repl[n].end = self._items[hi - 1].end
            repl[n].value = value
            repl[n].bm = NULL
            n += 1
        self._rs_replace(lo, hi, repl, n)

    cdef void _rs_fixup(self, uint64_t window) noexcept nogil:
        """Restore the shape rules for an edge window of the last set."""
        cdef Py_ssize_t ci = self._rs_container_at(window)
        cdef uint64_t ws = window << RS_WINDOW_SHIFT
        cdef size_t lo, hi, k
        cdef rs_bitmap* bm
        if ci >= 0:
            bm = self._items[ci].bm
            if bm.popcount == 0:
                self._rs_replace(<size_t>ci, <size_t>ci + 1, NULL, 0)
                self._rs_release(bm)
            elif bm.popcount == RS_WINDOW:
                self._items[ci].bm = NULL
                self._rs_release(bm)
                self._rs_coalesce(<size_t>ci)
            return
        lo = self._rs_first_end_after(ws)
        hi = self._rs_upper(ws + RS_WINDOW - 1)
        if hi <= lo or hi - lo <= RS_FOLD_RUNS:
            return
        for k in range(lo + 1, hi):
            if self._items[k].value != self._items[lo].value:
                return      # several values: stays as runs (see the module docstring)
        self._rs_fold(window, lo, hi)

    cdef void _rs_put(self, uint64_t start, uint64_t end, uint64_t value) noexcept nogil:
        """Assign [start, end) at item level; no container is partly covered by the range."""
        cdef size_t lo = self._rs_first_end_after(start)
        cdef size_t hi = self._rs_upper(end - 1)
        cdef bint has_left = lo < hi and self._items[lo].start < start
        cdef bint has_right = lo < hi and self._items[hi - 1].end > end
        cdef rs_item left, right
        cdef rs_item repl[3]
        cdef size_t n = 0, k
        cdef uint64_t ns = start, ne = end
        if has_left:
            left = self._items[lo]
        if has_right:
            right = self._items[hi - 1]
        for k in range(lo, hi):
            if self._items[k].bm != NULL:
                self._rs_release(self._items[k].bm)
        if value != 0:
            if has_left:
                if left.value == value:
                    ns = left.start
                else:
                    repl[n].start = left.start
                    repl[n].end = start
                    repl[n].value = left.value
                    repl[n].bm = NULL
                    n += 1
            elif (lo > 0 and self._items[lo - 1].bm == NULL and self._items[lo - 1].end == start
                    and self._items[lo - 1].value == value):
                lo -= 1
                ns = self._items[lo].start
            if has_right and right.value == value:
                ne = right.end
                has_right = False
            elif (not has_right and hi < self._nr_items and self._items[hi].bm == NULL
                    and self._items[hi].start == end and self._items[hi].value == value):
                ne = self._items[hi].end
                hi += 1
            repl[n].start = ns
            repl[n].end = ne
            repl[n].value = value
            repl[n].bm = NULL
            n += 1
        elif has_left:
            repl[n].start = left.start
            repl[n].end = start
            repl[n].value = left.value
            repl[n].bm = NULL
            n += 1
        if has_right:
            repl[n].start = end
            repl[n].end = right.end
            repl[n].value = right.value
            repl[n].bm = NULL
            n += 1
        self._rs_replace(lo, hi, repl, n)

    cdef void _rs_assign(self, uint64_t start, uint64_t end, uint64_t value) noexcept nogil:
        """Set [start, end) to value (start < end) after _rs_prepare_set succeeded. Cannot fail."""
        cdef uint64_t ws = start >> RS_WINDOW_SHIFT
        cdef uint64_t we = (end - 1) >> RS_WINDOW_SHIFT
        cdef uint64_t wstart, wend, hi
        cdef Py_ssize_t ci = self._rs_container_at(ws)
        # Left edge window: a container only partly covered takes the write in its bitmap
        # (or is unfolded when the value is a third one).
        wstart = ws << RS_WINDOW_SHIFT
        wend = wstart + RS_WINDOW
        if ci >= 0 and not (start == wstart and end >= wend):
            if value == 0 or value == self._items[ci].value:
                hi = end if end < wend else wend
                bm_fill(self._items[ci].bm, start - wstart, hi - wstart, value != 0)
                start = hi
            else:
                self._rs_unfold(<size_t>ci)
        # Right edge window (distinct from the left one, so start < its first gfn here).
        if start < end and we != ws:
            ci = self._rs_container_at(we)
            wstart = we << RS_WINDOW_SHIFT
            if ci >= 0 and end < wstart + RS_WINDOW:
                if value == 0 or value == self._items[ci].value:
                    bm_fill(self._items[ci].bm, 0, end - wstart, value != 0)
                    end = wstart
                else:
                    self._rs_unfold(<size_t>ci)
        if start < end:
            self._rs_put(start, end, value)
        self._rs_fixup(ws)
        if we != ws:
            self._rs_fixup(we)

    cdef void _rs_free_all(self) noexcept nogil:
        """Free every item, container and pooled bitmap (clear / dealloc)."""
        cdef size_t i
        if self._items != NULL:
            for i in range(self._nr_items):
                if self._items[i].bm != NULL:
                    tdx_free(&self._mem, self._items[i].bm, sizeof(rs_bitmap))
            tdx_free(&self._mem, self._items, self._cap_items * sizeof(rs_item))
        if self._starts != NULL:
            tdx_free(&self._mem, self._starts, self._cap_items * sizeof(uint64_t))
        self._items = NULL
        self._starts = NULL
        self._nr_items = 0
        self._cap_items = 0
        for i in range(self._nr_pool):
            tdx_free(&self._mem, self._pool[i], sizeof(rs_bitmap))
            self._pool[i] = NULL
        self._nr_pool = 0

    # ---------------------------------------------------------------------------------------
    # xarray backend
    # ---------------------------------------------------------------------------------------
    cdef uint64_t _xa_get(self, uint64_t gfn) noexcept nogil:
        """Walk from the root as xa_load() does; 0 when absent. Reader."""
        cdef xa_node* n = self._root
        if n == NULL or (gfn >> n.shift) >= XA_CHUNK_SIZE:
            return 0
        while n.shift != 0:
            n = <xa_node*>n.slots[(gfn >> n.shift) & XA_CHUNK_MASK]
            if n == NULL:
                return 0
        return n.slots[gfn & XA_CHUNK_MASK]

    cdef int _xa_walk(self, xa_node* node, uint64_t base, uint64_t start, uint64_t end,
                      rs_sink* k) noexcept nogil:
        """Feed the entries of node's subtree inside [start, end) in order; 1 = stop early."""
        cdef uint64_t span = (<uint64_t>1) << node.shift
        cdef uint64_t off = (start - base) >> node.shift if start > base else 0
        cdef uint64_t lo, x
        while off < XA_CHUNK_SIZE:
            lo = base + off * span
            if lo >= end:
                break
            x = node.slots[off]
            if x != 0:
                if node.shift == 0:
                    rs_sink_emit(k, lo, lo + 1, x)
                    if k.failed:
                        return 1
                elif self._xa_walk(<xa_node*>x, lo, start, end, k):
                    return 1
            off += 1
        return 0

    cdef xa_node* _xa_new_node(self, uint8_t shift, xa_node* parent, uint8_t offset) noexcept nogil:
        """Allocate a zeroed node and put it on the reserve's rollback list (NULL on failure)."""
        cdef xa_node* n = <xa_node*>tdx_alloc(&self._mem, 1, sizeof(xa_node), True)
        if n == NULL:
            self._fail_bytes = sizeof(xa_node)
            return NULL
        n.shift = shift
        n.parent = parent
        n.offset = offset
        n.fresh = 1
        n.new_next = self._new_nodes
        self._new_nodes = n
        return n

    cdef int _xa_reserve(self, uint64_t start, uint64_t end) noexcept nogil:
        """Create every node [start, end) needs (start < end), as xa_reserve(); 0 or -1.

        On failure every node made here is freed and the old root and height are restored.
        """
        cdef xa_node* old_root = self._root
        cdef xa_node* n
        cdef xa_node* child
        cdef xa_node* nx
        cdef uint64_t last = end - 1, g = start, off
        cdef uint8_t shift = 0
        self._new_nodes = NULL
        if self._root == NULL:
            while (last >> shift) >= XA_CHUNK_SIZE:
                shift += XA_CHUNK_SHIFT
            self._root = self._xa_new_node(shift, NULL, 0)
            if self._root == NULL:
                return -1
        else:
            while (last >> self._root.shift) >= XA_CHUNK_SIZE:
                n = self._xa_new_node(self._root.shift + XA_CHUNK_SHIFT, NULL, 0)
                if n == NULL:
                    break
                n.slots[0] = <uint64_t>self._root
                n.count = 1
                self._root.parent = n
                self._root.offset = 0
                self._root = n
        if self._root != NULL and (last >> self._root.shift) < XA_CHUNK_SIZE:
            while True:
                n = self._root
                while n.shift != 0:
                    off = (g >> n.shift) & XA_CHUNK_MASK
                    child = <xa_node*>n.slots[off]
                    if child == NULL:
                        child = self._xa_new_node(n.shift - XA_CHUNK_SHIFT, n, <uint8_t>off)
                        if child == NULL:
                            break
                        n.slots[off] = <uint64_t>child
                        n.count += 1
                    n = child
                if n.shift != 0:
                    break               # an allocation failed
                if (g | XA_CHUNK_MASK) >= last:
                    n = self._new_nodes
                    while n != NULL:
                        n.fresh = 0
                        n = n.new_next
                    self._new_nodes = NULL
                    return 0
                g = (g | XA_CHUNK_MASK) + 1
        # Roll back: detach new nodes from old parents, then free them all, restore the root.
        # Two passes: a node's parent may itself be new and listed *before* it (a root grown by
        # two levels: the list is newest first), so no parent may be freed while a child still
        # looks at it (an ASan heap-use-after-free before; tests/hardening/test_core_regressions).
        n = self._new_nodes
        while n != NULL:
            if n.parent != NULL and not n.parent.fresh:
                n.parent.slots[n.offset] = 0
                n.parent.count -= 1
            n = n.new_next
        n = self._new_nodes
        while n != NULL:
            nx = n.new_next
            tdx_free(&self._mem, n, sizeof(xa_node))
            n = nx
        self._new_nodes = NULL
        self._root = old_root
        if old_root != NULL:
            old_root.parent = NULL
            old_root.offset = 0
        return -1

    cdef int _xa_store(self, uint64_t gfn, uint64_t value) noexcept nogil:
        """Store one gfn walking from the root, as xa_store(); -1 if a node is missing (bug)."""
        cdef xa_node* n = self._root
        cdef uint64_t off, old
        if n == NULL or (gfn >> n.shift) >= XA_CHUNK_SIZE:
            return 0 if value == 0 else -1
        while n.shift != 0:
            n = <xa_node*>n.slots[(gfn >> n.shift) & XA_CHUNK_MASK]
            if n == NULL:
                return 0 if value == 0 else -1
        off = gfn & XA_CHUNK_MASK
        old = n.slots[off]
        if old == 0 and value != 0:
            n.count += 1
        elif old != 0 and value == 0:
            n.count -= 1
        n.slots[off] = value
        return 0

    cdef void _xa_prune(self, xa_node* node, uint64_t base, uint64_t start,
                        uint64_t end) noexcept nogil:
        """Free the empty nodes below `node` that intersect [start, end)."""
        cdef uint64_t span = (<uint64_t>1) << node.shift
        cdef uint64_t off = (start - base) >> node.shift if start > base else 0
        cdef uint64_t lo
        cdef xa_node* child
        if node.shift == 0:
            return
        while off < XA_CHUNK_SIZE:
            lo = base + off * span
            if lo >= end:
                break
            child = <xa_node*>node.slots[off]
            if child != NULL:
                self._xa_prune(child, lo, start, end)
                if child.count == 0:
                    tdx_free(&self._mem, child, sizeof(xa_node))
                    node.slots[off] = 0
                    node.count -= 1
            off += 1

    cdef void _xa_shrink(self) noexcept nogil:
        """Drop an empty root, and root levels that only use slot 0 (xas_shrink)."""
        cdef xa_node* r = self._root
        cdef xa_node* child
        while r != NULL:
            if r.count == 0:
                tdx_free(&self._mem, r, sizeof(xa_node))
                r = NULL
            elif r.shift != 0 and r.count == 1 and r.slots[0] != 0:
                child = <xa_node*>r.slots[0]
                tdx_free(&self._mem, r, sizeof(xa_node))
                child.parent = NULL
                child.offset = 0
                r = child
            else:
                break
        self._root = r

    cdef void _xa_free_subtree(self, xa_node* node) noexcept nogil:
        """Free node and everything below it."""
        cdef size_t i
        if node.shift != 0:
            for i in range(<size_t>XA_CHUNK_SIZE):
                if node.slots[i] != 0:
                    self._xa_free_subtree(<xa_node*>node.slots[i])
        tdx_free(&self._mem, node, sizeof(xa_node))

    # ---------------------------------------------------------------------------------------
    # Both backends
    # ---------------------------------------------------------------------------------------
    cdef uint64_t _get(self, uint64_t gfn) noexcept nogil:
        """Attribute word of a validated gfn. Reader."""
        if self._xa:
            return self._xa_get(gfn)
        return self._rs_get(gfn)

    cdef int _set_range_locked(self, uint64_t start, uint64_t end, uint64_t value) noexcept nogil:
        """Reserve, then store [start, end) = value (start < end); 0, or -1 with nothing changed.

        Caller holds slots_lock; arguments validated. Mirrors kvm_vm_set_mem_attributes() steps
        3 and 5 (tdx-facts §7.5).
        """
        cdef uint64_t g
        if self._xa:
            if value != 0 and self._xa_reserve(start, end) < 0:
                return -1
            g = start
            while g < end:
                # A failed store after a good reserve is a KVM bug (WARN there); it cannot
                # happen here because the reserve covered every gfn.
                self._xa_store(g, value)
                g += 1
            if value == 0 and self._root != NULL:
                self._xa_prune(self._root, 0, start, end)
                self._xa_shrink()
            return 0
        if self._rs_prepare_set(start, end, value) < 0:
            return -1
        self._rs_assign(start, end, value)
        self._rs_sync_starts()
        return 0

    cdef int _reserve_locked(self, uint64_t start, uint64_t end) noexcept nogil:
        """Allocate for any set inside [start, end) (start < end); 0, or -1 with nothing changed."""
        if self._xa:
            return self._xa_reserve(start, end)
        return self._rs_prepare_any(start, end)

    cdef void _feed(self, rs_sink* k) noexcept nogil:
        """Feed all non-zero runs ascending (then flush). Reader."""
        if self._xa:
            if self._root != NULL:
                self._xa_walk(self._root, 0, 0, MAX_GFN, k)
        else:
            self._rs_feed(k)
        rs_sink_flush(k)

    # ---------------------------------------------------------------------------------------
    # Python API
    # ---------------------------------------------------------------------------------------
    @property
    def backend(self):
        """The backend name, ``"ranges"`` or ``"xarray"``."""
        return "xarray" if self._xa else "ranges"

    @property
    def nbytes(self):
        """Bytes this store holds right now, as counted by the allocation helper (_alloc.pxd)."""
        return tdx_atomic_load_relaxed(&self._mem.nbytes)

    def __getitem__(self, gfn):
        """Return the attribute word of `gfn` (0 when absent); same as :meth:`get`."""
        cdef uint64_t g
        if not _fast_u64(gfn, MAX_GFN, &g):
            g = _gfn_arg("gfn", gfn, False)
        return self._get(g)

    def get(self, gfn):
        """Return the attribute word of one gfn (0 when absent).

        Parameters
        ----------
        gfn : int
            0 <= gfn < MAX_GFN.

        Returns
        -------
        int
            The u64 attribute word.

        Raises
        ------
        TdxTypeError
            `gfn` is not an int.
        TdxValueError
            `gfn` is out of range.

        Notes
        -----
        Mirrors ``kvm_get_memory_attributes()`` in ``include/linux/kvm_host.h`` (6.18); SPEC §3.4.
        Reader: may run concurrently with other readers, never with a writer.
        """
        cdef uint64_t g
        if not _fast_u64(gfn, MAX_GFN, &g):
            g = _gfn_arg("gfn", gfn, False)
        return self._get(g)

    def get_many(self, gfns):
        """Return the attribute words of many gfns, looked up without the GIL.

        Parameters
        ----------
        gfns : array_like
            1-D integer array of gfns, each 0 <= gfn < MAX_GFN.

        Returns
        -------
        numpy.ndarray
            uint64 array, same length as `gfns` (a new array).

        Raises
        ------
        TdxTypeError
            `gfns` is not an integer array (float, bool, object...).
        TdxValueError
            `gfns` is not 1-D, or holds a gfn out of range.

        Notes
        -----
        Batch form of ``kvm_get_memory_attributes()`` (6.18); SPEC §3.4. Reader.
        """
        cdef cnp.ndarray arr = _gfn_array(gfns)
        cdef Py_ssize_t n = arr.shape[0], i
        out = np.empty(n, dtype=np.uint64)
        cdef const uint64_t[::1] src = arr
        cdef uint64_t[::1] dst = out
        with nogil:
            for i in range(n):
                dst[i] = self._get(src[i])
        return out

    def set_range(self, start, end, attrs):
        """Set every gfn in ``[start, end)`` to `attrs` (0 erases), all or nothing.

        Parameters
        ----------
        start, end : int
            Half-open gfn range, 0 <= start <= end <= MAX_GFN. An empty range changes nothing.
        attrs : int
            u64 attribute word.

        Raises
        ------
        TdxTypeError
            An argument is not an int.
        TdxValueError
            An argument is out of range, or start > end.
        MemoryError
            An allocation failed; the store (and `nbytes`) is exactly as before.

        Notes
        -----
        Mirrors steps 3 and 5 of ``kvm_vm_set_mem_attributes()`` in ``virt/kvm/kvm_main.c``
        (6.18): reserve first (a failure changes nothing), then store. A set that follows a
        successful :meth:`reserve` covering it cannot fail. Writer: the caller holds slots_lock.
        SPEC §3.4, tdx-facts §7.5.
        """
        cdef uint64_t s, e, v
        cdef int rc
        if not _fast_u64(start, MAX_GFN + 1, &s):
            s = _gfn_arg("start", start, True)
        if not _fast_u64(end, MAX_GFN + 1, &e):
            e = _gfn_arg("end", end, True)
        if not _fast_u64(attrs, <uint64_t>1 << 60, &v):
            v = _u64_arg("attrs", attrs)
        if s >= e:
            _check_order(s, e)
            return
        if self._mutation == MUT_SET_RANGE_SKIP_LAST:
            e -= 1
            if s == e:
                return
        if self._xa and e - s > XA_NOGIL_GFNS:
            with nogil:
                rc = self._set_range_locked(s, e, v)
        else:
            rc = self._set_range_locked(s, e, v)
        if rc < 0:
            _raise_nomem("set_range", self._fail_bytes, self.backend)

    def reserve(self, start, end):
        """Allocate everything a following set over any part of ``[start, end)`` could need.

        Parameters
        ----------
        start, end : int
            Half-open gfn range, 0 <= start <= end <= MAX_GFN.

        Raises
        ------
        TdxTypeError, TdxValueError
            As for :meth:`set_range`.
        MemoryError
            An allocation failed; nothing changed (`nbytes` included).

        Notes
        -----
        Mirrors ``xa_reserve()`` as used by ``kvm_vm_set_mem_attributes()`` (6.18, tdx-facts §7.5
        step 3). After it succeeds, the next :meth:`set_range` inside ``[start, end)``, with any
        value, cannot fail. For "xarray" the reserved nodes stay allocated until a store of 0
        over them or :meth:`clear` (as reserved slots do upstream). Writer.
        """
        cdef uint64_t s = _gfn_arg("start", start, True)
        cdef uint64_t e = _gfn_arg("end", end, True)
        cdef int rc
        if s >= e:
            _check_order(s, e)
            return
        if self._xa and e - s > XA_NOGIL_GFNS:
            with nogil:
                rc = self._reserve_locked(s, e)
        else:
            rc = self._reserve_locked(s, e)
        if rc < 0:
            _raise_nomem("reserve", self._fail_bytes, self.backend)

    def has_range(self, start, end, mask, attrs):
        """Return whether every gfn in ``[start, end)`` has ``(attr & mask) == attrs``.

        Parameters
        ----------
        start, end : int
            Half-open gfn range, 0 <= start <= end <= MAX_GFN.
        mask, attrs : int
            u64 words.

        Returns
        -------
        bool
            False at once when ``attrs & ~mask``; True for an empty range.

        Raises
        ------
        TdxTypeError, TdxValueError
            As for :meth:`set_range` (checked in argument order, then start <= end).

        Notes
        -----
        Mirrors ``kvm_range_has_memory_attributes()`` in ``virt/kvm/kvm_main.c`` (6.18,
        tdx-facts §7.4), which KVM calls with `mask` restricted to the supported attributes.
        Upstream's ``attrs == 0`` fast path ("no entry in the range") agrees with this
        definition whenever stored words only use bits of `mask`, which KVM's validation
        guarantees; with other bits stored this method follows the per-gfn definition. Reader.
        """
        cdef uint64_t s, e, m, a
        cdef rs_sink k
        cdef bint r
        if not _fast_u64(start, MAX_GFN + 1, &s):
            s = _gfn_arg("start", start, True)
        if not _fast_u64(end, MAX_GFN + 1, &e):
            e = _gfn_arg("end", end, True)
        m = _u64_arg("mask", mask)
        a = _u64_arg("attrs", attrs)
        _check_order(s, e)
        if a & ~m:
            return False
        if s == e:
            return True
        if e - s == 1:
            return (self._get(s) & m) == a
        if not self._xa:
            return self._rs_has_range(s, e, m, a)
        memset(&k, 0, sizeof(rs_sink))
        k.check = True
        k.mask = m
        k.attrs = a
        k.next = s
        k.zero_ok = a == 0 or self._mutation == MUT_HAS_RANGE_IGNORE_GAPS
        if self._root != NULL:
            if e - s > XA_NOGIL_GFNS:
                with nogil:
                    self._xa_walk(self._root, 0, s, e, &k)
            else:
                self._xa_walk(self._root, 0, s, e, &k)
        if k.failed:
            return False
        return k.next >= e or k.zero_ok

    def runs_array(self):
        """Return the maximal non-zero runs as an ``(n, 3)`` uint64 array of (start, end, attrs).

        Returns
        -------
        numpy.ndarray
            A new array, ascending by start; adjacent rows never have equal attrs and touch.

        Notes
        -----
        Identical for both backends and the twin given the same contents. Reader. SPEC §3.4.
        """
        cdef rs_sink k
        cdef size_t n
        memset(&k, 0, sizeof(rs_sink))
        with nogil:
            self._feed(&k)
        n = k.count
        out = np.empty((n, 3), dtype=np.uint64)
        cdef uint64_t[:, ::1] view = out
        if n:
            memset(&k, 0, sizeof(rs_sink))
            k.out = &view[0, 0]
            with nogil:
                self._feed(&k)
        return out

    def runs(self):
        """Iterate the maximal runs of non-zero attributes as ``(start, end, attrs)`` tuples.

        Returns
        -------
        Iterator[tuple[int, int, int]]
            Ascending, coalesced; a snapshot taken at the call.

        Notes
        -----
        Reader. SPEC §3.4.
        """
        return map(tuple, self.runs_array().tolist())

    def state_hash(self):
        """Return a stable 64-bit hash of the logical contents.

        Returns
        -------
        int
            ``blake2b(digest_size=8)`` over the runs of :meth:`runs_array`, each serialized as
            three little-endian u64 (start, end, attrs), read as a little-endian integer. The
            empty store hashes the empty string. Backend-independent; the twin computes it the
            same way from its own data.
        """
        data = self.runs_array().astype("<u8", copy=False).tobytes()
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    def clear(self):
        """Erase everything and free all memory (``nbytes`` drops to 0). Writer."""
        self._rs_free_all()
        if self._root != NULL:
            self._xa_free_subtree(self._root)
            self._root = NULL


cdef cnp.ndarray _gfn_array(object gfns):
    """Validate a 1-D integer array-like of gfns; return it as contiguous uint64."""
    return check_u64_array("gfns", gfns, MAX_GFN)


cdef void _raise_nomem(str op, size_t nbytes, str backend) except *:
    msg = (f"AttributeStore.{op}: could not allocate {nbytes} bytes ({backend} backend); "
           "nothing was changed")
    raise MemoryError(msg)


def _testing_fail_alloc(AttributeStore store, n):
    """Make the n-th allocation attempt from now fail (n >= 1); n = 0 disarms the hook.

    Sets ``store._mem.fail_at``. The hook stays armed until it fires or is disarmed.
    """
    cdef uint64_t k = _check_int("n", n, 0, 1 << 32)
    if k == 0:
        tdx_atomic_store_relaxed(&store._mem.fail_at, 0)
    else:
        tdx_atomic_store_relaxed(&store._mem.fail_at,
                                 tdx_atomic_load_relaxed(&store._mem.nr_attempts) + k)


def _testing_mutate(AttributeStore store, name):
    """Switch on one deliberate bug (for the differential machine's mutation test).

    Names: ``"set_range_skip_last"`` (set_range leaves its last gfn unchanged: the seed's
    off-by-one), ``"has_range_ignore_gaps"`` (absent gfns match any attrs), ``None`` (off).
    """
    if name is None:
        store._mutation = MUT_NONE
        return
    if name not in _MUTATIONS:
        msg = f"name={name!r} is not one of {sorted(_MUTATIONS)}"
        raise TdxValueError(msg, name="name", value=name)
    store._mutation = _MUTATIONS[name]


def _testing_nr_items(AttributeStore store):
    """(items, containers, pooled bitmaps) of the "ranges" backend, or xarray node count."""
    cdef size_t i, nc = 0
    if store._xa:
        return int(store._mem.nbytes // XA_NODE_BYTES)
    for i in range(store._nr_items):
        if store._items[i].bm != NULL:
            nc += 1
    return (store._nr_items, nc, store._nr_pool)
