"""The fuzz targets by name: each takes ``bytes``, is deterministic, and raises on a finding.

``tests/fuzz/run.py`` fuzzes them under atheris; ``tests/fuzz/test_corpus.py`` replays their
corpora. See docs/hardening.rst, "Fuzzing".
"""

from __future__ import annotations

from typing import Callable, Dict

from . import target_cores, target_files, target_guest, target_kvm, target_seamcall, target_storm

TARGETS: Dict[str, Callable[[bytes], None]] = {
    "cores": target_cores.target,
    "seamcall": target_seamcall.target,
    "kvm": target_kvm.target,
    "guest": target_guest.target,
    "storm": target_storm.target,
    "files": target_files.target,
}
