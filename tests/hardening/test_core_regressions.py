"""Regressions found by running the cores under AddressSanitizer (issue 10 part 2).

Each test drives a core the way the sanitizer run found a memory error. Under the normal build the
bad access was silent (a read of freed memory), so the checks here are the observable contract
(the failed call changes nothing, its retry succeeds); ``.ci/sanitize`` runs this file under
ASan + UBSan, where the old code aborted.
"""

from __future__ import annotations

import pytest

from tdxcore import _testing
from tdxcore._xarray import AttributeStore


@pytest.mark.parametrize("fail_at", range(1, 8))
def test_xarray_reserve_rollback_after_growing_the_root_two_levels(fail_at):
    """``_xa_reserve``'s rollback freed a new root before reading it as its child's parent.

    A store with a root at shift 0 that must grow to shift 18 creates three new roots, newest
    first on the rollback list; an allocation failing after the second one made the rollback free
    the newest root and then read its ``fresh`` flag through the older new root's ``parent``
    (ASan: heap-use-after-free in ``AttributeStore._xa_reserve``).
    """
    s = AttributeStore("xarray")
    s.set_range(3, 5, 1)
    before, nbytes = s.runs_array().tolist(), s.nbytes
    far = 1 << 20
    _testing.xarray_fail_alloc(s, fail_at)
    try:
        s.set_range(far, far + 1, 1)
    except MemoryError:
        assert s.runs_array().tolist() == before and s.nbytes == nbytes
        _testing.xarray_fail_alloc(s, 0)
        s.set_range(far, far + 1, 1)        # the retry succeeds
    _testing.xarray_fail_alloc(s, 0)
    assert s[far] == 1 and s[3] == 1 and s[5] == 0
