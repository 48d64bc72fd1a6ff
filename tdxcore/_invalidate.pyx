"""KVM's mmu_invalidate sequence and range tracking, bit for bit (SPEC §4.7, tdx-facts §8).

A page fault snapshots :attr:`InvalidateTracker.seq` before it resolves a pfn and, under
``mmu_lock``, asks :meth:`InvalidateTracker.retry_gfn` whether an invalidation began or ran since;
every invalidation source (HVA notifier, guest_memfd punch-hole, memory-attribute change) brackets
its zap with :meth:`begin` / :meth:`range_add` / :meth:`end`.

Lock contract (the caller's, as upstream): ``begin``, ``range_add`` and ``end`` run with
``mmu_lock`` held for write, so writers never race each other; ``retry`` and ``retry_gfn`` run with
``mmu_lock`` held (read is enough); ``retry_gfn_unsafe`` holds nothing. Every field is accessed
through ``_atomic.h`` anyway, so the readers may run without the GIL on any thread.

The scalar methods call the ``cdef`` operations with the GIL held: each is a handful of atomic
loads and stores, cheaper than releasing and re-taking the GIL (that doubled the per-call cost in
``benchmarks/bench_invalidate.py``), and nothing in them relies on the GIL. The batch
``retry_gfn_many`` does release it for its loop.
"""

cimport cython
from libc.stdint cimport uint8_t, uint64_t

from tdxcore._atomic cimport (
    tdx_atomic_fetch_add_relaxed, tdx_atomic_fetch_sub_release, tdx_atomic_load_acquire,
    tdx_atomic_load_relaxed, tdx_atomic_store_relaxed,
)
from tdxcore._defs cimport MAX_GFN, U64_MAX

import hashlib
import struct

import numpy as np

from tdxcore.errors import InvariantViolation, TdxTypeError, TdxValueError, check_int, check_u64_array

# Upstream's INVALID_GPA sentinel is all ones; the range fields hold gfns, so the sentinel is the
# one value no gfn (< MAX_GFN) can take.
cdef uint64_t INVALID_GFN = U64_MAX

# Test-only mutations (_testing_mutate): each flips exactly one rule of §8.
cdef enum:
    MUT_NONE = 0
    MUT_NO_RESET_ON_FIRST_BEGIN = 1   # begin never resets the range on 0 -> 1
    MUT_RANGE_ADD_REPLACES = 2        # range_add replaces the range instead of widening to the hull
    MUT_END_NO_SEQ_BUMP = 3           # end decrements without bumping seq
    MUT_RETRY_GFN_IGNORES_RANGE = 4   # retry_gfn only looks at seq

_MUTATIONS = {
    "no_reset_on_first_begin": MUT_NO_RESET_ON_FIRST_BEGIN,
    "range_add_replaces": MUT_RANGE_ADD_REPLACES,
    "end_no_seq_bump": MUT_END_NO_SEQ_BUMP,
    "retry_gfn_ignores_range": MUT_RETRY_GFN_IGNORES_RANGE,
}


cdef inline uint64_t _u64_arg(str name, object v, uint64_t lo, uint64_t hi) except? 0xFFFFFFFFFFFFFFFF:
    """Return ``v`` as a C integer in ``[lo, hi)`` (``hi == 0``: no upper bound below 2**64).

    Fast path for an exact ``int`` in range (the fault path's case); everything else goes to
    ``check_int``, which raises the named TdxTypeError/TdxValueError.
    """
    cdef uint64_t x
    if type(v) is int:
        try:
            x = v
        except OverflowError:
            pass
        else:
            if x >= lo and (hi == 0 or x < hi):
                return x
    return check_int(name, v, lo, hi if hi != 0 else _SEQ_LIMIT)


cdef inline int _check_range(object start, object end, uint64_t* s, uint64_t* e) except -1:
    """Validate a half-open gfn range argument pair (GIL held, before any state change)."""
    s[0] = _u64_arg("start", start, 0, MAX_GFN)
    e[0] = _u64_arg("end", end, 0, MAX_GFN + 1)
    if s[0] >= e[0]:
        msg = f"end={e[0]:#x} must be greater than start={s[0]:#x} (half-open gfn range [start, end))"
        raise TdxValueError(msg, name="end", value=e[0])
    return 0


# seq is an unsigned long: any u64 (a Python int, so the bound does not wrap in C).
_SEQ_LIMIT = 1 << 64


cdef inline uint64_t _check_seq(object seq) except? 0xFFFFFFFFFFFFFFFF:
    return _u64_arg("seq", seq, 0, 0)


@cython.auto_pickle(False)
cdef class InvalidateTracker:
    """The ``mmu_invalidate_*`` fields of one VM and the operations on them.

    Fields: ``seq`` (u64, wraps like ``unsigned long``), ``in_progress`` (the signed count; the
    model refuses to take it below zero, so it is never negative), and the gfn range
    ``[start, end)`` or INVALID.

    Notes
    -----
    Mirrors ``kvm_mmu_invalidate_begin/range_add/end()`` in ``virt/kvm/kvm_main.c`` and
    ``mmu_invalidate_retry*()`` in ``include/linux/kvm_host.h`` (6.18); SPEC §4.7, tdx-facts §8.
    Canonical serialization for :meth:`state_hash` (shared with the twin): five little-endian u64
    ``seq, in_progress, range_start, range_end, nr_warnings``, INVALID written as ``2**64 - 1``;
    the hash is ``int.from_bytes(blake2b(that, digest_size=8).digest(), "little")``.
    Pickling is refused: a tracker belongs to one VM.
    """

    def __cinit__(self):
        self._seq = 0
        self._in_progress = 0
        self._range_start = INVALID_GFN
        self._range_end = INVALID_GFN
        self._nr_warnings = 0
        self._mutation = MUT_NONE

    def __reduce__(self):
        msg = "InvalidateTracker cannot be pickled: it is one VM's live mmu_invalidate state"
        raise TypeError(msg)

    def __repr__(self):
        r = self.range
        rs = "INVALID" if r is None else f"[{r[0]:#x}, {r[1]:#x})"
        return f"InvalidateTracker(seq={self.seq}, in_progress={self.in_progress}, range={rs})"

    # ------------------------------------------------------------------ cdef API (nogil)

    cdef void begin_c(self) noexcept nogil:
        """Count one more invalidation; reset the range on the 0 -> 1 transition. mmu_lock(write)."""
        cdef uint64_t old = tdx_atomic_fetch_add_relaxed(&self._in_progress, 1)
        # Only the first of nested invalidations resets the range: the others' ranges persist
        # until all of them end (upstream keeps no per-invalidation ranges).
        if old == 0 and self._mutation != MUT_NO_RESET_ON_FIRST_BEGIN:
            tdx_atomic_store_relaxed(&self._range_start, INVALID_GFN)
            tdx_atomic_store_relaxed(&self._range_end, INVALID_GFN)

    cdef int range_add_c(self, uint64_t start, uint64_t end) noexcept nogil:
        """Set (first add) or widen to the hull; -1 with no change outside an invalidation."""
        if tdx_atomic_load_relaxed(&self._in_progress) == 0:
            return -1
        cdef uint64_t s = tdx_atomic_load_relaxed(&self._range_start)
        cdef uint64_t e = tdx_atomic_load_relaxed(&self._range_end)
        # 6.18 tests the sentinel, not in_progress == 1 (older trees): a range added after a
        # nested begin but before any add still replaces the INVALID range.
        if s == INVALID_GFN or self._mutation == MUT_RANGE_ADD_REPLACES:
            s, e = start, end
        else:
            s = start if start < s else s
            e = end if end > e else e
        tdx_atomic_store_relaxed(&self._range_start, s)
        tdx_atomic_store_relaxed(&self._range_end, e)
        return 0

    cdef int end_c(self) noexcept nogil:
        """Bump seq, then decrement; -1 with no change if that would go negative; 1 if it warned."""
        if tdx_atomic_load_relaxed(&self._in_progress) == 0:
            return -1
        if self._mutation != MUT_END_NO_SEQ_BUMP:
            tdx_atomic_store_relaxed(&self._seq, tdx_atomic_load_relaxed(&self._seq) + 1)
        # Release: a reader that sees the decrement (acquire) also sees the new seq (smp_wmb).
        tdx_atomic_fetch_sub_release(&self._in_progress, 1)
        if tdx_atomic_load_relaxed(&self._range_start) == INVALID_GFN:
            tdx_atomic_fetch_add_relaxed(&self._nr_warnings, 1)
            return 1
        return 0

    cdef bint retry_c(self, uint64_t seq) noexcept nogil:
        """mmu_invalidate_retry(): in progress, or seq moved. Caller holds mmu_lock."""
        if tdx_atomic_load_acquire(&self._in_progress) != 0:
            return True
        return tdx_atomic_load_acquire(&self._seq) != seq

    cdef bint retry_gfn_c(self, uint64_t seq, uint64_t gfn) noexcept nogil:
        """mmu_invalidate_retry_gfn(): gfn inside an active range, or seq moved. Caller holds mmu_lock."""
        cdef uint64_t s, e
        if tdx_atomic_load_acquire(&self._in_progress) != 0 and self._mutation != MUT_RETRY_GFN_IGNORES_RANGE:
            s = tdx_atomic_load_relaxed(&self._range_start)
            e = tdx_atomic_load_relaxed(&self._range_end)
            if s == INVALID_GFN or e == INVALID_GFN:
                return True   # in progress with no range yet: a KVM bug upstream WARNs on; retry
            if s <= gfn < e:
                return True
        return tdx_atomic_load_acquire(&self._seq) != seq

    cdef bint retry_gfn_unsafe_c(self, uint64_t seq, uint64_t gfn) noexcept nogil:
        """mmu_invalidate_retry_gfn_unsafe(): lockless pre-check; may be wrong either way."""
        if (tdx_atomic_load_relaxed(&self._in_progress) != 0
                and gfn >= tdx_atomic_load_relaxed(&self._range_start)
                and gfn < tdx_atomic_load_relaxed(&self._range_end)):
            return True
        return tdx_atomic_load_relaxed(&self._seq) != seq

    # ------------------------------------------------------------------ Python API

    def begin(self, start, end):
        """Start one invalidation (``in_progress += 1``); the range resets only on 0 -> 1.

        Parameters
        ----------
        start, end : int
            The gfn range ``[start, end)`` the caller is about to invalidate. Validated (``0 <=
            start < end <= 2**52``) but **not added**: upstream's begin takes no range since 6.8,
            and every caller follows it with :meth:`range_add`, which the model requires too.

        Raises
        ------
        TdxTypeError, TdxValueError
            Bad ``start``/``end``; nothing changes.

        Notes
        -----
        Mirrors ``kvm_mmu_invalidate_begin()`` (6.18, ``virt/kvm/kvm_main.c``), caller holds
        ``mmu_lock`` for write; SPEC §4.7.
        """
        cdef uint64_t s, e
        _check_range(start, end, &s, &e)
        self.begin_c()

    def range_add(self, start, end):
        """Record ``[start, end)``: the first add sets the range, later ones widen it to the hull.

        Raises
        ------
        TdxTypeError, TdxValueError
            Bad ``start``/``end``; nothing changes.
        InvariantViolation
            ``I12``: no invalidation is in progress (upstream WARNs); nothing changes.

        Notes
        -----
        Mirrors ``kvm_mmu_invalidate_range_add()`` (6.18): concurrent ranges accumulate into one
        hull and persist until every outstanding invalidation ends (no subtraction).
        """
        cdef uint64_t s, e
        cdef int rc
        _check_range(start, end, &s, &e)
        rc = self.range_add_c(s, e)
        if rc < 0:
            msg = f"range_add(start={s:#x}, end={e:#x}) with no invalidation in progress"
            raise InvariantViolation(invariant="I12", msg=msg, gfn=s)

    def end(self, start, end):
        """Finish one invalidation: ``seq += 1`` (wrapping), then ``in_progress -= 1``.

        Parameters
        ----------
        start, end : int
            The range the caller began with; validated like :meth:`begin` and otherwise unused
            (upstream's end takes no range since 6.8).

        Raises
        ------
        TdxTypeError, TdxValueError
            Bad ``start``/``end``; nothing changes.
        InvariantViolation
            ``I12``: ``in_progress`` would go negative (upstream KVM_BUG_ON); nothing changes.

        Notes
        -----
        Mirrors ``kvm_mmu_invalidate_end()`` (6.18). If no range was added since the 0 -> 1
        begin (range still INVALID), upstream WARNs and carries on; the model counts it in
        :attr:`nr_warnings` and carries on.
        """
        cdef uint64_t s, e
        cdef int rc
        _check_range(start, end, &s, &e)
        rc = self.end_c()
        if rc < 0:
            msg = "end() with in_progress == 0 would make it negative"
            raise InvariantViolation(invariant="I12", msg=msg)

    def retry(self, seq):
        """Return whether a fault that snapshotted ``seq`` must retry (any invalidation).

        Notes
        -----
        Mirrors ``mmu_invalidate_retry()`` (6.18); caller holds ``mmu_lock``.
        """
        cdef uint64_t s = _check_seq(seq)
        return self.retry_c(s)

    def retry_gfn(self, seq, gfn):
        """Return whether a fault on ``gfn`` that snapshotted ``seq`` must retry.

        True when an invalidation is in progress and its range is still INVALID (a KVM bug:
        retry) or contains ``gfn``; then when ``seq`` moved. Invalidations of other ranges do not
        force a retry.

        Raises
        ------
        TdxTypeError, TdxValueError
            ``seq`` not a u64, or ``gfn`` outside ``[0, 2**52)``.

        Notes
        -----
        Mirrors ``mmu_invalidate_retry_gfn()`` (6.18); caller holds ``mmu_lock`` (read).
        """
        cdef uint64_t s = _check_seq(seq)
        cdef uint64_t g = _u64_arg("gfn", gfn, 0, MAX_GFN)
        return self.retry_gfn_c(s, g)

    def retry_gfn_unsafe(self, seq, gfn):
        """Lockless pre-check of :meth:`retry_gfn`: relaxed loads, no lock, may be stale.

        Notes
        -----
        Mirrors ``mmu_invalidate_retry_gfn_unsafe()`` (6.18): ``in_progress`` and ``seq`` are
        read once (READ_ONCE), the range may be stale. Single-threaded it answers as
        :meth:`retry_gfn` except in the KVM-bug window where an invalidation is in progress with
        no range yet: upstream's unsafe check has no INVALID test, so it falls through to the
        ``seq`` comparison. A caller must always follow it with the locked check.
        """
        cdef uint64_t s = _check_seq(seq)
        cdef uint64_t g = _u64_arg("gfn", gfn, 0, MAX_GFN)
        return self.retry_gfn_unsafe_c(s, g)

    def retry_gfn_many(self, seq, gfns):
        """Batch :meth:`retry_gfn` over a 1-D integer array; returns a bool array (a copy).

        Raises
        ------
        TdxTypeError
            ``gfns`` is not an integer array (float, bool, object), or ``seq`` is not an int.
        TdxValueError
            ``gfns`` is not 1-D, or holds a gfn outside ``[0, 2**52)`` (named by index).

        Notes
        -----
        One nogil loop over one snapshot of the fields, which the caller's ``mmu_lock`` keeps
        stable (writers hold it for write).
        """
        cdef uint64_t s = _check_seq(seq)
        cdef const uint64_t[::1] g = _check_gfn_array("gfns", gfns)
        cdef Py_ssize_t i, n = g.shape[0]
        out = np.zeros(n, dtype=np.bool_)
        cdef uint8_t[::1] o = out.view(np.uint8)
        cdef bint force, seq_moved, use_range
        cdef uint64_t rs, re
        with nogil:
            use_range = (tdx_atomic_load_acquire(&self._in_progress) != 0
                         and self._mutation != MUT_RETRY_GFN_IGNORES_RANGE)
            rs = tdx_atomic_load_relaxed(&self._range_start)
            re = tdx_atomic_load_relaxed(&self._range_end)
            seq_moved = tdx_atomic_load_acquire(&self._seq) != s
            force = seq_moved or (use_range and (rs == INVALID_GFN or re == INVALID_GFN))
            if force:
                for i in range(n):
                    o[i] = 1
            elif use_range:
                for i in range(n):
                    o[i] = rs <= g[i] < re
        return out

    @property
    def seq(self):
        """``mmu_invalidate_seq`` (u64)."""
        return tdx_atomic_load_acquire(&self._seq)

    @property
    def in_progress(self):
        """``mmu_invalidate_in_progress`` (never negative in the model)."""
        return tdx_atomic_load_acquire(&self._in_progress)

    @property
    def range(self):
        """``(start, end)`` gfns, or None while INVALID; stale once ``in_progress`` is back to 0."""
        cdef uint64_t s = tdx_atomic_load_relaxed(&self._range_start)
        cdef uint64_t e = tdx_atomic_load_relaxed(&self._range_end)
        if s == INVALID_GFN or e == INVALID_GFN:
            return None
        return (s, e)

    @property
    def nr_warnings(self):
        """Non-fatal upstream WARNs seen (``end`` with no range added)."""
        return tdx_atomic_load_relaxed(&self._nr_warnings)

    def state_hash(self):
        """Return a stable 64-bit hash of the full state (serialization: class docstring)."""
        data = struct.pack("<5Q", tdx_atomic_load_relaxed(&self._seq),
                           tdx_atomic_load_relaxed(&self._in_progress),
                           tdx_atomic_load_relaxed(&self._range_start),
                           tdx_atomic_load_relaxed(&self._range_end),
                           tdx_atomic_load_relaxed(&self._nr_warnings))
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _check_gfn_array(name, x):
    """Return ``x`` as a contiguous uint64 array after checking dtype, shape and gfn bounds."""
    return check_u64_array(name, x, MAX_GFN)


def _testing_mutate(InvalidateTracker tracker, name):
    """Test hook: flip one §8 rule on ``tracker`` (names in ``_MUTATIONS``; ``None`` undoes)."""
    if name is None:
        tracker._mutation = MUT_NONE
        return
    if name not in _MUTATIONS:
        msg = f"name={name!r} is not a mutation of _invalidate (one of {sorted(_MUTATIONS)})"
        raise TdxValueError(msg, name="name", value=name)
    tracker._mutation = _MUTATIONS[name]


def _testing_set_seq(InvalidateTracker tracker, seq):
    """Test hook: set ``seq`` directly (to exercise the u64 wrap)."""
    tdx_atomic_store_relaxed(&tracker._seq, _check_seq(seq))
