"""Each Cython core and its plain-Python twin expose the same public interface (STYLE §2.7)."""

from __future__ import annotations

import importlib
import inspect

import pytest

# (core module, twin module, class, constructor arguments)
PAIRS = [
    ("tdxcore._sept", "tdxcore.reference.sept", "SeptTree", ()),
    ("tdxcore._pamt", "tdxcore.reference.pamt", "Pamt", (64,)),
    ("tdxcore._xarray", "tdxcore.reference.xarray", "AttributeStore", ()),
    ("tdxcore._invalidate", "tdxcore.reference.invalidate", "InvalidateTracker", ()),
    ("tdxcore._busylock", "tdxcore.reference.busylock", "BusyLock", (146,)),
]
IDS = [p[2] for p in PAIRS]


def _public(obj):
    return {n for n in dir(obj) if not n.startswith("_")}


def _params(obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [p.name for p in sig.parameters.values() if p.name != "self"]


@pytest.mark.parametrize(("core", "twin", "name", "args"), PAIRS, ids=IDS)
def test_same_public_interface(core, twin, name, args):
    c_cls = getattr(importlib.import_module(core), name)
    t_cls = getattr(importlib.import_module(twin), name)
    c, t = c_cls(*args), t_cls(*args)
    assert _public(c) == _public(t), sorted(_public(c) ^ _public(t))
    for attr in sorted(_public(c)):
        cm, tm = getattr(c_cls, attr, None), getattr(t_cls, attr, None)
        if callable(cm) and callable(tm):
            pc, pt = _params(cm), _params(tm)
            if pc is not None and pt is not None:
                assert pc == pt, f"{name}.{attr}: core {pc} vs twin {pt}"


def _own_functions(mod):
    return {
        n for n in dir(mod)
        if not n.startswith("_") and inspect.isroutine(getattr(mod, n))
        and getattr(getattr(mod, n), "__module__", None) == mod.__name__
    }


@pytest.mark.parametrize(("core", "twin", "name", "args"), PAIRS, ids=IDS)
def test_core_module_functions_exist_in_twin(core, twin, name, args):
    cm, tm = importlib.import_module(core), importlib.import_module(twin)
    missing = _own_functions(cm) - _own_functions(tm)
    assert not missing, f"{core} has public functions its twin lacks: {sorted(missing)}"
