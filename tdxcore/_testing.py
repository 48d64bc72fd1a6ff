"""Test-only hooks into the Cython cores. Never imported by ``tdxcore/__init__``.

Each core defines its hooks as module-level ``_testing_<what>`` functions; this module exports
them as ``<core>_<what>`` (``_sept._testing_force_state`` → ``sept_force_state``), in the spirit
of scikit-learn's ``Pytest*`` test-only subclasses (STYLE §2.6). Hooks let tests force a state
the public API cannot reach (the legality oracle), flip one transition (proving a differential
check can fail), or make the N-th allocation fail (reserve-before-change).
"""

from __future__ import annotations

import importlib

__all__: list[str] = []

# _probe: the sanitizer probes (probe_asan, probe_oob_write, probe_ub_shift; issue 10).
for _core in ("_sept", "_pamt", "_xarray", "_invalidate", "_busylock", "_probe"):
    _mod = importlib.import_module(f"tdxcore.{_core}")
    for _name in dir(_mod):
        if _name.startswith("_testing_"):
            _public = f"{_core[1:]}_{_name[len('_testing_'):]}"
            globals()[_public] = getattr(_mod, _name)
            __all__.append(_public)
del _core, _mod, _name
