"""PAMT: the module's per-4K-frame metadata (page type, owner TDR, BEPOCH, entry lock).

The core behind ``tdx.Pamt`` (SPEC §3.4). Storage is chunked (4096 frames per chunk), chunks are
allocated lazily on first write and an absent chunk reads as all-``PT_NDA``, so a 64 GiB host
(2^24 frames) costs one pointer per chunk until frames are used. Statuses are the module's
(tdx-facts §2.3, §5.9); Python misuse raises ``TdxTypeError``/``TdxValueError``.

Twin: ``tdxcore/reference/pamt.py``.
"""

import hashlib

import numpy as np

cimport numpy as cnp
from libc.stdint cimport uint8_t, uint64_t

from tdxcore._alloc cimport tdx_alloc, tdx_free
from tdxcore._atomic cimport (
    tdx_atomic_cas_acq_rel, tdx_atomic_cas_ptr, tdx_atomic_fetch_add_relaxed,
    tdx_atomic_fetch_sub_relaxed, tdx_atomic_load_ptr, tdx_atomic_load_relaxed,
    tdx_atomic_store_relaxed,
)
from tdxcore._busylock cimport (
    busylock_try_excl, busylock_try_shared, busylock_unlock_excl, busylock_unlock_shared,
)
from tdxcore._defs cimport (
    BUSYLOCK_EXCL_BIT, BUSYLOCK_SHARED_MASK, OPERAND_ID_RCX, PAMT_NO_OWNER, PT_NDA, PT_RSVD,
    PT_TDR, TDX_OPERAND_BUSY, TDX_PAGE_METADATA_INCORRECT, TDX_SUCCESS,
    TDX_TD_ASSOCIATED_PAGES_EXIST, U64_MAX,
)

from tdxcore.constants import PageType
from tdxcore.errors import TdxTypeError, TdxValueError, check_int, check_u64_array

cnp.import_array()

__all__ = ["Pamt", "is_tlb_tracked"]

_U64_LIMIT = 1 << 64
#: Largest accepted nr_frames: the chunk directory is eager (one pointer per 4096 frames), so
#: 2^32 frames (16 TiB of host memory) cost an 8 MiB directory.
_MAX_NR_FRAMES = 1 << 32
_PAGE_TYPES = frozenset(int(t) for t in PageType)


def is_tlb_tracked(bepoch, td_epoch, refcount_prev):
    """Return whether a page blocked at ``bepoch`` is TLB-tracked.

    Parameters
    ----------
    bepoch, td_epoch, refcount_prev : int
        The page's BEPOCH, the TD's current epoch and REFCOUNT of the previous epoch's parity.

    Returns
    -------
    bool
        ``bepoch + 1 < td_epoch`` or (``bepoch + 1 == td_epoch`` and ``refcount_prev == 0``).

    Raises
    ------
    TdxTypeError, TdxValueError
        An argument is not an int in ``[0, 2**64)``.

    Notes
    -----
    The module's TLB-tracking predicate (TDX module 1.5 ``is_tlb_tracked``); tdx-facts §3.4,
    SPEC §4.5.
    """
    cdef uint64_t b = check_int("bepoch", bepoch, 0, _U64_LIMIT)
    cdef uint64_t e = check_int("td_epoch", td_epoch, 0, _U64_LIMIT)
    cdef uint64_t r = check_int("refcount_prev", refcount_prev, 0, _U64_LIMIT)
    return bool(pamt_is_tlb_tracked(b, e, r))


cdef class Pamt:
    """Per-4K-frame PAMT entries of a host with ``nr_frames`` frames.

    Parameters
    ----------
    nr_frames : int
        Number of host 4K frames, in ``[1, 2**32]``.

    Notes
    -----
    Models the module's PAMT 4K level (tdx-facts §5.9): page type, 40-bit owner (the TDR page
    number), BEPOCH and the entry's shared/exclusive lock, plus TDR.CHLDCNT for ``PT_TDR`` frames
    (kept beside the TDR's own entry). The canonical serialization hashed by :meth:`state_hash`
    is ``<Q nr_frames`` followed, for every frame in ascending pfn whose type is not ``PT_NDA`` or
    whose BEPOCH is not 0, by ``<QQQQQ pfn, type, owner(pfn), bepoch(pfn), child_count(pfn)``
    (blake2b, 8-byte digest, read little-endian). Lock words are transient and not hashed.
    """

    def __cinit__(self, nr_frames):
        self._chunks = NULL
        self._nr_chunks = 0
        self._mem.nbytes = 0
        self._mem.nr_allocs = 0
        self._mem.fail_at = 0
        self._mem.nr_attempts = 0
        cdef int k
        for k in range(PAMT_NR_TYPES):
            self._nr_by_type[k] = 0
        cdef uint64_t n = check_int("nr_frames", nr_frames, 1, _MAX_NR_FRAMES + 1)
        self.nr_frames = n
        cdef uint64_t nc = (n + PAMT_CHUNK_FRAMES - 1) >> PAMT_CHUNK_SHIFT
        self._chunks = <pamt_chunk**>tdx_alloc(&self._mem, nc, sizeof(pamt_chunk*), True)
        if self._chunks == NULL:
            raise MemoryError(f"Pamt: cannot allocate {nc * sizeof(pamt_chunk*)} bytes")
        self._nr_chunks = nc

    def __init__(self, nr_frames):
        """Validated and built in ``__cinit__``; here for the signature."""

    def __dealloc__(self):
        cdef uint64_t k
        if self._chunks != NULL:
            for k in range(self._nr_chunks):
                if self._chunks[k] != NULL:
                    tdx_free(&self._mem, self._chunks[k], sizeof(pamt_chunk))
            tdx_free(&self._mem, self._chunks, self._nr_chunks * sizeof(pamt_chunk*))
            self._chunks = NULL

    def __reduce__(self):
        raise TypeError("Pamt holds C buffers and cannot be pickled")

    # ---------------------------------------------------------------- cdef contract (see .pxd)

    cdef pamt_chunk* _chunk(self, uint64_t pfn) noexcept nogil:
        return <pamt_chunk*>tdx_atomic_load_ptr(<void**>&self._chunks[pfn >> PAMT_CHUNK_SHIFT])

    cdef pamt_chunk* _chunk_create(self, uint64_t pfn) noexcept nogil:
        cdef void** slot = <void**>&self._chunks[pfn >> PAMT_CHUNK_SHIFT]
        cdef void* cur = tdx_atomic_load_ptr(slot)
        if cur != NULL:
            return <pamt_chunk*>cur
        cdef pamt_chunk* c = <pamt_chunk*>tdx_alloc(&self._mem, 1, sizeof(pamt_chunk), True)
        if c == NULL:
            return NULL
        cdef uint64_t k
        for k in range(PAMT_CHUNK_FRAMES):
            c.owner[k] = PAMT_NO_OWNER
        cur = NULL
        if tdx_atomic_cas_ptr(slot, &cur, c):
            return c
        # Another thread published this chunk first: use theirs.
        tdx_free(&self._mem, c, sizeof(pamt_chunk))
        return <pamt_chunk*>cur

    cdef uint64_t page_type_c(self, uint64_t pfn) noexcept nogil:
        cdef pamt_chunk* c = self._chunk(pfn)
        if c == NULL:
            return PT_NDA
        return tdx_atomic_load_relaxed(&c.type[pfn & PAMT_CHUNK_MASK])

    cdef uint64_t owner_c(self, uint64_t pfn) noexcept nogil:
        cdef pamt_chunk* c = self._chunk(pfn)
        if c == NULL:
            return PAMT_NO_OWNER
        cdef uint64_t t = tdx_atomic_load_relaxed(&c.type[pfn & PAMT_CHUNK_MASK])
        if t == PT_NDA or t == PT_RSVD or t == PT_TDR:
            return PAMT_NO_OWNER
        return c.owner[pfn & PAMT_CHUNK_MASK]

    cdef uint64_t bepoch_c(self, uint64_t pfn) noexcept nogil:
        cdef pamt_chunk* c = self._chunk(pfn)
        if c == NULL:
            return 0
        return tdx_atomic_load_relaxed(&c.bepoch[pfn & PAMT_CHUNK_MASK])

    cdef uint64_t set_bepoch_c(self, uint64_t pfn, uint64_t epoch) noexcept nogil:
        cdef pamt_chunk* c = self._chunk(pfn)
        if c == NULL:
            if epoch == 0:
                return TDX_SUCCESS      # an absent chunk already reads 0
            c = self._chunk_create(pfn)
            if c == NULL:
                return U64_MAX
        tdx_atomic_store_relaxed(&c.bepoch[pfn & PAMT_CHUNK_MASK], epoch)
        return TDX_SUCCESS

    cdef uint64_t child_count_c(self, uint64_t pfn) noexcept nogil:
        cdef pamt_chunk* c = self._chunk(pfn)
        if c == NULL:
            return 0
        cdef uint64_t i = pfn & PAMT_CHUNK_MASK
        if tdx_atomic_load_relaxed(&c.type[i]) != PT_TDR:
            return 0
        return tdx_atomic_load_relaxed(&c.chldcnt[i])

    cdef uint64_t assign_c(self, uint64_t pfn, uint64_t page_type, uint64_t owner,
                           uint64_t operand) noexcept nogil:
        cdef pamt_chunk* oc = NULL
        if page_type != PT_TDR:
            # Memory safety even if the Python-level owner check was bypassed.
            if owner >= self.nr_frames or self.page_type_c(owner) != PT_TDR:
                return TDX_PAGE_METADATA_INCORRECT | operand
            oc = self._chunk(owner)
        cdef pamt_chunk* c = self._chunk_create(pfn)
        if c == NULL:
            return U64_MAX
        cdef uint64_t i = pfn & PAMT_CHUNK_MASK
        cdef uint64_t expected = PT_NDA
        # The CAS is the "page must be PT_NDA" check: two assigners cannot both win.
        if not tdx_atomic_cas_acq_rel(&c.type[i], &expected, page_type):
            return TDX_PAGE_METADATA_INCORRECT | operand
        c.owner[i] = PAMT_NO_OWNER if page_type == PT_TDR else owner
        tdx_atomic_store_relaxed(&c.bepoch[i], 0)
        tdx_atomic_store_relaxed(&c.chldcnt[i], 0)
        if oc != NULL:
            tdx_atomic_fetch_add_relaxed(&oc.chldcnt[owner & PAMT_CHUNK_MASK], 1)
        tdx_atomic_fetch_add_relaxed(&self._nr_by_type[page_type], 1)
        return TDX_SUCCESS

    cdef uint64_t release_c(self, uint64_t pfn, uint64_t operand) noexcept nogil:
        cdef pamt_chunk* c = self._chunk(pfn)
        if c == NULL:
            return TDX_PAGE_METADATA_INCORRECT | operand
        cdef uint64_t i = pfn & PAMT_CHUNK_MASK
        cdef uint64_t t = tdx_atomic_load_relaxed(&c.type[i])
        if t == PT_NDA or t == PT_RSVD:
            return TDX_PAGE_METADATA_INCORRECT | operand
        if t == PT_TDR and tdx_atomic_load_relaxed(&c.chldcnt[i]) != 0:
            return TDX_TD_ASSOCIATED_PAGES_EXIST
        cdef uint64_t owner = c.owner[i]
        if not tdx_atomic_cas_acq_rel(&c.type[i], &t, PT_NDA):
            return TDX_PAGE_METADATA_INCORRECT | operand
        c.owner[i] = PAMT_NO_OWNER
        tdx_atomic_store_relaxed(&c.bepoch[i], 0)
        cdef pamt_chunk* oc
        if t != PT_TDR and owner < self.nr_frames:
            oc = self._chunk(owner)
            if oc != NULL:
                tdx_atomic_fetch_sub_relaxed(&oc.chldcnt[owner & PAMT_CHUNK_MASK], 1)
        tdx_atomic_fetch_sub_relaxed(&self._nr_by_type[t], 1)
        return TDX_SUCCESS

    cdef uint64_t* lock_word_c(self, uint64_t pfn) noexcept nogil:
        cdef pamt_chunk* c = self._chunk_create(pfn)
        if c == NULL:
            return NULL
        return &c.lock[pfn & PAMT_CHUNK_MASK]

    # ---------------------------------------------------------------- Python API

    @property
    def nbytes(self):
        """Bytes allocated through the allocation helper (directory plus live chunks)."""
        return tdx_atomic_load_relaxed(&self._mem.nbytes)

    def page_type(self, pfn):
        """Return the ``PageType`` value of frame ``pfn`` (``PT_NDA`` when never written)."""
        cdef uint64_t p = _pfn_arg(self, pfn, "pfn")
        return self.page_type_c(p)

    def owner(self, pfn):
        """Return the owner TDR pfn of ``pfn`` (``PAMT_NO_OWNER`` for NDA, RSVD and TDR frames)."""
        cdef uint64_t p = _pfn_arg(self, pfn, "pfn")
        return self.owner_c(p)

    def bepoch(self, pfn):
        """Return the BEPOCH recorded for ``pfn`` (set by TDH.MEM.RANGE.BLOCK)."""
        cdef uint64_t p = _pfn_arg(self, pfn, "pfn")
        return self.bepoch_c(p)

    def set_bepoch(self, pfn, epoch):
        """Record ``epoch`` as the BEPOCH of ``pfn`` (what RANGE.BLOCK does after blocking).

        Raises
        ------
        TdxTypeError, TdxValueError
            ``pfn`` not in ``[0, nr_frames)`` or ``epoch`` not in ``[0, 2**64)``.
        MemoryError
            The frame's chunk could not be allocated (no change).
        """
        cdef uint64_t p = _pfn_arg(self, pfn, "pfn")
        cdef uint64_t e = check_int("epoch", epoch, 0, _U64_LIMIT)
        if self.set_bepoch_c(p, e) == U64_MAX:
            raise MemoryError(f"Pamt.set_bepoch: cannot allocate {sizeof(pamt_chunk)} bytes")

    def child_count(self, tdr_pfn):
        """Return TDR.CHLDCNT of the PT_TDR frame ``tdr_pfn`` (0 for any other frame)."""
        cdef uint64_t p = _pfn_arg(self, tdr_pfn, "tdr_pfn")
        return self.child_count_c(p)

    def assign(self, pfn, page_type, owner, operand):
        """Assign the free frame ``pfn`` to ``owner`` as ``page_type``.

        Parameters
        ----------
        pfn : int
            The frame, in ``[0, nr_frames)``.
        page_type : int
            A ``PageType`` other than ``PT_NDA``/``PT_RSVD`` (see :meth:`reserve`).
        owner : int
            ``PAMT_NO_OWNER`` for ``PT_TDR``; else the pfn of a ``PT_TDR`` frame.
        operand : int
            Operand id added to a failure status (e.g. ``OPERAND_ID_R8``), in ``[0, 2**32)``.

        Returns
        -------
        int
            ``TDX_SUCCESS`` or ``TDX_PAGE_METADATA_INCORRECT|operand`` (frame not ``PT_NDA``).

        Raises
        ------
        TdxTypeError, TdxValueError
            Bad argument, or ``owner`` is not a ``PT_TDR`` frame (module-layer misuse).
        MemoryError
            The frame's chunk could not be allocated (no change).

        Notes
        -----
        Every assigning leaf (MNG.CREATE, ADDCX, VP.CREATE, SEPT.ADD, PAGE.ADD, PAGE.AUG) requires
        PT_NDA; TDR.CHLDCNT counts the TD's 4K units (tdx-facts §2.3, §5.9; SPEC §3.4).
        """
        cdef uint64_t p = _pfn_arg(self, pfn, "pfn")
        cdef uint64_t t = _page_type_arg(page_type)
        cdef uint64_t o = check_int("owner", owner, 0, _U64_LIMIT)
        cdef uint64_t op = check_int("operand", operand, 0, 1 << 32)
        if t == PT_NDA or t == PT_RSVD:
            msg = f"page_type={t} cannot be assigned (PT_NDA is release(), PT_RSVD is reserve())"
            raise TdxValueError(msg, name="page_type", value=page_type)
        if t == PT_TDR:
            if o != PAMT_NO_OWNER:
                msg = f"owner={o:#x} must be PAMT_NO_OWNER for a PT_TDR frame"
                raise TdxValueError(msg, name="owner", value=owner)
        elif o >= self.nr_frames or self.page_type_c(o) != PT_TDR:
            msg = f"owner={o:#x} is not a PT_TDR frame"
            raise TdxValueError(msg, name="owner", value=owner)
        cdef uint64_t s
        with nogil:
            s = self.assign_c(p, t, o, op)
        if s == U64_MAX:
            raise MemoryError(f"Pamt.assign: cannot allocate {sizeof(pamt_chunk)} bytes")
        return s

    def release(self, pfn, operand):
        """Return frame ``pfn`` to ``PT_NDA``.

        Returns
        -------
        int
            ``TDX_SUCCESS``; ``TDX_PAGE_METADATA_INCORRECT|operand`` for an NDA/RSVD frame;
            ``TDX_TD_ASSOCIATED_PAGES_EXIST`` for a TDR whose CHLDCNT is not 0.

        Notes
        -----
        As TDH.MEM.PAGE.REMOVE / TDH.PHYMEM.PAGE.RECLAIM do to the PAMT (tdx-facts §2.3); the
        owner's CHLDCNT drops by one and BEPOCH is reset to 0.
        """
        cdef uint64_t p = _pfn_arg(self, pfn, "pfn")
        cdef uint64_t op = check_int("operand", operand, 0, 1 << 32)
        cdef uint64_t s
        with nogil:
            s = self.release_c(p, op)
        return s

    def reserve(self, pfn):
        """Mark the free frame ``pfn`` ``PT_RSVD`` (a frame the module keeps for itself).

        Raises
        ------
        TdxValueError
            ``pfn`` is out of range or not ``PT_NDA``.
        """
        cdef uint64_t p = _pfn_arg(self, pfn, "pfn")
        cdef pamt_chunk* c = self._chunk_create(p)
        if c == NULL:
            raise MemoryError(f"Pamt.reserve: cannot allocate {sizeof(pamt_chunk)} bytes")
        cdef uint64_t expected = PT_NDA
        if not tdx_atomic_cas_acq_rel(&c.type[p & PAMT_CHUNK_MASK], &expected, PT_RSVD):
            msg = f"pfn={p:#x} is not PT_NDA (type {expected}); only a free frame can be reserved"
            raise TdxValueError(msg, name="pfn", value=pfn)
        tdx_atomic_fetch_add_relaxed(&self._nr_by_type[PT_RSVD], 1)

    def try_lock(self, pfn, exclusive, operand, host=True):
        """Try to take the PAMT entry lock of ``pfn``; never waits.

        Returns
        -------
        int
            ``TDX_SUCCESS``, ``TDX_OPERAND_BUSY|operand``, or (guest, ``host=False``, while the
            host asked for priority) ``TDX_OPERAND_BUSY_HOST_PRIORITY|operand``.

        Notes
        -----
        The module's PAMT entry try-lock (tdx-facts §2.3 "Locks"; SPEC §4.4).
        """
        cdef uint64_t p = _pfn_arg(self, pfn, "pfn")
        cdef bint ex = _bool_arg("exclusive", exclusive)
        cdef bint h = _bool_arg("host", host)
        cdef uint64_t op = check_int("operand", operand, 0, 1 << 32)
        cdef uint64_t* w = self.lock_word_c(p)
        if w == NULL:
            raise MemoryError(f"Pamt.try_lock: cannot allocate {sizeof(pamt_chunk)} bytes")
        if ex:
            return busylock_try_excl(w, op, h)
        return busylock_try_shared(w, op, h)

    def unlock(self, pfn, exclusive):
        """Release a hold taken by :meth:`try_lock`.

        Raises
        ------
        TdxValueError
            The lock is not held in that mode.
        """
        cdef uint64_t p = _pfn_arg(self, pfn, "pfn")
        cdef bint ex = _bool_arg("exclusive", exclusive)
        cdef pamt_chunk* c = self._chunk(p)
        cdef uint64_t w = 0
        if c != NULL:
            w = tdx_atomic_load_relaxed(&c.lock[p & PAMT_CHUNK_MASK])
        if ex:
            if not (w & BUSYLOCK_EXCL_BIT):
                msg = f"pfn={p:#x}: PAMT entry lock is not held exclusively"
                raise TdxValueError(msg, name="pfn", value=pfn)
            busylock_unlock_excl(&c.lock[p & PAMT_CHUNK_MASK])
        else:
            if (w & BUSYLOCK_SHARED_MASK) == 0:
                msg = f"pfn={p:#x}: PAMT entry lock is not held shared"
                raise TdxValueError(msg, name="pfn", value=pfn)
            busylock_unlock_shared(&c.lock[p & PAMT_CHUNK_MASK])

    def nr_assigned(self, page_type):
        """Return how many frames have ``page_type`` (O(1); ``PT_NDA`` counts the free frames)."""
        cdef uint64_t t = _page_type_arg(page_type)
        cdef uint64_t total = 0
        cdef int k
        if t != PT_NDA:
            return tdx_atomic_load_relaxed(&self._nr_by_type[t])
        for k in range(PAMT_NR_TYPES):
            total += tdx_atomic_load_relaxed(&self._nr_by_type[k])
        return self.nr_frames - total

    def reclaim_batch(self, pfns, owner):
        """Return each frame of ``pfns`` owned by the TDR ``owner`` to ``PT_NDA``; GIL released.

        The PAMT part of TDH.PHYMEM.PAGE.RECLAIM for the child pages of one TD in TEARDOWN
        (the module layer checks the lifecycle once for the whole batch).

        Parameters
        ----------
        pfns : array_like of int
            Frames, each in ``[0, nr_frames)`` (checked for all before any change).
        owner : int
            A ``PT_TDR`` frame.

        Returns
        -------
        ndarray of uint64
            One status per element, in order: ``TDX_OPERAND_BUSY|RCX`` (the frame's PAMT entry
            lock is held), ``TDX_PAGE_METADATA_INCORRECT|RCX`` (``PT_NDA``/``PT_RSVD``, a
            ``PT_TDR``, or owned by another TDR), else the release's status (``TDX_SUCCESS``).
            A frame repeated in ``pfns`` fails the second time (it is ``PT_NDA`` by then).

        Raises
        ------
        TdxTypeError, TdxValueError
            ``pfns`` is not a 1-D integer array of frames, or ``owner`` is not a ``PT_TDR`` frame.
        """
        p = check_u64_array("pfns", pfns, self.nr_frames)
        cdef uint64_t o = _pfn_arg(self, owner, "owner")
        if self.page_type_c(o) != PT_TDR:
            msg = f"owner={o:#x} is not a PT_TDR frame"
            raise TdxValueError(msg, name="owner", value=owner)
        out = np.empty(p.shape[0], dtype=np.uint64)
        cdef const uint64_t[::1] pv = p
        cdef uint64_t[::1] ov = out
        cdef Py_ssize_t k, n = p.shape[0]
        cdef uint64_t pfn, t, s, expected
        cdef pamt_chunk* c
        cdef uint64_t i
        cdef uint64_t freed[PAMT_NR_TYPES]
        cdef uint64_t nfreed = 0
        cdef int ty
        cdef pamt_chunk* oc = self._chunk(o)
        for ty in range(PAMT_NR_TYPES):
            freed[ty] = 0
        with nogil:
            for k in range(n):
                pfn = pv[k]
                c = self._chunk(pfn)
                s = TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX
                if c != NULL:
                    i = pfn & PAMT_CHUNK_MASK
                    t = tdx_atomic_load_relaxed(&c.type[i])
                    if tdx_atomic_load_relaxed(&c.lock[i]) & (BUSYLOCK_EXCL_BIT | BUSYLOCK_SHARED_MASK):
                        s = TDX_OPERAND_BUSY | OPERAND_ID_RCX
                    elif t != PT_NDA and t != PT_RSVD and t != PT_TDR and c.owner[i] == o:
                        # release_c, with the per-type and CHLDCNT counts applied once at the end:
                        # two threads reclaiming two TDs then share no counter cache line per page
                        expected = t
                        if tdx_atomic_cas_acq_rel(&c.type[i], &expected, PT_NDA):
                            c.owner[i] = PAMT_NO_OWNER
                            tdx_atomic_store_relaxed(&c.bepoch[i], 0)
                            freed[t & (PAMT_NR_TYPES - 1)] += 1
                            nfreed += 1
                            s = TDX_SUCCESS
                ov[k] = s
            for ty in range(PAMT_NR_TYPES):
                if freed[ty]:
                    tdx_atomic_fetch_sub_relaxed(&self._nr_by_type[ty], freed[ty])
            if nfreed and oc != NULL:
                tdx_atomic_fetch_sub_relaxed(&oc.chldcnt[o & PAMT_CHUNK_MASK], nfreed)
        return out

    def types(self, start, end):
        """Return a copy of the page types of frames ``[start, end)`` as ``ndarray[uint8]``."""
        cdef uint64_t s = check_int("start", start, 0, self.nr_frames + 1)
        cdef uint64_t e = check_int("end", end, 0, self.nr_frames + 1)
        if e < s:
            msg = f"end={e:#x} is below start={s:#x}"
            raise TdxValueError(msg, name="end", value=end)
        out = np.zeros(e - s, dtype=np.uint8)
        cdef uint8_t[::1] v = out
        cdef uint64_t p
        cdef pamt_chunk* c
        with nogil:
            p = s
            while p < e:
                c = self._chunk(p)
                if c == NULL:
                    p = ((p >> PAMT_CHUNK_SHIFT) + 1) << PAMT_CHUNK_SHIFT
                    continue
                v[p - s] = <uint8_t>tdx_atomic_load_relaxed(&c.type[p & PAMT_CHUNK_MASK])
                p += 1
        return out

    def state_hash(self):
        """Return a stable 64-bit hash of every frame's metadata (serialization: class docstring)."""
        cdef uint64_t k, i, n = 0, pfn
        cdef pamt_chunk* c
        for k in range(self._nr_chunks):
            c = self._chunk(k << PAMT_CHUNK_SHIFT)
            if c == NULL:
                continue
            for i in range(PAMT_CHUNK_FRAMES):
                if c.type[i] != PT_NDA or c.bepoch[i] != 0:
                    n += 1
        rows = np.zeros((n, 5), dtype="<u8")
        cdef uint64_t[:, ::1] r = rows
        n = 0
        for k in range(self._nr_chunks):
            c = self._chunk(k << PAMT_CHUNK_SHIFT)
            if c == NULL:
                continue
            for i in range(PAMT_CHUNK_FRAMES):
                if c.type[i] != PT_NDA or c.bepoch[i] != 0:
                    pfn = (k << PAMT_CHUNK_SHIFT) | i
                    r[n, 0] = pfn
                    r[n, 1] = c.type[i]
                    r[n, 2] = self.owner_c(pfn)
                    r[n, 3] = c.bepoch[i]
                    r[n, 4] = self.child_count_c(pfn)
                    n += 1
        h = hashlib.blake2b(digest_size=8)
        h.update(int(self.nr_frames).to_bytes(8, "little"))
        h.update(rows.tobytes())
        return int.from_bytes(h.digest(), "little")

    def __repr__(self):
        return f"Pamt(nr_frames={self.nr_frames:#x}, nbytes={self.nbytes})"


cdef uint64_t _pfn_arg(Pamt pamt, object pfn, str name) except? 0xFFFFFFFFFFFFFFFF:
    if type(pfn) is int and 0 <= pfn < pamt.nr_frames:
        return pfn
    return check_int(name, pfn, 0, pamt.nr_frames)


cdef uint64_t _page_type_arg(object page_type) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t t = check_int("page_type", page_type, 0, PAMT_NR_TYPES)
    if t not in _PAGE_TYPES:
        msg = f"page_type={t} is not a PageType value"
        raise TdxValueError(msg, name="page_type", value=page_type)
    return t


cdef bint _bool_arg(str name, object v) except -1:
    if isinstance(v, (bool, int)) and not isinstance(v, float):
        return bool(v)
    msg = f"{name}={v!r} must be a bool (type={type(v).__name__})"
    raise TdxTypeError(msg, name=name, value=v)


def _testing_fail_alloc(Pamt pamt, n):
    """Make the ``n``-th allocation attempt from now fail (0 disarms)."""
    pamt._mem.fail_at = 0 if n == 0 else pamt._mem.nr_attempts + n
