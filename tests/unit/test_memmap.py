"""The storm's memory map (tdxcore.storm.memmap).

Per-gfn classification on a real TD and on a fake VM (every non-S-EPT category), the PNG, and
the clear error without the ``plot`` extra.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

import tdxcore as tdx
from tdxcore import guest
from tdxcore.constants import MemAttr
from tdxcore.kvm import helpers
from tdxcore.storm import memmap

BASE = 4 << 30
G = BASE >> 12
MiB = 1 << 20
PRIVATE = int(MemAttr.PRIVATE)
LABEL = {i: label for i, (label, _) in enumerate(memmap.CATEGORIES)}


@pytest.fixture(scope="module")
def td():
    """Build an 8 MiB TD: 4 MiB private (10 gfns accepted), 4 MiB shared (5 gfns touched)."""
    host = tdx.Host(packages=2, cpus_per_package=2, memory=128 << 20, tdx_keyids=8, seed=0)
    t = helpers.td_create(tdx.Kvm(host), vcpus=1, memory=8 * MiB, gpa=BASE, initial_pages=0)
    t.vm.set_memory_attributes(BASE, 4 * MiB, PRIVATE)
    t.vm.set_memory_attributes(BASE + 4 * MiB, 4 * MiB, 0)
    ops = [guest.write(BASE + 3 * i * 4096, i) for i in range(10)]
    ops += [guest.read((BASE + 4 * MiB + i * 4096) | (1 << 47)) for i in range(5)]
    t.vcpus[0].run(ops)
    yield t
    t.close()


def test_gfn_states_of_a_td(td):
    """Accepted private gfns are S-EPT MAPPED, touched shared gfns mapped, the rest unmapped."""
    (slot, cats), = memmap.gfn_states(td.vm)
    assert slot.base_gfn == G and len(cats) == 2048
    labels = [LABEL[int(c)] for c in cats]
    accepted = {3 * i for i in range(10)}
    for k in range(1024):
        assert labels[k] == ("private, S-EPT MAPPED" if k in accepted else "private, no mapping"), k
    assert labels[1024:1029] == ["shared, mapped"] * 5
    assert set(labels[1029:]) == {"shared, no mapping"}


def test_render_map_png(td, tmp_path):
    """The map is a PNG and its legend counts are the per-category gfn counts."""
    pytest.importorskip("matplotlib")
    p = tmp_path / "map.png"
    counts = memmap.render_map(td.vm, p, title="test map")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert counts == {"private, S-EPT MAPPED": 10, "private, no mapping": 1014, "shared, mapped": 5,
                      "shared, no mapping": 1019}


class _FakeMmu:
    def __init__(self, leaves):
        self._leaves = leaves

    def leaf(self, gfn):
        return self._leaves.get(gfn)


def test_every_non_sept_category_on_a_fake_vm(tmp_path):
    """Unaligned slots (padding), MMIO, frozen leaves, inconsistencies."""
    """Unaligned slots (padding), MMIO, frozen mirror leaves and both kinds of inconsistency."""
    attrs = {0x201: PRIVATE, 0x202: PRIVATE, 0x203: PRIVATE, 0x204: PRIVATE}
    vm = SimpleNamespace(
        id=3,
        memslots=[SimpleNamespace(id=0, base_gfn=0x200, npages=8),
                  SimpleNamespace(id=1, base_gfn=0x1100, npages=2)],
        get_memory_attributes=lambda g: attrs.get(g, 0),
        mmu=_FakeMmu({0x202: (7, 2), 0x203: (8, 1), 0x205: (9, 1)}),
        direct=SimpleNamespace(get={0x200: 5, 0x204: 6, 0x206: -1}.get),
    )
    states = memmap.gfn_states(vm)
    got = [LABEL[int(c)] for c in states[0][1]]
    assert got == ["shared, mapped", "private, no mapping", "private, mirror frozen",
                   "private, other S-EPT state",       # no TD behind it: no S-EPT to read
                   "inconsistent", "inconsistent", "shared, MMIO", "shared, no mapping"]
    grid, ticks, bounds = memmap._grid(states)
    assert grid.shape == (2, 512) and bounds == [1]
    assert grid[0, 8] == 0 and grid[1, 0] == 0 and grid[1, 0x100] != 0     # padding outside the slots
    assert ticks[0] == (0, "slot 0: 0x200000") and ticks[1][1].startswith("slot 1: ")
    pytest.importorskip("matplotlib")
    assert memmap.render_map(vm, tmp_path / "f.png")["inconsistent"] == 2


def test_missing_matplotlib_names_the_extra(td, tmp_path, monkeypatch):
    """Without matplotlib the error names the plot extra; no file is written."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"tdxcore\[plot\]"):
        memmap.render_map(td.vm, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
