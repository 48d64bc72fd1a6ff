"""Sanitizer probes: a deliberate out-of-bounds write and a signed overflow (issue 10, part 2).

These exist only to prove that a build is instrumented: under the AddressSanitizer build
(``TDXCORE_SANITIZE=1``, see ``.ci/sanitize``) :func:`_testing_oob_write` must abort the process
with an ASan ``heap-buffer-overflow`` report, and :func:`_testing_ub_shift` must stop it with a
UBSan ``runtime error`` (a shift exponent past the type's width: CPython's ``-fwrapv`` makes
signed overflow defined, so that is not a usable probe). Nothing else in the package imports this
module; the hooks are reached only through :mod:`tdxcore._testing` (``probe_oob_write``,
``probe_ub_shift``, ``probe_asan``).

Under a normal build the write would corrupt the heap, so both hooks refuse (``TdxValueError``)
unless this extension was compiled with AddressSanitizer — a fact fixed at compile time by the
compiler's own feature macros (``__SANITIZE_ADDRESS__`` for GCC, ``__has_feature`` for clang),
not by anything a caller can set.
"""

from libc.stdlib cimport free, malloc

from tdxcore.errors import TdxValueError, check_int

cdef extern from *:
    """
    #if defined(__SANITIZE_ADDRESS__)
    #  define TDXCORE_PROBE_ASAN 1
    #elif defined(__has_feature)
    #  if __has_feature(address_sanitizer)
    #    define TDXCORE_PROBE_ASAN 1
    #  endif
    #endif
    #ifndef TDXCORE_PROBE_ASAN
    #  define TDXCORE_PROBE_ASAN 0
    #endif
    /* Kept out of line and opaque so the compiler cannot fold the bad write away. */
    static __attribute__((noinline)) void tdxcore_probe_poke(volatile char *p, long i) { p[i] = 1; }
    static __attribute__((noinline)) int tdxcore_probe_shift(int a, int b) { return a << b; }
    """
    const int TDXCORE_PROBE_ASAN
    void tdxcore_probe_poke(volatile char *p, long i) nogil
    int tdxcore_probe_shift(int a, int b) nogil


cdef _refuse(str what):
    if not TDXCORE_PROBE_ASAN:
        msg = (f"{what}: tdxcore._probe was built without AddressSanitizer, where this probe would "
               "corrupt memory; build with TDXCORE_SANITIZE=1 (.ci/sanitize)")
        raise TdxValueError(msg, name="build", value="no-asan")


def _testing_asan():
    """Test hook: whether this extension was compiled with AddressSanitizer."""
    return bool(TDXCORE_PROBE_ASAN)


def _testing_oob_write(size=16):
    """Test hook: write one byte just past a ``size``-byte heap block (ASan build only).

    Under ASan the process aborts with a ``heap-buffer-overflow`` report and never returns.
    """
    _refuse("probe_oob_write")
    cdef long n = check_int("size", size, 1, 1 << 20)
    cdef char *buf = <char *>malloc(n)
    if buf == NULL:
        raise MemoryError()
    tdxcore_probe_poke(buf, n)
    free(buf)


def _testing_ub_shift(bits):
    """Test hook: ``1 << bits`` in C ``int`` arithmetic (ASan+UBSan build only); ``bits=32`` is UB."""
    _refuse("probe_ub_shift")
    cdef int b = check_int("bits", bits, 0, 64)
    return tdxcore_probe_shift(1, b)
