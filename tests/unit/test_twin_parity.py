"""Each Cython core and its plain-Python twin expose the same public interface (STYLE §2.7)."""

from __future__ import annotations

import importlib
import inspect

import pytest

PAIRS = [
    ("tdxcore._sept", "tdxcore.reference.sept", "SeptTree"),
    ("tdxcore._pamt", "tdxcore.reference.pamt", "Pamt"),
    ("tdxcore._xarray", "tdxcore.reference.xarray", "AttributeStore"),
    ("tdxcore._invalidate", "tdxcore.reference.invalidate", "InvalidateTracker"),
    ("tdxcore._busylock", "tdxcore.reference.busylock", "BusyLock"),
]


def _public(cls):
    return {n for n in dir(cls) if not n.startswith("_")}


def _params(obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [p.name for p in sig.parameters.values() if p.name != "self"]


@pytest.mark.parametrize(("core", "twin", "name"), PAIRS, ids=[p[2] for p in PAIRS])
def test_same_public_interface(core, twin, name):
    c = getattr(importlib.import_module(core), name)
    t = getattr(importlib.import_module(twin), name)
    assert _public(c) == _public(t), (sorted(_public(c) ^ _public(t)))
    for attr in sorted(_public(c)):
        cm, tm = getattr(c, attr), getattr(t, attr)
        if callable(cm) and callable(tm):
            pc, pt = _params(cm), _params(tm)
            if pc is not None and pt is not None:
                assert pc == pt, f"{name}.{attr}: core {pc} vs twin {pt}"
    assert _params(c) == _params(t) or _params(c) is None


@pytest.mark.parametrize(("core", "twin", "name"), PAIRS, ids=[p[2] for p in PAIRS])
def test_same_module_level_functions(core, twin, name):
    cm, tm = importlib.import_module(core), importlib.import_module(twin)
    cf = {n for n in dir(cm) if not n.startswith("_") and inspect.isroutine(getattr(cm, n))}
    tf = {n for n in dir(tm) if not n.startswith("_") and inspect.isroutine(getattr(tm, n))
          and getattr(getattr(tm, n), "__module__", None) == tm.__name__}
    assert not (cf - tf), f"{core} has public functions its twin lacks: {sorted(cf - tf)}"
