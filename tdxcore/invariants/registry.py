"""The invariant registry: ``register_invariant`` and ``check_invariants`` (SPEC §3.5, §6).

An invariant is a callable ``fn(host)`` that returns normally when it holds and raises
:class:`~tdxcore.errors.InvariantViolation` (naming its id, the frame or gfn, the event index
and a replay hint) when it does not. Built-in ids are registered by :mod:`.module` (structural)
and :mod:`.temporal` (over the event log) when :mod:`tdxcore.invariants` is imported; a later
layer (KVM) or a user adds its own with :func:`register_invariant`.

``check_invariants(host)`` runs every registered invariant in registration order with
``host.tdx.lock`` held (the model is quiescent against OS threads for the whole check) and
raises the first violation. During one call the built-in checks share a per-call cache (the
TDs' ownership records are computed once, not once per invariant).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from tdxcore.errors import TdxTypeError, TdxValueError

__all__ = ["register_invariant", "unregister_invariant", "check_invariants", "invariant_ids", "LAYERS",
           "call_cache", "replay_hint"]

#: Layers an invariant can belong to (what it reads: module state, or KVM state too).
LAYERS = ("module", "kvm")

InvariantFn = Callable[[Any], None]

_REGISTRY: Dict[str, Tuple[InvariantFn, str]] = {}
_LOCAL = threading.local()


def register_invariant(id: str, fn: InvariantFn, layer: str = "module") -> None:  # noqa: A002
    """Add invariant ``id`` checked by ``fn(host)`` to every later :func:`check_invariants`.

    Parameters
    ----------
    id : str
        A stable, unique, non-empty id (the built-ins are ``"I01"`` … ``"I22"``, ``"S6b"``,
        ``"S6c"``). ``fn`` should raise ``InvariantViolation(id, ...)`` with this id.
    fn : callable
        ``fn(host) -> None``; raises :class:`~tdxcore.errors.InvariantViolation` when broken.
    layer : {"module", "kvm"}
        What the invariant reads.

    Raises
    ------
    TdxTypeError
        ``id`` is not a str or ``fn`` is not callable.
    TdxValueError
        ``id`` is empty or already registered, or ``layer`` is unknown.

    Examples
    --------
    >>> import tdxcore as tdx
    >>> def no_vms(host):
    ...     if host.vms:
    ...         raise tdx.InvariantViolation("X01", "a VM is registered")
    >>> tdx.register_invariant("X01", no_vms)
    >>> tdx.check_invariants(tdx.Host(memory=8 << 20), ids=["X01"])
    >>> from tdxcore.invariants import unregister_invariant; unregister_invariant("X01")
    """
    if not isinstance(id, str):
        msg = f"id={id!r} must be a str"
        raise TdxTypeError(msg, name="id", value=id)
    if not id:
        msg = "id='' must be a non-empty str"
        raise TdxValueError(msg, name="id", value=id)
    if not callable(fn):
        msg = f"fn={fn!r} must be callable as fn(host)"
        raise TdxTypeError(msg, name="fn", value=fn)
    if layer not in LAYERS:
        msg = f"layer={layer!r} must be one of {LAYERS}"
        raise TdxValueError(msg, name="layer", value=layer)
    if id in _REGISTRY:
        msg = f"id={id!r} is already registered (ids are unique)"
        raise TdxValueError(msg, name="id", value=id)
    _REGISTRY[id] = (fn, layer)


def unregister_invariant(id: str) -> None:  # noqa: A002
    """Remove invariant ``id`` (``TdxValueError`` if it is not registered)."""
    if id not in _REGISTRY:
        msg = f"id={id!r} is not a registered invariant"
        raise TdxValueError(msg, name="id", value=id)
    del _REGISTRY[id]


def invariant_ids(layer: Optional[str] = None) -> Tuple[str, ...]:
    """Return the registered ids in registration order (only ``layer``'s if given)."""
    return tuple(k for k, (_, lay) in _REGISTRY.items() if layer is None or lay == layer)


def call_cache(host: Any) -> Dict[str, Any]:
    """Return the cache the checks of the current :func:`check_invariants` call on ``host`` share.

    Outside a call (an invariant function called directly) a fresh dict: nothing is reused.
    """
    c = getattr(_LOCAL, "cache", None)
    if c is not None and c[0] is host:
        return c[1]
    return {}


def replay_hint(host: Any, event_index: Optional[int] = None) -> str:
    """One-line replay hint built from the host's configuration and its event log.

    ``Host(seed=…, packages=…, cpus_per_package=…, memory=…) events[:N] digest=0x…``: the host
    to rebuild and how much of the (deterministic) event log reproduces the state. A storm's
    ``tdxcore replay report.json`` takes its place once reports exist.
    """
    n = len(host.events) if event_index is None else event_index + 1
    return (f"Host(seed={host.seed}, packages={host.nr_packages}, cpus_per_package={host.cpus_per_package}, "
            f"memory={host.memory:#x}) events[:{n}] digest={host.events.digest():#018x}")


def _select(ids: Optional[Iterable[str]]) -> List[str]:
    if ids is None:
        return list(_REGISTRY)
    if isinstance(ids, str) or not hasattr(ids, "__iter__"):
        msg = f"ids={ids!r} must be None or an iterable of invariant ids"
        raise TdxTypeError(msg, name="ids", value=ids)
    want = list(ids)
    for i in want:
        if not isinstance(i, str):
            msg = f"ids contains {i!r}: every id is a str"
            raise TdxTypeError(msg, name="ids", value=i)
        if i not in _REGISTRY:
            msg = f"ids contains {i!r}, which is not a registered invariant (known: {', '.join(_REGISTRY)})"
            raise TdxValueError(msg, name="ids", value=i)
    return [k for k in _REGISTRY if k in set(want)]


def check_invariants(host: Any, ids: Optional[Iterable[str]] = None) -> None:
    """Check the registered invariants on ``host``; raise the first violation.

    Parameters
    ----------
    host : Host
        The model host (``tdx.Host``).
    ids : iterable of str, optional
        Check only these ids (run in registration order); default: all.

    Raises
    ------
    InvariantViolation
        ``.invariant`` the id, ``.pfn``/``.gfn`` the frame or gfn, ``.event_index`` the latest
        event touching it (else the last event), ``.replay`` a one-line replay hint.
    TdxTypeError, TdxValueError
        ``host`` is not a host, or ``ids`` names an unknown id.

    Notes
    -----
    Cost: O(live TD pages + events since the previous check of this host), never O(host
    frames); see :mod:`tdxcore.invariants.module` and :mod:`tdxcore.invariants.temporal`.
    SPEC §3.5, §6.
    """
    if not (hasattr(host, "tdx") and hasattr(host, "events") and hasattr(host, "pamt")):
        msg = f"host={host!r} must be a tdx.Host"
        raise TdxTypeError(msg, name="host", value=host)
    todo = _select(ids)
    prev = getattr(_LOCAL, "cache", None)
    with host.tdx.lock:
        _LOCAL.cache = (host, {})
        try:
            for k in todo:
                _REGISTRY[k][0](host)
        finally:
            _LOCAL.cache = prev
