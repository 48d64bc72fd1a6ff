"""What every fuzz target shares: the allowed outcomes, the finding exception, a watchdog."""

from __future__ import annotations

import faulthandler
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Tuple

import numpy as np

from tdxcore.errors import HostError, KvmError, TdxTypeError, TdxValueError

#: SPEC §7's allowed outcomes of bad input. ``HostError`` is the host layer's errno error (an
#: ``OSError`` like ``KvmError``: ``host.mmap`` of too much memory is ENOMEM, as the kernel's).
ALLOWED = (TdxTypeError, TdxValueError, KvmError, HostError)


class Finding(AssertionError):
    """A target saw something SPEC §7 forbids.

    An unexpected exception, a divergence from the twin, a broken invariant: fuzzers report it
    as a crash, the corpus replay as a failure.
    """


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Dump every thread's stack and exit the process if the body runs longer than ``seconds``.

    A hang is a finding: libFuzzer's own ``-timeout`` catches it while fuzzing, this catches it
    in the corpus replay (pytest would otherwise wait forever).
    """
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def norm(x: Any) -> Any:
    """Return a comparable, hashable form of a method's result (arrays and iterators become tuples)."""
    if isinstance(x, np.ndarray):
        return ("array", str(x.dtype), tuple(x.shape), tuple(x.ravel().tolist()))
    if isinstance(x, (tuple, list)):
        return tuple(norm(v) for v in x)
    if isinstance(x, (bool, int, str, type(None), float)):
        return x
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "__iter__"):
        return tuple(norm(v) for v in x)
    return repr(x)


def call(obj: Any, name: str, args: Tuple[Any, ...], allowed: Tuple[type, ...] = ALLOWED) -> Any:
    """Call ``obj.name(*args)``; return ``("ok", result)`` or ``("err", TypeError|ValueError|...)``.

    An exception outside ``allowed`` is a :class:`Finding`.
    """
    try:
        attr = getattr(obj, name)
        r = attr(*args) if callable(attr) else attr
        return ("ok", norm(r))
    except allowed as e:
        return ("err", _family(e))
    except Finding:
        raise
    except Exception as e:
        msg = f"{type(obj).__name__}.{name}{_short(args)} raised {type(e).__name__}: {e}"
        raise Finding(msg) from e


def _family(e: BaseException) -> str:
    for base in (TypeError, ValueError, KvmError, HostError):
        if isinstance(e, base):
            return base.__name__
    return type(e).__name__


def _short(args: Tuple[Any, ...]) -> str:
    s = repr(args)
    return s if len(s) < 300 else s[:300] + "...)"
