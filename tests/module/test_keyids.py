"""tdxcore.module.keyids: partition, lowest-first guest HKIDs, ENOSPC, configured count."""

from __future__ import annotations

import errno

import pytest

from tdxcore.errors import HostError, TdxTypeError, TdxValueError
from tdxcore.module import Host
from tdxcore.module.keyids import KeyIdPartition


def test_partition_layout():
    k = KeyIdPartition(31, 32)
    assert k.global_keyid == 32 and k.guest_range == (33, 64) and k.nr_guest_keyids == 31
    assert k.nr_keyids == 64 and k.is_private(32) and k.is_private(63) and not k.is_private(31)
    assert not k.is_private(64)


def test_tdx_keyids_3_fits_two_tds():
    k = Host(tdx_keyids=3, mktme_keyids=5).keyids
    assert k.global_keyid == 6
    assert (k.alloc(), k.alloc()) == (7, 8)
    with pytest.raises(HostError) as ei:
        k.alloc()
    assert ei.value.errno == errno.ENOSPC and "no guest HKID left" in str(ei.value)


def test_alloc_lowest_first_and_reuse():
    k = KeyIdPartition(0, 5)
    assert [k.alloc() for _ in range(3)] == [2, 3, 4]
    k.free(3)
    assert k.nr_free == 2 and k.alloc() == 3 and k.allocated == (2, 3, 4)


def test_free_and_configured_rules():
    k = KeyIdPartition(0, 4)
    h = k.alloc()
    with pytest.raises(TdxValueError, match="not an allocated"):
        k.free(h + 1)
    with pytest.raises(TdxValueError, match="not an allocated"):
        k.note_configured(h + 1)
    k.note_configured(h)
    assert k.nr_configured == 1
    with pytest.raises(TdxValueError, match="already configured"):
        k.note_configured(h)
    with pytest.raises(TdxValueError, match="still configured"):
        k.free(h)
    k.note_unconfigured(h)
    with pytest.raises(TdxValueError, match="not configured"):
        k.note_unconfigured(h)
    k.free(h)
    assert k.nr_configured == 0 and k.allocated == ()


def test_bad_arguments():
    with pytest.raises(TdxTypeError, match="tdx_keyids"):
        KeyIdPartition(0, "3")  # type: ignore[arg-type]
    with pytest.raises(TdxValueError, match="mktme_keyids"):
        KeyIdPartition(-1, 3)
    with pytest.raises(TdxValueError, match="hkid"):
        KeyIdPartition(0, 3).free(1 << 20)


def test_state_bytes_change_with_state():
    k = KeyIdPartition(1, 4)
    a = k.state_bytes()
    h = k.alloc()
    b = k.state_bytes()
    k.note_configured(h)
    assert len({a, b, k.state_bytes()}) == 3
