"""The secure-EPT radix tree: the module's S-EPT leaves on a 4- or 5-level table of 512 entries.

The core behind ``tdx.SeptTree`` (SPEC §3.4, §4.2). Every operation is GPA-based, returns the
module's ``(status, entry, level_state)`` as plain ints (callers wrap with ``TdxStatus``), and
does its work in one ``nogil`` section; batch variants loop over numpy gfn arrays with the GIL
released. Entry states, flags and per-leaf legality come from the module's tables through
``_defs.pxd``; the handler rules on top are exactly SPEC §4.2's.

Twin: ``tdxcore/reference/sept.py``.
"""

import hashlib

import numpy as np

cimport numpy as cnp
from libc.stdint cimport uint8_t, uint64_t

from tdxcore._alloc cimport tdx_alloc, tdx_free
from tdxcore._atomic cimport (
    tdx_atomic_fetch_add_relaxed, tdx_atomic_fetch_sub_relaxed, tdx_atomic_load_relaxed,
)
from tdxcore._busylock cimport busylock_try_excl, busylock_unlock_excl
from tdxcore._defs cimport (
    ACCEPT_EPT_VIOLATION, BUSYLOCK_EXCL_BIT, LEVEL_STATE_STATE_SHIFT, OPERAND_ID_R8,
    OPERAND_ID_RCX, OPERAND_ID_SEPT_TREE, PAMT_NO_OWNER, PT_EPT, PT_NDA, PT_REG, PT_TDR,
    SEPT_BIT_SVE, SEPT_BIT_TDB, SEPT_BIT_TDBW, SEPT_BIT_TDP, SEPT_BLOCKED, SEPT_FLAG_ANY_BLOCKED,
    SEPT_FLAG_GUEST_ACCESSIBLE_LEAF, SEPT_FLAG_TLB_TRACKING_REQUIRED, SEPT_FREE,
    SEPT_KIND_BY_INDEX, SEPT_LEGAL_TDG_MEM_PAGE_ACCEPT, SEPT_LEGAL_TDH_MEM_PAGE_ADD,
    SEPT_LEGAL_TDH_MEM_PAGE_AUG, SEPT_LEGAL_TDH_MEM_PAGE_REMOVE, SEPT_LEGAL_TDH_MEM_RANGE_BLOCK,
    SEPT_LEGAL_TDH_MEM_RANGE_UNBLOCK, SEPT_LEGAL_TDH_MEM_SEPT_ADD,
    SEPT_LEGAL_TDH_MEM_SEPT_REMOVE, SEPT_MAPPED, SEPT_NL_MAPPED, SEPT_PENDING,
    SEPT_PFN_MASK, SEPT_PUBLIC_STATE_BY_INDEX, SEPT_STATE_ENCODING_BY_INDEX,
    SEPT_STATE_INDEX_BY_ENCODING, TDX_EPT_ENTRY_STATE_INCORRECT, TDX_EPT_PAGE_NOT_FREE,
    TDX_EPT_WALK_FAILED, TDX_GPA_RANGE_ALREADY_BLOCKED, TDX_GPA_RANGE_NOT_BLOCKED,
    TDX_OPERAND_INVALID, TDX_PAGE_ALREADY_ACCEPTED, TDX_PAGE_METADATA_INCORRECT,
    TDX_PAGE_SIZE_MISMATCH, TDX_SUCCESS, TDX_TLB_TRACKING_NOT_DONE, U64_MAX,
)
from tdxcore._pamt cimport Pamt, pamt_is_tlb_tracked

from tdxcore import constants as _constants
from tdxcore._pamt import Pamt as _PamtPy
from tdxcore.errors import TdxTypeError, TdxValueError, check_int, check_u64_array

cnp.import_array()

__all__ = ["SeptTree"]

# -------------------------------------------------------------------------------------------
# Entry encoding tables, filled once at import from constants.SEPT_STATE_BITS (immutable after).
# -------------------------------------------------------------------------------------------
cdef uint64_t _ENC_BIT[7]           # entry bit position of state-encoding bit i
cdef uint64_t _STATE_BITS[16]       # entry bits of the state with dense index i
cdef uint8_t I_FREE, I_NL_MAPPED, I_MAPPED, I_PENDING, I_BLOCKED
cdef uint64_t E_TDB = (<uint64_t>1) << SEPT_BIT_TDB
cdef uint64_t E_TDBW = (<uint64_t>1) << SEPT_BIT_TDBW
cdef uint64_t E_TDP = (<uint64_t>1) << SEPT_BIT_TDP
cdef uint64_t E_SVE = (<uint64_t>1) << SEPT_BIT_SVE
cdef uint64_t E_FREE                # a FREE entry as the module writes it: FREE bits | SVE
cdef uint64_t _SUPPLY_EXHAUSTED = U64_MAX - 1   # internal: sept_add_range ran out of pages
# Fast decode: when every state bit lies in entry bits [0, 10) or [53, 64) (the module layout),
# the 7-bit encoding is _DEC_LO[e & 1023] | _DEC_HI[e >> 53] — two loads instead of seven
# shift-and-mask steps on every entry a walk reads.
cdef uint8_t _DEC_LO[1024]
cdef uint8_t _DEC_HI[2048]
cdef bint _DEC_FAST = False

if len(_constants.SEPT_STATE_BITS) != 7:
    raise ImportError("constants.SEPT_STATE_BITS must list 7 entry bits")


cdef void _init_tables():
    global I_FREE, I_NL_MAPPED, I_MAPPED, I_PENDING, I_BLOCKED, E_FREE
    cdef int b, i
    cdef uint64_t enc, bits
    for b in range(7):
        _ENC_BIT[b] = _constants.SEPT_STATE_BITS[b]
    for i in range(16):
        enc = SEPT_STATE_ENCODING_BY_INDEX[i]
        bits = 0
        for b in range(7):
            if (enc >> b) & 1:
                bits |= (<uint64_t>1) << _ENC_BIT[b]
        _STATE_BITS[i] = bits
    I_FREE = SEPT_STATE_INDEX_BY_ENCODING[SEPT_FREE]
    I_NL_MAPPED = SEPT_STATE_INDEX_BY_ENCODING[SEPT_NL_MAPPED]
    I_MAPPED = SEPT_STATE_INDEX_BY_ENCODING[SEPT_MAPPED]
    I_PENDING = SEPT_STATE_INDEX_BY_ENCODING[SEPT_PENDING]
    I_BLOCKED = SEPT_STATE_INDEX_BY_ENCODING[SEPT_BLOCKED]
    E_FREE = _STATE_BITS[I_FREE] | E_SVE
    _init_decode()


cdef void _init_decode():
    global _DEC_FAST
    cdef int b, v
    cdef uint8_t acc
    for b in range(7):
        if 10 <= _ENC_BIT[b] < 53 or _ENC_BIT[b] >= 64:
            _DEC_FAST = False
            return
    for v in range(1024):
        acc = 0
        for b in range(7):
            if _ENC_BIT[b] < 10 and (v >> _ENC_BIT[b]) & 1:
                acc |= <uint8_t>(1 << b)
        _DEC_LO[v] = acc
    for v in range(2048):
        acc = 0
        for b in range(7):
            if _ENC_BIT[b] >= 53 and (v >> (_ENC_BIT[b] - 53)) & 1:
                acc |= <uint8_t>(1 << b)
        _DEC_HI[v] = acc
    _DEC_FAST = True


_init_tables()


cdef inline uint8_t _sidx(uint64_t e) noexcept nogil:
    """Dense state index of entry e (entries are only ever written with valid encodings)."""
    cdef uint64_t enc
    if _DEC_FAST:
        enc = _DEC_LO[e & 1023] | _DEC_HI[e >> 53]
        return SEPT_STATE_INDEX_BY_ENCODING[enc] & 15
    enc = (((e >> _ENC_BIT[0]) & 1) | (((e >> _ENC_BIT[1]) & 1) << 1)
           | (((e >> _ENC_BIT[2]) & 1) << 2) | (((e >> _ENC_BIT[3]) & 1) << 3)
           | (((e >> _ENC_BIT[4]) & 1) << 4) | (((e >> _ENC_BIT[5]) & 1) << 5)
           | (((e >> _ENC_BIT[6]) & 1) << 6))
    cdef uint8_t i = SEPT_STATE_INDEX_BY_ENCODING[enc]
    return i & 15   # 0xFF cannot occur; the mask keeps every table read in bounds regardless


cdef inline uint64_t _ls(int level, uint8_t si) noexcept nogil:
    return <uint64_t>level | (<uint64_t>SEPT_PUBLIC_STATE_BY_INDEX[si] << LEVEL_STATE_STATE_SHIFT)


cdef inline uint64_t _res(sept_result* r, uint64_t s, uint64_t e, uint64_t ls) noexcept nogil:
    r.status = s
    r.entry = e
    r.level_state = ls
    return s


cdef inline uint64_t _pfn_of(uint64_t e) noexcept nogil:
    return (e & SEPT_PFN_MASK) >> 12


cdef inline uint64_t _index(uint64_t gpa, int level) noexcept nogil:
    return (gpa >> (12 + 9 * level)) & 511


_U64_LIMIT = 1 << 64
_MAX_GFN = _constants.MAX_GFN


cdef inline uint64_t _u64_arg(str name, object v) except? 0xFFFFFFFFFFFFFFFF:
    if type(v) is int and 0 <= v < _U64_LIMIT:
        return v
    return check_int(name, v, 0, _U64_LIMIT)


cdef inline int _level_arg(object v) except -1:
    if type(v) is int and 0 <= v <= 4:
        return v
    return check_int("level", v, 0, _constants.SEPT_MAX_LEVEL + 1)


cdef bint _bool_arg(str name, object v) except -1:
    if isinstance(v, (bool, int)):
        return bool(v)
    msg = f"{name}={v!r} must be a bool (type={type(v).__name__})"
    raise TdxTypeError(msg, name=name, value=v)


cdef struct epoch_args:
    uint64_t td_epoch           # the TD's current epoch (TDCS.TD_EPOCH)
    uint64_t refcount_prev      # REFCOUNT of the previous epoch's parity
    bint tracking_required      # op state requires TLB tracking (RUNNABLE, ...)


cdef int _epoch_arg(object td_epoch, object refcount_prev, object tracking_required,
                    epoch_args* a) except -1:
    """Validate the epoch arguments the S-EPT removal leaves share, in their declared order."""
    a.td_epoch = _u64_arg("td_epoch", td_epoch)
    a.refcount_prev = _u64_arg("refcount_prev", refcount_prev)
    a.tracking_required = _bool_arg("tracking_required", tracking_required)
    return 0


cdef object _ret(sept_result* r, str what):
    if r.status == U64_MAX:
        raise MemoryError(f"SeptTree.{what}: cannot allocate a {sizeof(sept_table)}-byte table")
    return (r.status, r.entry, r.level_state)


def _u64_array(name, x):
    """Return ``x`` as a contiguous 1-D uint64 array (errors.check_u64_array)."""
    return check_u64_array(name, x)


def _gfn_array(name, x):
    """Return ``x`` as a contiguous 1-D uint64 array of gfns below MAX_GFN."""
    return check_u64_array(name, x, _MAX_GFN)


cdef class SeptTree:
    """The secure-EPT tree of one TD.

    Parameters
    ----------
    levels : int
        4 (GPAW 48, shared bit 47) or 5 (GPAW 52, shared bit 51).
    pamt : Pamt or None
        PAMT to assign and release frames in; ``None`` creates a private ``Pamt(1 << 24)``.
    tdr : int
        Owner pfn recorded in the PAMT for frames the tree assigns. If that frame is still
        ``PT_NDA`` the constructor assigns it ``PT_TDR`` (so a standalone tree just works); any
        other non-TDR type raises ``TdxValueError``.

    Notes
    -----
    Mirrors the TDX module's S-EPT handling in TDH.MEM.* and TDG.MEM.PAGE.ACCEPT (module 1.5;
    tdx-facts §2.3, §3; SPEC §3.4, §4.2). The root table stands for a TDCS page and consumes no
    frame. Entries are the module's: ``pfn << 12 | state bits`` (FREE entries also carry SVE,
    bit 63). ``nr_tables`` counts tables including the root. Operand rules: a GPA at or above
    the shared bit, not aligned to the level, or a level the leaf does not allow (or ``>=
    levels``) gives ``TDX_OPERAND_INVALID|RCX``; a page beyond the PAMT gives
    ``TDX_OPERAND_INVALID|R8``.

    :meth:`state_hash` is blake2b (8-byte digest, read little-endian) over ``<QQ levels, tdr``;
    ``<Q n`` then ``<QQQ level, gpa, entry`` for the n non-FREE entries sorted by (level, gpa);
    ``<Q m`` then ``<QQQ level, gpa, pfn`` for the m non-root tables sorted by (level, gpa), where
    level is the level of the table's entries and gpa the first GPA it maps.
    """

    def __cinit__(self, levels=4, pamt=None, tdr=0):
        self._root = NULL
        self._mem.nbytes = 0
        self._mem.nr_allocs = 0
        self._mem.fail_at = 0
        self._mem.nr_attempts = 0
        self._nr_tables = 0
        self._mutation = 0
        cdef int lv = check_int("levels", levels, 4, 6)
        if pamt is None:
            pamt = _PamtPy(1 << 24)
        elif not isinstance(pamt, _PamtPy):
            msg = f"pamt={pamt!r} must be a tdxcore._pamt.Pamt or None"
            raise TdxTypeError(msg, name="pamt", value=pamt)
        cdef Pamt pm = pamt
        cdef uint64_t t = check_int("tdr", tdr, 0, pm.nr_frames)
        cdef uint64_t ty = pm.page_type_c(t)
        if ty == PT_NDA:
            if pm.assign(t, PT_TDR, PAMT_NO_OWNER, 0) != TDX_SUCCESS:
                msg = f"tdr={t:#x} could not be assigned PT_TDR"
                raise TdxValueError(msg, name="tdr", value=tdr)
        elif ty != PT_TDR:
            msg = f"tdr={t:#x} is a frame of page type {ty}, not PT_TDR"
            raise TdxValueError(msg, name="tdr", value=tdr)
        self.pamt = pm
        self.tdr = t
        self.levels = lv
        self.gpaw = _constants.GPAW_BY_LEVELS[lv]
        self.shared_bit = self.gpaw - 1
        self._private_limit = (<uint64_t>1) << self.shared_bit
        self._force_next = pm.nr_frames
        self._root = self._table_new(lv - 1, PAMT_NO_OWNER)
        if self._root == NULL:
            raise MemoryError(f"SeptTree: cannot allocate a {sizeof(sept_table)}-byte table")

    def __init__(self, levels=4, pamt=None, tdr=0):
        """Validated and built in ``__cinit__``; here for the signature."""

    def __dealloc__(self):
        if self._root != NULL:
            self._subtree_free(self._root)
            self._root = NULL

    def __reduce__(self):
        raise TypeError("SeptTree holds C tables and cannot be pickled")

    # ---------------------------------------------------------------- tables

    cdef sept_table* _table_new(self, int level, uint64_t pfn) noexcept nogil:
        cdef sept_table* t = <sept_table*>tdx_alloc(&self._mem, 1, sizeof(sept_table), False)
        if t == NULL:
            return NULL
        t.child = NULL
        if level >= 1:
            t.child = <sept_table**>tdx_alloc(&self._mem, SEPT_NR_ENTRIES, sizeof(sept_table*), True)
            if t.child == NULL:
                tdx_free(&self._mem, t, sizeof(sept_table))
                return NULL
        cdef int i
        for i in range(SEPT_NR_ENTRIES):
            t.entry[i] = E_FREE
            t.lock[i] = 0
        t.pfn = pfn
        t.level = level
        tdx_atomic_fetch_add_relaxed(&self._nr_tables, 1)
        return t

    cdef void _table_free(self, sept_table* t) noexcept nogil:
        if t.child != NULL:
            tdx_free(&self._mem, t.child, SEPT_NR_ENTRIES * sizeof(sept_table*))
        tdx_free(&self._mem, t, sizeof(sept_table))
        tdx_atomic_fetch_sub_relaxed(&self._nr_tables, 1)

    cdef void _subtree_free(self, sept_table* t) noexcept nogil:
        cdef int i
        if t.child != NULL:
            for i in range(SEPT_NR_ENTRIES):
                if t.child[i] != NULL:
                    self._subtree_free(t.child[i])
        self._table_free(t)

    # ---------------------------------------------------------------- shared steps

    cdef uint64_t _check(self, uint64_t gpa, int level, int lo, int hi) noexcept nogil:
        if level < lo or level > hi or level >= self.levels:
            return TDX_OPERAND_INVALID | OPERAND_ID_RCX
        if gpa >= self._private_limit:        # beyond GPAW, or the shared bit set
            return TDX_OPERAND_INVALID | OPERAND_ID_RCX
        if gpa & (((<uint64_t>1) << (12 + 9 * level)) - 1):
            return TDX_OPERAND_INVALID | OPERAND_ID_RCX
        return TDX_SUCCESS

    cdef uint64_t _walk(self, uint64_t gpa, int level, sept_table** tbl, uint64_t* idx,
                        sept_result* r) noexcept nogil:
        cdef sept_table* t = self._root
        cdef int L = self.levels - 1
        cdef uint64_t i, e
        cdef uint8_t si
        while L > level:
            i = _index(gpa, L)
            e = t.entry[i]
            si = _sidx(e)
            if SEPT_KIND_BY_INDEX[si] != 1:
                return _res(r, TDX_EPT_WALK_FAILED | OPERAND_ID_RCX, e, _ls(L, si))
            t = t.child[i]
            L -= 1
        tbl[0] = t
        idx[0] = _index(gpa, level)
        return TDX_SUCCESS

    # ---------------------------------------------------------------- the leaves (cdef)

    cdef uint64_t sept_add_c(self, uint64_t gpa, int level, uint64_t page, bint allow_existing,
                             sept_result* r) noexcept nogil:
        cdef uint64_t s = self._check(gpa, level, 1, self.levels - 1)
        if s != TDX_SUCCESS:
            return _res(r, s, 0, 0)
        if page >= self.pamt.nr_frames:
            return _res(r, TDX_OPERAND_INVALID | OPERAND_ID_R8, 0, 0)
        cdef sept_table* t
        cdef uint64_t i
        if self._walk(gpa, level, &t, &i, r) != TDX_SUCCESS:
            return r.status
        cdef uint64_t e = t.entry[i]
        cdef uint8_t si = _sidx(e)
        if not SEPT_LEGAL_TDH_MEM_SEPT_ADD[si]:
            return _res(r, TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, _ls(level, si))
        if SEPT_KIND_BY_INDEX[si] == 1:
            # Handler rule (SPEC §4.2): an existing table is success only with allow_existing.
            if allow_existing:
                return _res(r, TDX_SUCCESS, e, _ls(level, si))
            return _res(r, TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, _ls(level, si))
        cdef sept_table* child = self._table_new(level - 1, page)
        if child == NULL:
            return _res(r, U64_MAX, e, _ls(level, si))
        s = self.pamt.assign_c(page, PT_EPT, self.tdr, OPERAND_ID_R8)
        if s != TDX_SUCCESS:
            self._table_free(child)
            return _res(r, s, e, _ls(level, si))
        t.child[i] = child
        e = (page << 12) | _STATE_BITS[I_NL_MAPPED]
        t.entry[i] = e
        return _res(r, TDX_SUCCESS, e, _ls(level, I_NL_MAPPED))

    cdef uint64_t page_add_c(self, uint64_t gpa, int level, uint64_t page,
                             sept_result* r) noexcept nogil:
        cdef uint64_t s = self._check(gpa, level, 0, 0)
        if s != TDX_SUCCESS:
            return _res(r, s, 0, 0)
        if page >= self.pamt.nr_frames:
            return _res(r, TDX_OPERAND_INVALID | OPERAND_ID_R8, 0, 0)
        cdef sept_table* t
        cdef uint64_t i
        if self._walk(gpa, level, &t, &i, r) != TDX_SUCCESS:
            return r.status
        cdef uint64_t e = t.entry[i]
        cdef uint8_t si = _sidx(e)
        if not SEPT_LEGAL_TDH_MEM_PAGE_ADD[si]:
            return _res(r, TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, _ls(level, si))
        s = self.pamt.assign_c(page, PT_REG, self.tdr, OPERAND_ID_R8)
        if s != TDX_SUCCESS:
            return _res(r, s, e, _ls(level, si))
        e = (page << 12) | _STATE_BITS[I_MAPPED]
        t.entry[i] = e
        return _res(r, TDX_SUCCESS, e, _ls(level, I_MAPPED))

    cdef uint64_t page_aug_c(self, uint64_t gpa, int level, uint64_t page,
                             sept_result* r) noexcept nogil:
        cdef uint64_t s = self._check(gpa, level, 0, 1)
        if s != TDX_SUCCESS:
            return _res(r, s, 0, 0)
        cdef uint64_t n = (<uint64_t>1) << (9 * level)
        if page >= self.pamt.nr_frames or (page & (n - 1)) or n > self.pamt.nr_frames - page:
            return _res(r, TDX_OPERAND_INVALID | OPERAND_ID_R8, 0, 0)
        cdef sept_table* t
        cdef uint64_t i, k
        if self._walk(gpa, level, &t, &i, r) != TDX_SUCCESS:
            return r.status
        cdef uint64_t e = t.entry[i]
        cdef uint8_t si = _sidx(e)
        if not SEPT_LEGAL_TDH_MEM_PAGE_AUG[si]:
            return _res(r, TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, _ls(level, si))
        # A 2M AUG needs every 4K frame of the range free (the module walks all PAMT levels).
        for k in range(n):
            if self.pamt.page_type_c(page + k) != PT_NDA:
                return _res(r, TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_R8, e, _ls(level, si))
        for k in range(n):
            s = self.pamt.assign_c(page + k, PT_REG, self.tdr, OPERAND_ID_R8)
            if s != TDX_SUCCESS:
                while k > 0:        # lost a race (or OOM): leave no partial assignment
                    k -= 1
                    self.pamt.release_c(page + k, OPERAND_ID_R8)
                return _res(r, s, e, _ls(level, si))
        e = (page << 12) | _STATE_BITS[I_PENDING]
        t.entry[i] = e
        return _res(r, TDX_SUCCESS, e, _ls(level, I_PENDING))

    cdef uint64_t range_block_c(self, uint64_t gpa, int level, uint64_t td_epoch,
                                sept_result* r) noexcept nogil:
        cdef uint64_t s = self._check(gpa, level, 0, self.levels - 1)
        if s != TDX_SUCCESS:
            return _res(r, s, 0, 0)
        cdef sept_table* t
        cdef uint64_t i
        if self._walk(gpa, level, &t, &i, r) != TDX_SUCCESS:
            return r.status
        cdef uint64_t e = t.entry[i]
        cdef uint8_t si = _sidx(e)
        if not SEPT_LEGAL_TDH_MEM_RANGE_BLOCK[si]:
            if SEPT_FLAG_ANY_BLOCKED[si]:
                # Handler rule (SPEC §4.2): already blocked is a warning, not an error.
                return _res(r, TDX_GPA_RANGE_ALREADY_BLOCKED | OPERAND_ID_RCX, e, _ls(level, si))
            return _res(r, TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, _ls(level, si))
        # MAPPED/BLOCKEDW -> BLOCKED, PENDING/PENDING_BLOCKEDW -> PENDING_BLOCKED,
        # NL_MAPPED -> NL_BLOCKED: set TDB, clear TDBW.
        if self._mutation == 1 and si == I_PENDING:
            e = (e & ~(E_TDBW | E_TDP)) | E_TDB        # test-only wrong transition
        else:
            e = (e & ~E_TDBW) | E_TDB
        t.entry[i] = e
        # BEPOCH is sampled after blocking, in the PAMT entry of the mapped page / child table.
        cdef uint64_t pfn = _pfn_of(e)
        if pfn < self.pamt.nr_frames:
            self.pamt.set_bepoch_c(pfn, td_epoch)
        return _res(r, TDX_SUCCESS, e, _ls(level, _sidx(e)))

    cdef uint64_t range_unblock_c(self, uint64_t gpa, int level, uint64_t td_epoch,
                                  uint64_t refcount_prev, bint tracking,
                                  sept_result* r) noexcept nogil:
        cdef uint64_t s = self._check(gpa, level, 0, self.levels - 1)
        if s != TDX_SUCCESS:
            return _res(r, s, 0, 0)
        cdef sept_table* t
        cdef uint64_t i
        if self._walk(gpa, level, &t, &i, r) != TDX_SUCCESS:
            return r.status
        cdef uint64_t e = t.entry[i]
        cdef uint8_t si = _sidx(e)
        if not SEPT_LEGAL_TDH_MEM_RANGE_UNBLOCK[si]:
            return _res(r, TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, _ls(level, si))
        if tracking and SEPT_FLAG_TLB_TRACKING_REQUIRED[si]:
            if not pamt_is_tlb_tracked(self._bepoch_of(e), td_epoch, refcount_prev):
                return _res(r, TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_SEPT_TREE, e,
                            _ls(level, si))
        e = e & ~E_TDB
        t.entry[i] = e
        return _res(r, TDX_SUCCESS, e, _ls(level, _sidx(e)))

    cdef uint64_t _bepoch_of(self, uint64_t e) noexcept nogil:
        cdef uint64_t pfn = _pfn_of(e)
        if pfn >= self.pamt.nr_frames:
            return 0
        return self.pamt.bepoch_c(pfn)

    cdef uint64_t page_remove_c(self, uint64_t gpa, int level, uint64_t td_epoch,
                                uint64_t refcount_prev, bint tracking,
                                sept_result* r) noexcept nogil:
        cdef uint64_t s = self._check(gpa, level, 0, 1)
        if s != TDX_SUCCESS:
            return _res(r, s, 0, 0)
        cdef sept_table* t
        cdef uint64_t i, k
        if self._walk(gpa, level, &t, &i, r) != TDX_SUCCESS:
            return r.status
        cdef uint64_t e = t.entry[i]
        cdef uint8_t si = _sidx(e)
        if not SEPT_LEGAL_TDH_MEM_PAGE_REMOVE[si]:
            return _res(r, TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, _ls(level, si))
        if tracking and SEPT_FLAG_TLB_TRACKING_REQUIRED[si]:
            if not SEPT_FLAG_ANY_BLOCKED[si]:
                return _res(r, TDX_GPA_RANGE_NOT_BLOCKED | OPERAND_ID_RCX, e, _ls(level, si))
            if not pamt_is_tlb_tracked(self._bepoch_of(e), td_epoch, refcount_prev):
                return _res(r, TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_RCX, e, _ls(level, si))
        t.entry[i] = E_FREE
        cdef uint64_t pfn = _pfn_of(e)
        cdef uint64_t n = (<uint64_t>1) << (9 * level)
        for k in range(n):
            if pfn + k < self.pamt.nr_frames:
                self.pamt.release_c(pfn + k, OPERAND_ID_RCX)
        return _res(r, TDX_SUCCESS, e, _ls(level, si))

    cdef uint64_t sept_remove_c(self, uint64_t gpa, int level, uint64_t td_epoch,
                                uint64_t refcount_prev, bint tracking,
                                sept_result* r) noexcept nogil:
        cdef uint64_t s = self._check(gpa, level, 1, self.levels - 1)
        if s != TDX_SUCCESS:
            return _res(r, s, 0, 0)
        cdef sept_table* t
        cdef uint64_t i
        cdef int j
        if self._walk(gpa, level, &t, &i, r) != TDX_SUCCESS:
            return r.status
        cdef uint64_t e = t.entry[i]
        cdef uint8_t si = _sidx(e)
        if not SEPT_LEGAL_TDH_MEM_SEPT_REMOVE[si]:
            return _res(r, TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, e, _ls(level, si))
        if tracking and SEPT_FLAG_TLB_TRACKING_REQUIRED[si]:
            if not SEPT_FLAG_ANY_BLOCKED[si]:
                return _res(r, TDX_GPA_RANGE_NOT_BLOCKED | OPERAND_ID_RCX, e, _ls(level, si))
            if not pamt_is_tlb_tracked(self._bepoch_of(e), td_epoch, refcount_prev):
                return _res(r, TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_RCX, e, _ls(level, si))
        cdef sept_table* child = t.child[i]
        for j in range(SEPT_NR_ENTRIES):
            if _sidx(child.entry[j]) != I_FREE:       # strictly FREE: REMOVED does not count
                return _res(r, TDX_EPT_PAGE_NOT_FREE | OPERAND_ID_RCX, e, _ls(level, si))
        t.entry[i] = E_FREE
        t.child[i] = NULL
        self.pamt.release_c(child.pfn, OPERAND_ID_RCX)
        self._table_free(child)
        return _res(r, TDX_SUCCESS, e, _ls(level, si))

    cdef uint64_t page_accept_c(self, uint64_t gpa, int level, sept_result* r) noexcept nogil:
        cdef uint64_t s = self._check(gpa, level, 0, 2)
        if s != TDX_SUCCESS:
            return _res(r, s, 0, 0)
        cdef sept_table* t = self._root
        cdef int L = self.levels - 1
        cdef uint64_t i, e
        cdef uint8_t si
        while L > level:
            i = _index(gpa, L)
            e = t.entry[i]
            si = _sidx(e)
            if si == I_NL_MAPPED:
                t = t.child[i]
                L -= 1
                continue
            if SEPT_KIND_BY_INDEX[si] == 2:
                return _res(r, TDX_PAGE_SIZE_MISMATCH | <uint64_t>level, e, _ls(L, si))
            # Missing, free or blocked table above the accept level: the access faults (an
            # EPT-violation TD exit carrying the accept level).
            return _res(r, TDX_SUCCESS | ACCEPT_EPT_VIOLATION, e, _ls(level, si))
        i = _index(gpa, level)
        e = t.entry[i]
        si = _sidx(e)
        if SEPT_LEGAL_TDG_MEM_PAGE_ACCEPT[si]:
            # PENDING -> MAPPED and PENDING_EXPORTED_DIRTY -> EXPORTED_DIRTY: clear TDP.
            e = e & ~E_TDP
            t.entry[i] = e
            return _res(r, TDX_SUCCESS, e, _ls(level, _sidx(e)))
        if SEPT_FLAG_GUEST_ACCESSIBLE_LEAF[si]:
            return _res(r, TDX_PAGE_ALREADY_ACCEPTED | <uint64_t>level, e, _ls(level, si))
        if SEPT_KIND_BY_INDEX[si] == 1:
            return _res(r, TDX_PAGE_SIZE_MISMATCH | <uint64_t>level, e, _ls(level, si))
        return _res(r, TDX_SUCCESS | ACCEPT_EPT_VIOLATION, e, _ls(level, si))

    # ---------------------------------------------------------------- properties

    @property
    def nr_tables(self):
        """Number of tables, including the root."""
        return tdx_atomic_load_relaxed(&self._nr_tables)

    @property
    def nbytes(self):
        """Bytes the tree's tables use (counted by the allocation helper)."""
        return tdx_atomic_load_relaxed(&self._mem.nbytes)

    # ---------------------------------------------------------------- Python API

    def walk(self, gpa, level=0):
        """Walk to the entry of ``gpa`` at ``level``.

        Returns
        -------
        tuple of int
            ``(TDX_SUCCESS, entry, level_state)``, or ``TDX_EPT_WALK_FAILED|RCX`` with the entry
            (and its level_state) that is not a non-leaf above ``level``; operand errors as the
            class docstring says.

        Notes
        -----
        The module's private-GPA walk used by every TDH.MEM leaf (SPEC §3.4).
        """
        cdef uint64_t g = _u64_arg("gpa", gpa)
        cdef int lv = _level_arg(level)
        cdef sept_result r
        cdef sept_table* t
        cdef uint64_t i
        with nogil:
            if self._check(g, lv, 0, self.levels - 1) != TDX_SUCCESS:
                _res(&r, TDX_OPERAND_INVALID | OPERAND_ID_RCX, 0, 0)
            elif self._walk(g, lv, &t, &i, &r) == TDX_SUCCESS:
                _res(&r, TDX_SUCCESS, t.entry[i], _ls(lv, _sidx(t.entry[i])))
        return _ret(&r, "walk")

    def sept_add(self, gpa, level, page, allow_existing=False):
        """TDH.MEM.SEPT.ADD: make the FREE entry at ``(gpa, level)`` point to a new table.

        Parameters
        ----------
        gpa : int
            Private GPA aligned to ``level``.
        level : int
            1..levels-1 (the level of the entry; the new table holds level-1 entries).
        page : int
            Host frame the new table stands for; must be ``PT_NDA``.
        allow_existing : bool
            RDX bit: an existing NL_MAPPED entry is success without consuming ``page``.

        Returns
        -------
        tuple of int
            ``(status, entry, level_state)``: ``EPT_WALK_FAILED|RCX``,
            ``EPT_ENTRY_STATE_INCORRECT|RCX``, ``PAGE_METADATA_INCORRECT|R8`` or success.

        Notes
        -----
        tdx-facts §2.3 (SEPT.ADD), SPEC §4.2 handler rule; PAMT: PT_EPT, owner ``tdr``.
        """
        cdef uint64_t g = _u64_arg("gpa", gpa)
        cdef int lv = _level_arg(level)
        cdef uint64_t p = _u64_arg("page", page)
        cdef bint ae = _bool_arg("allow_existing", allow_existing)
        cdef sept_result r
        with nogil:
            self.sept_add_c(g, lv, p, ae, &r)
        return _ret(&r, "sept_add")

    def page_add(self, gpa, level, page):
        """TDH.MEM.PAGE.ADD: map ``page`` at the FREE 4K entry of ``gpa`` as MAPPED (PT_REG).

        Notes
        -----
        Level 0 only (else ``OPERAND_INVALID|RCX``); tdx-facts §2.3, §3.5.
        """
        cdef uint64_t g = _u64_arg("gpa", gpa)
        cdef int lv = _level_arg(level)
        cdef uint64_t p = _u64_arg("page", page)
        cdef sept_result r
        with nogil:
            self.page_add_c(g, lv, p, &r)
        return _ret(&r, "page_add")

    def page_aug(self, gpa, level, page):
        """TDH.MEM.PAGE.AUG: map ``page`` (4K, or 512 frames from a 512-aligned ``page`` at
        level 1) at a FREE/REMOVED entry as PENDING.

        Notes
        -----
        tdx-facts §2.3 (PAGE.AUG): PAMT PT_REG owner ``tdr``, TDR.CHLDCNT += 512^level.
        """
        cdef uint64_t g = _u64_arg("gpa", gpa)
        cdef int lv = _level_arg(level)
        cdef uint64_t p = _u64_arg("page", page)
        cdef sept_result r
        with nogil:
            self.page_aug_c(g, lv, p, &r)
        return _ret(&r, "page_aug")

    def range_block(self, gpa, level, td_epoch, refcount_prev=0, tracking_required=True):
        """TDH.MEM.RANGE.BLOCK: block the entry and record BEPOCH := ``td_epoch``.

        Notes
        -----
        An already blocked entry gives ``TDX_GPA_RANGE_ALREADY_BLOCKED|RCX`` (SPEC §4.2);
        ``refcount_prev`` and ``tracking_required`` are accepted for a uniform signature.
        """
        cdef uint64_t g = _u64_arg("gpa", gpa)
        cdef int lv = _level_arg(level)
        cdef epoch_args a
        _epoch_arg(td_epoch, refcount_prev, tracking_required, &a)
        cdef sept_result r
        with nogil:
            self.range_block_c(g, lv, a.td_epoch, &r)
        return _ret(&r, "range_block")

    def range_unblock(self, gpa, level, td_epoch, refcount_prev=0, tracking_required=True):
        """TDH.MEM.RANGE.UNBLOCK: reverse a block once BEPOCH is tracked.

        Notes
        -----
        A missed tracking check is ``TDX_TLB_TRACKING_NOT_DONE|SEPT_TREE`` (reference README).
        """
        cdef uint64_t g = _u64_arg("gpa", gpa)
        cdef int lv = _level_arg(level)
        cdef epoch_args a
        _epoch_arg(td_epoch, refcount_prev, tracking_required, &a)
        cdef sept_result r
        with nogil:
            self.range_unblock_c(g, lv, a.td_epoch, a.refcount_prev, a.tracking_required, &r)
        return _ret(&r, "range_unblock")

    def page_remove(self, gpa, level, td_epoch, refcount_prev=0, tracking_required=True):
        """TDH.MEM.PAGE.REMOVE: free a leaf and return its frames to PT_NDA.

        Returns
        -------
        tuple of int
            On success the ``entry`` is the OLD entry (it holds the removed frame).

        Notes
        -----
        With tracking required (RUNNABLE TD, state flag set) the entry must be *BLOCKED
        (``GPA_RANGE_NOT_BLOCKED|RCX``) and BEPOCH tracked (``TLB_TRACKING_NOT_DONE|RCX``).
        """
        cdef uint64_t g = _u64_arg("gpa", gpa)
        cdef int lv = _level_arg(level)
        cdef epoch_args a
        _epoch_arg(td_epoch, refcount_prev, tracking_required, &a)
        cdef sept_result r
        with nogil:
            self.page_remove_c(g, lv, a.td_epoch, a.refcount_prev, a.tracking_required, &r)
        return _ret(&r, "page_remove")

    def sept_remove(self, gpa, level, td_epoch, refcount_prev=0, tracking_required=True):
        """TDH.MEM.SEPT.REMOVE: free an all-FREE child table and return its frame.

        Returns
        -------
        tuple of int
            On success the ``entry`` is the OLD entry (it holds the table's frame).
        """
        cdef uint64_t g = _u64_arg("gpa", gpa)
        cdef int lv = _level_arg(level)
        cdef epoch_args a
        _epoch_arg(td_epoch, refcount_prev, tracking_required, &a)
        cdef sept_result r
        with nogil:
            self.sept_remove_c(g, lv, a.td_epoch, a.refcount_prev, a.tracking_required, &r)
        return _ret(&r, "sept_remove")

    def page_accept(self, gpa, level=0):
        """TDG.MEM.PAGE.ACCEPT (guest): PENDING -> MAPPED.

        Returns
        -------
        tuple of int
            ``TDX_SUCCESS``; ``TDX_PAGE_ALREADY_ACCEPTED|level`` (guest-accessible leaf);
            ``TDX_PAGE_SIZE_MISMATCH|level`` (a leaf above ``level``, or a non-free non-leaf at
            it); else ``ACCEPT_EPT_VIOLATION`` (``TDX_SUCCESS | 48``, the EPT-violation TD exit)
            with ``level_state = level | public_state << 8``. Never EPT_ENTRY_STATE_INCORRECT.

        Notes
        -----
        SPEC §4.2. PENDING_EXPORTED_DIRTY (also acceptable per the module's table) becomes
        EXPORTED_DIRTY. Levels 0..2 (4K, 2M, 1G).
        """
        cdef uint64_t g = _u64_arg("gpa", gpa)
        cdef int lv = _level_arg(level)
        cdef sept_result r
        with nogil:
            self.page_accept_c(g, lv, &r)
        return _ret(&r, "page_accept")

    def entry_try_lock(self, gpa, level, host=True):
        """Try to take the host lock of the entry at ``(gpa, level)``; never waits.

        Returns
        -------
        int
            ``TDX_SUCCESS``, ``TDX_OPERAND_BUSY|RCX``, ``TDX_OPERAND_BUSY_HOST_PRIORITY|RCX``
            (guest while the host asked for priority), or the walk/operand failure status.
        """
        cdef uint64_t g = _u64_arg("gpa", gpa)
        cdef int lv = _level_arg(level)
        cdef bint h = _bool_arg("host", host)
        cdef sept_result r
        cdef sept_table* t
        cdef uint64_t i, s
        with nogil:
            s = self._check(g, lv, 0, self.levels - 1)
            if s == TDX_SUCCESS:
                s = self._walk(g, lv, &t, &i, &r)
                if s == TDX_SUCCESS:
                    s = busylock_try_excl(&t.lock[i], OPERAND_ID_RCX, h)
        return s

    def entry_unlock(self, gpa, level):
        """Release the entry lock taken by :meth:`entry_try_lock`.

        Raises
        ------
        TdxValueError
            The entry cannot be reached or its lock is not held.
        """
        cdef uint64_t g = _u64_arg("gpa", gpa)
        cdef int lv = _level_arg(level)
        cdef sept_result r
        cdef sept_table* t
        cdef uint64_t i
        if (self._check(g, lv, 0, self.levels - 1) != TDX_SUCCESS
                or self._walk(g, lv, &t, &i, &r) != TDX_SUCCESS):
            msg = f"gpa={g:#x} level={lv}: no such S-EPT entry to unlock"
            raise TdxValueError(msg, name="gpa", value=gpa)
        if not (tdx_atomic_load_relaxed(&t.lock[i]) & BUSYLOCK_EXCL_BIT):
            msg = f"gpa={g:#x} level={lv}: the entry lock is not held"
            raise TdxValueError(msg, name="gpa", value=gpa)
        busylock_unlock_excl(&t.lock[i])

    # ---------------------------------------------------------------- batch API

    def page_aug_batch(self, gfns, pages):
        """Run :meth:`page_aug` at level 0 for each ``(gfns[k], pages[k])``; GIL released.

        Returns
        -------
        ndarray of uint64
            One status per element.
        """
        g = _gfn_array("gfns", gfns)
        p = _u64_array("pages", pages)
        if p.shape[0] != g.shape[0]:
            msg = f"pages has {p.shape[0]} elements, gfns has {g.shape[0]}"
            raise TdxValueError(msg, name="pages", value=pages)
        out = np.empty(g.shape[0], dtype=np.uint64)
        cdef const uint64_t[::1] gv = g
        cdef const uint64_t[::1] pv = p
        cdef uint64_t[::1] ov = out
        cdef Py_ssize_t k, n = g.shape[0]
        cdef sept_result r
        cdef bint oom = False
        with nogil:
            for k in range(n):
                ov[k] = self.page_aug_c(gv[k] << 12, 0, pv[k], &r)
                if ov[k] == U64_MAX:
                    oom = True
                    break
        if oom:
            raise MemoryError("SeptTree.page_aug_batch: allocation failed")
        return out

    def page_accept_batch(self, gfns):
        """Run :meth:`page_accept` at level 0 for each gfn; GIL released; statuses."""
        g = _gfn_array("gfns", gfns)
        out = np.empty(g.shape[0], dtype=np.uint64)
        cdef const uint64_t[::1] gv = g
        cdef uint64_t[::1] ov = out
        cdef Py_ssize_t k, n = g.shape[0]
        cdef sept_result r
        with nogil:
            for k in range(n):
                ov[k] = self.page_accept_c(gv[k] << 12, 0, &r)
        return out

    def range_block_batch(self, gfns, td_epoch):
        """Run :meth:`range_block` at level 0 for each gfn; GIL released; statuses."""
        g = _gfn_array("gfns", gfns)
        cdef uint64_t ep = _u64_arg("td_epoch", td_epoch)
        out = np.empty(g.shape[0], dtype=np.uint64)
        cdef const uint64_t[::1] gv = g
        cdef uint64_t[::1] ov = out
        cdef Py_ssize_t k, n = g.shape[0]
        cdef sept_result r
        with nogil:
            for k in range(n):
                ov[k] = self.range_block_c(gv[k] << 12, 0, ep, &r)
        return out

    def page_remove_batch(self, gfns, td_epoch, refcount_prev=0, tracking_required=True):
        """Run :meth:`page_remove` at level 0 for each gfn; GIL released; statuses."""
        g = _gfn_array("gfns", gfns)
        cdef epoch_args a
        _epoch_arg(td_epoch, refcount_prev, tracking_required, &a)
        cdef uint64_t ep = a.td_epoch, rc = a.refcount_prev
        cdef bint tr = a.tracking_required
        out = np.empty(g.shape[0], dtype=np.uint64)
        cdef const uint64_t[::1] gv = g
        cdef uint64_t[::1] ov = out
        cdef Py_ssize_t k, n = g.shape[0]
        cdef sept_result r
        with nogil:
            for k in range(n):
                ov[k] = self.page_remove_c(gv[k] << 12, 0, ep, rc, tr, &r)
        return out

    cdef uint64_t _add_range(self, sept_table* t, int L, uint64_t base, uint64_t lo,
                             uint64_t hi, const uint64_t* pages, uint64_t npages,
                             uint64_t* used, bint dry, sept_result* r) noexcept nogil:
        """Ensure non-leaf entries at levels L..1 over [lo, hi); t NULL = absent (dry only)."""
        cdef int sh = 12 + 9 * L
        cdef uint64_t i = (lo - base) >> sh
        cdef uint64_t i1 = (hi - 1 - base) >> sh
        cdef uint64_t gpa, e, page, s, sub_lo, sub_hi
        cdef uint8_t si
        cdef sept_table* child
        while i <= i1:
            gpa = base + (i << sh)
            sub_lo = lo if lo > gpa else gpa
            sub_hi = hi if hi < gpa + ((<uint64_t>1) << sh) else gpa + ((<uint64_t>1) << sh)
            child = NULL
            if t != NULL:
                e = t.entry[i]
                si = _sidx(e)
                if SEPT_KIND_BY_INDEX[si] == 1:
                    child = t.child[i]
                elif si != I_FREE:
                    return _res(r, TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, gpa,
                                _ls(L, si))
            if child == NULL:
                if used[0] >= npages:
                    return _res(r, _SUPPLY_EXHAUSTED, gpa, 0)
                page = pages[used[0]]
                if dry:
                    if page >= self.pamt.nr_frames or self.pamt.page_type_c(page) != PT_NDA:
                        return _res(r, TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_R8, gpa, used[0])
                else:
                    s = self.sept_add_c(gpa, L, page, False, r)
                    if s != TDX_SUCCESS:
                        return s
                    child = t.child[i]
                used[0] += 1
            if L - 1 >= 1:
                s = self._add_range(child, L - 1, gpa, sub_lo, sub_hi, pages, npages, used,
                                    dry, r)
                if s != TDX_SUCCESS:
                    return s
            i += 1
        return TDX_SUCCESS

    def sept_add_range(self, start_gfn, end_gfn, pages):
        """Add every missing table covering gfns ``[start_gfn, end_gfn)``, using ``pages`` in order.

        Returns
        -------
        int
            How many frames of ``pages`` were consumed.

        Raises
        ------
        TdxValueError
            Bad range, too few pages, a page that is not a distinct free frame, or a leaf in the
            way. A dry run checks all of this first, so nothing changes on error.
        """
        cdef uint64_t s0 = _u64_arg("start_gfn", start_gfn)
        cdef uint64_t e0 = _u64_arg("end_gfn", end_gfn)
        cdef uint64_t lim = self._private_limit >> 12
        if e0 > lim:
            msg = f"end_gfn={e0:#x} is beyond the private GPA space (gfn < {lim:#x})"
            raise TdxValueError(msg, name="end_gfn", value=end_gfn)
        if s0 >= e0:
            msg = f"start_gfn={s0:#x} must be below end_gfn={e0:#x}"
            raise TdxValueError(msg, name="start_gfn", value=start_gfn)
        p = _u64_array("pages", pages)
        cdef const uint64_t[::1] pv = p
        cdef uint64_t npages = p.shape[0]
        cdef const uint64_t* pp = &pv[0] if npages else NULL
        cdef uint64_t used = 0, s
        cdef sept_result r
        with nogil:
            s = self._add_range(self._root, self.levels - 1, 0, s0 << 12, e0 << 12, pp, npages,
                                &used, True, &r)
        if s == _SUPPLY_EXHAUSTED:
            msg = f"pages has {npages} frames; the range needs more"
            raise TdxValueError(msg, name="pages", value=pages)
        if s != TDX_SUCCESS and (s >> 32) == (TDX_PAGE_METADATA_INCORRECT >> 32):
            k = r.level_state
            msg = f"pages[{k}]={int(p[k]):#x} is not a free (PT_NDA) frame of the PAMT"
            raise TdxValueError(msg, name="pages", value=pages)
        if s != TDX_SUCCESS:
            msg = f"gpa={r.entry:#x} holds a leaf; no table can be added there"
            raise TdxValueError(msg, name="start_gfn", value=start_gfn)
        if used and np.unique(p[:used]).shape[0] != used:
            msg = "pages has a duplicate frame"
            raise TdxValueError(msg, name="pages", value=pages)
        need = used
        used = 0
        with nogil:
            s = self._add_range(self._root, self.levels - 1, 0, s0 << 12, e0 << 12, pp, npages,
                                &used, False, &r)
        if s == U64_MAX:
            raise MemoryError("SeptTree.sept_add_range: allocation failed")
        if s != TDX_SUCCESS or used != need:
            msg = f"sept_add_range stopped with status {s:#x} after {used} frames"
            raise TdxValueError(msg, name="pages", value=pages)
        return used

    # ---------------------------------------------------------------- inspection

    cdef uint64_t _collect(self, sept_table* t, uint64_t base, int target, uint64_t* buf,
                           uint64_t n) noexcept nogil:
        """Append (gpa, entry) of non-FREE entries at `target` under t, ascending gpa."""
        cdef int L = t.level
        cdef int i
        cdef uint64_t e, gpa
        cdef uint8_t si
        for i in range(SEPT_NR_ENTRIES):
            e = t.entry[i]
            si = _sidx(e)
            gpa = base + ((<uint64_t>i) << (12 + 9 * L))
            if L == target:
                if si != I_FREE:
                    if buf != NULL:
                        buf[2 * n] = gpa
                        buf[2 * n + 1] = e
                    n += 1
            elif t.child != NULL and t.child[i] != NULL:
                n = self._collect(t.child[i], gpa, target, buf, n)
        return n

    cdef uint64_t _collect_tables(self, sept_table* t, uint64_t base, uint64_t* buf,
                                  uint64_t n) noexcept nogil:
        """Append (level, gpa, pfn) of every table below t (DFS order)."""
        cdef int i
        cdef uint64_t gpa
        if t.child == NULL:
            return n
        for i in range(SEPT_NR_ENTRIES):
            if t.child[i] != NULL:
                gpa = base + ((<uint64_t>i) << (12 + 9 * t.level))
                if buf != NULL:
                    buf[3 * n] = t.child[i].level
                    buf[3 * n + 1] = gpa
                    buf[3 * n + 2] = t.child[i].pfn
                n += 1
                n = self._collect_tables(t.child[i], gpa, buf, n)
        return n

    def _entries_array(self, int level):
        cdef uint64_t n = self._collect(self._root, 0, level, NULL, 0)
        a = np.zeros((n, 2), dtype="<u8")
        cdef uint64_t[:, ::1] v = a
        if n:
            self._collect(self._root, 0, level, &v[0, 0], 0)
        return a

    def entries(self, level=0):
        """Return ``[(gpa, entry), ...]`` of the non-FREE entries at ``level``, ascending gpa."""
        cdef int lv = _level_arg(level)
        if lv >= self.levels:
            return []
        return [(int(g), int(e)) for g, e in self._entries_array(lv)]

    def state_hash(self):
        """Return a stable 64-bit hash of the tree (serialization: class docstring)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(int(self.levels).to_bytes(8, "little") + int(self.tdr).to_bytes(8, "little"))
        parts = []
        for lv in range(self.levels):
            a = self._entries_array(lv)
            rows = np.empty((a.shape[0], 3), dtype="<u8")
            rows[:, 0] = lv
            rows[:, 1:] = a
            parts.append(rows)
        allrows = np.concatenate(parts)
        h.update(int(allrows.shape[0]).to_bytes(8, "little"))
        h.update(allrows.tobytes())
        cdef uint64_t m = self._collect_tables(self._root, 0, NULL, 0)
        tb = np.zeros((m, 3), dtype="<u8")
        cdef uint64_t[:, ::1] tv = tb
        if m:
            self._collect_tables(self._root, 0, &tv[0, 0], 0)
            tb = tb[np.lexsort((tb[:, 1], tb[:, 0]))]
        h.update(int(m).to_bytes(8, "little"))
        h.update(np.ascontiguousarray(tb).tobytes())
        return int.from_bytes(h.digest(), "little")

    def __repr__(self):
        return (f"SeptTree(levels={self.levels}, tdr={self.tdr:#x}, nr_tables={self.nr_tables}, "
                f"nbytes={self.nbytes})")


# -------------------------------------------------------------------------------------------
# Test-only hooks (aggregated by tdxcore/_testing.py); never part of the .pyi.
# -------------------------------------------------------------------------------------------

_MUTATIONS = {"none": 0, "block_pending_to_blocked": 1}


def _testing_mutate(SeptTree tree, name):
    """Flip one transition on this tree only, for the mutation test.

    ``"block_pending_to_blocked"``: RANGE.BLOCK maps PENDING to BLOCKED (instead of
    PENDING_BLOCKED). ``"none"`` restores the real rules.
    """
    if name not in _MUTATIONS:
        msg = f"name={name!r} is not one of {sorted(_MUTATIONS)}"
        raise TdxValueError(msg, name="name", value=name)
    tree._mutation = _MUTATIONS[name]


cdef uint64_t _supply(SeptTree tree, uint64_t n) except? 0xFFFFFFFFFFFFFFFF:
    """Take the highest n-aligned block of n free frames below the supply cursor.

    When the cursor reaches the bottom it wraps to the top once (frames freed since are reused);
    a whole pass with no free block means the supply is exhausted. The twin uses the same rule.
    """
    cdef uint64_t nxt = tree._force_next, cand, k
    cdef bint ok, wrapped = False
    while True:
        if nxt < n:
            if wrapped:
                raise TdxValueError("the test frame supply is exhausted", name="pfn", value=0)
            wrapped = True
            nxt = tree.pamt.nr_frames
            continue
        cand = (nxt - n) & ~(n - 1)
        ok = True
        for k in range(n):
            if tree.pamt.page_type_c(cand + k) != PT_NDA:
                ok = False
                break
        nxt = cand
        if ok:
            tree._force_next = cand
            return cand


cdef void _release_leaf(SeptTree tree, uint64_t e, int level) noexcept:
    cdef uint64_t pfn = _pfn_of(e), k
    for k in range((<uint64_t>1) << (9 * level)):
        if pfn + k < tree.pamt.nr_frames:
            tree.pamt.release_c(pfn + k, 0)


cdef void _destroy(SeptTree tree, sept_table* t) noexcept:
    """Free a subtree, returning every frame in it (tables and leaves) to PT_NDA."""
    cdef int i
    cdef uint8_t si
    for i in range(SEPT_NR_ENTRIES):
        si = _sidx(t.entry[i])
        if SEPT_KIND_BY_INDEX[si] == 1:
            if t.child != NULL and t.child[i] != NULL:
                _destroy(tree, t.child[i])
            elif _pfn_of(t.entry[i]) < tree.pamt.nr_frames:
                tree.pamt.release_c(_pfn_of(t.entry[i]), 0)
        elif SEPT_KIND_BY_INDEX[si] == 2:
            _release_leaf(tree, t.entry[i], t.level)
    tree.pamt.release_c(t.pfn, 0)
    tree._table_free(t)


cdef void _clear_slot(SeptTree tree, sept_table* t, uint64_t i) noexcept:
    cdef uint64_t e = t.entry[i]
    cdef uint8_t si = _sidx(e)
    if SEPT_KIND_BY_INDEX[si] == 1:
        if t.child != NULL and t.child[i] != NULL:
            _destroy(tree, t.child[i])
            t.child[i] = NULL
        elif _pfn_of(e) < tree.pamt.nr_frames:
            tree.pamt.release_c(_pfn_of(e), 0)
    elif SEPT_KIND_BY_INDEX[si] == 2:
        _release_leaf(tree, e, t.level)
    t.entry[i] = E_FREE


cdef int _make_nl(SeptTree tree, sept_table* t, uint64_t i, uint64_t frame, uint8_t si) except -1:
    if tree.pamt.assign_c(frame, PT_EPT, tree.tdr, 0) != TDX_SUCCESS:
        msg = f"pfn={frame:#x} is not a free frame"
        raise TdxValueError(msg, name="pfn", value=frame)
    cdef sept_table* child
    if t.level >= 1:
        child = tree._table_new(t.level - 1, frame)
        if child == NULL:
            tree.pamt.release_c(frame, 0)
            raise MemoryError("cannot allocate a table")
        t.child[i] = child
    t.entry[i] = (frame << 12) | _STATE_BITS[si]
    return 0


def _testing_force_state(SeptTree tree, gpa, level, state_encoding, pfn=0):
    """Force the entry at ``(gpa, level)`` into any L1 state, keeping PAMT consistent.

    Missing tables on the way are created (frames from the supply below); whatever the slot held
    is removed first (its frames released, a subtree freed). A non-leaf state gets a FREE-filled
    child table (level >= 1; at level 0 only the frame), assigned PT_EPT; a leaf state at level
    0/1 gets 1/512 frames assigned PT_REG with BEPOCH 0; a free state gets no frame (FREE also
    carries SVE). ``pfn=0`` takes frames from the supply: starting at ``pamt.nr_frames`` and
    moving down, the highest n-aligned block of n PT_NDA frames below the cursor (the twin uses
    the same rule, so both pick the same frames).
    """
    cdef uint64_t g = _u64_arg("gpa", gpa)
    cdef int lv = _level_arg(level)
    cdef uint64_t enc = check_int("state_encoding", state_encoding, 0, 128)
    cdef uint8_t si = SEPT_STATE_INDEX_BY_ENCODING[enc]
    if si == 0xFF:
        msg = f"state_encoding={enc:#x} is not an L1 S-EPT state"
        raise TdxValueError(msg, name="state_encoding", value=state_encoding)
    cdef uint64_t p = check_int("pfn", pfn, 0, tree.pamt.nr_frames)
    if tree._check(g, lv, 0, tree.levels - 1) != TDX_SUCCESS:
        msg = f"gpa={g:#x} level={lv} is not a valid private GPA|level for this tree"
        raise TdxValueError(msg, name="gpa", value=gpa)
    cdef uint8_t kind = SEPT_KIND_BY_INDEX[si]
    if kind == 2 and lv > 1:
        msg = f"level={lv}: leaf states are supported at levels 0 and 1 only"
        raise TdxValueError(msg, name="level", value=level)
    cdef uint64_t n = (<uint64_t>1) << (9 * lv), k
    if p != 0 and kind != 0:
        for k in range(n if kind == 2 else 1):
            if p + k >= tree.pamt.nr_frames or tree.pamt.page_type_c(p + k) != PT_NDA:
                msg = f"pfn={p + k:#x} is not a free frame"
                raise TdxValueError(msg, name="pfn", value=pfn)
        if kind == 2 and (p & (n - 1)):
            msg = f"pfn={p:#x} is not aligned to {n} frames"
            raise TdxValueError(msg, name="pfn", value=pfn)
    cdef sept_table* t = tree._root
    cdef int L = tree.levels - 1
    cdef uint64_t i
    while L > lv:
        i = _index(g, L)
        if SEPT_KIND_BY_INDEX[_sidx(t.entry[i])] != 1:
            _clear_slot(tree, t, i)
            _make_nl(tree, t, i, _supply(tree, 1), I_NL_MAPPED)
        t = t.child[i]
        L -= 1
    i = _index(g, lv)
    _clear_slot(tree, t, i)
    if kind == 0:
        t.entry[i] = _STATE_BITS[si] | (E_SVE if si == I_FREE else 0)
    elif kind == 1:
        _make_nl(tree, t, i, p if p else _supply(tree, 1), si)
    else:
        if not p:
            p = _supply(tree, n)
        for k in range(n):
            tree.pamt.assign_c(p + k, PT_REG, tree.tdr, 0)
        t.entry[i] = (p << 12) | _STATE_BITS[si]
    return t.entry[i]


def _testing_fail_alloc(SeptTree tree, n):
    """Make the ``n``-th table allocation attempt from now fail (0 disarms)."""
    tree._mem.fail_at = 0 if n == 0 else tree._mem.nr_attempts + n
