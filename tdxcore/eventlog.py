"""The model's append-only event log (SPEC §3.5, §5) with a running, process-stable digest.

An event is one plain tuple ``(kind, actor, *fields)``: ``kind`` and ``actor`` are ``str``, every
field is an ``int``, ``str``, ``None`` or a tuple of those (nested). Its index in the log is its
identity (invariants and replays name it). Nothing else is allocated per event.

Field layout per kind (the base kinds; later layers add theirs with :meth:`EventLog.register_kind`):

================  ==========================================================  ===========
kind              fields (after kind, actor)                                  leaf space
================  ==========================================================  ===========
seamcall_begin    leaf, cpu, args (rcx, rdx, r8, r9, r10, r11), gfn, pfn      SEAMCALL
seamcall_end      leaf, cpu, status, out (rcx, rdx, r8, r9, r10, r11), gfn,   SEAMCALL
                  pfn
lock_conflict     resource, operand, holder, contender, leaf, gfn, pfn        SEAMCALL
bringup           step, status, errno, detail                                 -
cpu               cpu, package, online (1 = came online, 0 = went offline)    -
leak              pfn, page_type, what, hkid, reason                          -
================  ==========================================================  ===========

``leaf`` is the module's leaf number (an ``int``; :class:`~tdxcore.status.Leaf` members are ints);
``status`` the 64-bit module status; ``gfn``/``pfn`` are ``None`` where a call has none (e.g. the
SYS leaves); ``resource`` names the lock ("sept_tree", "sept_entry", "pamt_entry", "td_epoch",
"tdr", "kot", ...), ``holder``/``contender`` name actors (or in-flight op ids). ``errno`` is a
positive errno or 0. A kind's "leaf space" says which enum its ``leaf`` field belongs to, so
``filter(leaf=Leaf.TDH_MEM_PAGE_AUG)`` never matches the guest's ``TDG.MEM.PAGE.ACCEPT`` (both 6).

The digest is blake2b (8 bytes) updated event by event over a canonical encoding of every field
(:func:`encode_event`); it never uses ``hash()``, so it is the same in every process and for every
``PYTHONHASHSEED`` (SPEC §5 "every event field hashed"; STYLE §2.7).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from types import MappingProxyType
from typing import IO, Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union, overload

from tdxcore.errors import TdxTypeError, TdxValueError
from tdxcore.status import Leaf, TdcallLeaf

__all__ = ["Event", "EventLog", "BASE_KINDS", "SCHEMA", "encode_event"]

#: Schema tag of the JSON Lines export (first line's ``schema``).
SCHEMA = "tdxcore.events/1"

Event = Tuple[Any, ...]

#: Leaf spaces a kind's ``leaf`` field can belong to.
LEAF_SPACES = ("seamcall", "tdcall")

#: kind -> (field names, leaf space or None). Frozen: per-log additions go to the log's own table.
BASE_KINDS: Mapping[str, Tuple[Tuple[str, ...], Optional[str]]] = MappingProxyType({
    "seamcall_begin": (("leaf", "cpu", "args", "gfn", "pfn"), "seamcall"),
    "seamcall_end": (("leaf", "cpu", "status", "out", "gfn", "pfn"), "seamcall"),
    "lock_conflict": (("resource", "operand", "holder", "contender", "leaf", "gfn", "pfn"), "seamcall"),
    "bringup": (("step", "status", "errno", "detail"), None),
    "cpu": (("cpu", "package", "online"), None),
    "leak": (("pfn", "page_type", "what", "hkid", "reason"), None),
})


def _enc(x: Any, out: List[bytes]) -> None:
    """Append the canonical encoding of one field to ``out`` (type tag, length, payload)."""
    if x is None:
        out.append(b"n")
    elif isinstance(x, str):
        b = x.encode("utf-8")
        out.append(b"s%d:" % len(b))
        out.append(b)
    elif isinstance(x, int):  # bool and IntEnum members are ints: encoded by value
        out.append(b"i%d;" % int(x))
    elif isinstance(x, tuple):
        out.append(b"t%d:" % len(x))
        for y in x:
            _enc(y, out)
    else:
        msg = f"event field {x!r} has type {type(x).__name__}: only int, str, None and tuples are allowed"
        raise TdxTypeError(msg, name="fields", value=x)


#: The field types :meth:`EventLog.emit` accepts without looking further (subclasses go to
#: :func:`_check_field`: an IntEnum is an int, a bool is refused nowhere but encoded by value).
_PLAIN_TYPES = frozenset({int, str, type(None)})

#: str -> its encoding ``s<len>:<utf-8>``, for the few hundred names events repeat (kinds, actors).
_STR_ENC: Dict[str, bytes] = {}


def _str_enc(x: str) -> bytes:
    b = x.encode("utf-8")
    e = b"s%d:" % len(b) + b
    if len(_STR_ENC) < 65536 and len(x) <= 64:
        _STR_ENC[x] = e
    return e


def _check_field(x: Any) -> None:
    """Raise TdxTypeError unless ``x`` is an int, str, None or a tuple of those (recursively)."""
    if x is None or isinstance(x, (int, str)):
        return
    if isinstance(x, tuple):
        for y in x:
            _check_field(y)
        return
    msg = f"event field {x!r} has type {type(x).__name__}: only int, str, None and tuples are allowed"
    raise TdxTypeError(msg, name="fields", value=x)


def encode_event(event: Event) -> bytes:
    """Return the canonical byte encoding of ``event`` (what the digest hashes).

    Notes
    -----
    ``None`` -> ``n``; ``int`` -> ``i<decimal>;``; ``str`` -> ``s<len>:<utf-8>``; tuple ->
    ``t<count>:`` then its items; the event itself is encoded as a tuple. Decimal text makes the
    encoding independent of integer width and of the platform.
    """
    out: List[bytes] = []
    _enc(tuple(event), out)
    return b"".join(out)


class EventLog:
    """Append-only log of model events with a running 64-bit digest.

    Examples
    --------
    >>> log = EventLog()
    >>> log.emit("cpu", "host", 1, 0, 0)
    0
    >>> log[0]
    ('cpu', 'host', 1, 0, 0)
    >>> len(log), log.digest() == EventLog.from_events(list(log)).digest()
    (1, True)

    Notes
    -----
    Not thread-safe by itself: callers that emit from several OS threads hold their own lock
    (the module emits under ``TdxModule``'s locks). SPEC §3.5.
    """

    __slots__ = ("_events", "_hash", "_hashed", "_kinds", "_arity")

    def __init__(self) -> None:
        self._events: List[Event] = []
        self._hash = hashlib.blake2b(digest_size=8, person=b"tdxevents")
        self._hashed = 0          # events[:_hashed] are folded into _hash (digest() catches up)
        self._kinds: Dict[str, Tuple[Tuple[str, ...], Optional[str]]] = dict(BASE_KINDS)
        self._arity: Dict[str, int] = {k: len(f) for k, (f, _) in BASE_KINDS.items()}   # emit's check

    # ------------------------------------------------------------------ kinds
    def register_kind(self, kind: str, fields: Tuple[str, ...], leaf_space: Optional[str] = None) -> None:
        """Declare a new event kind and its field names (idempotent for an identical declaration).

        Parameters
        ----------
        kind : str
            The kind's name, e.g. ``"ioctl"``.
        fields : tuple of str
            Field names after ``kind, actor``; name them ``leaf``/``gfn``/``pfn`` to make
            :meth:`filter` see them.
        leaf_space : {"seamcall", "tdcall"} or None
            Which enum the ``leaf`` field holds.

        Raises
        ------
        TdxTypeError, TdxValueError
            Bad types, an unknown leaf space, or ``kind`` already declared differently.
        """
        if not isinstance(kind, str) or not kind:
            msg = f"kind={kind!r} must be a non-empty str"
            raise TdxTypeError(msg, name="kind", value=kind)
        if not isinstance(fields, tuple) or not all(isinstance(f, str) for f in fields):
            msg = f"fields={fields!r} must be a tuple of str"
            raise TdxTypeError(msg, name="fields", value=fields)
        if len(set(fields)) != len(fields):
            msg = f"fields={fields!r} has a duplicate name"
            raise TdxValueError(msg, name="fields", value=fields)
        if leaf_space is not None and leaf_space not in LEAF_SPACES:
            msg = f"leaf_space={leaf_space!r} must be None or one of {LEAF_SPACES}"
            raise TdxValueError(msg, name="leaf_space", value=leaf_space)
        if leaf_space is not None and "leaf" not in fields:
            msg = f"leaf_space={leaf_space!r} given but fields={fields!r} has no 'leaf'"
            raise TdxValueError(msg, name="leaf_space", value=leaf_space)
        new = (fields, leaf_space)
        old = self._kinds.get(kind)
        if old is not None and old != new:
            msg = f"kind={kind!r} is already declared as {old!r}, not {new!r}"
            raise TdxValueError(msg, name="kind", value=kind)
        self._kinds[kind] = new
        self._arity[kind] = len(fields)

    @property
    def kinds(self) -> Mapping[str, Tuple[Tuple[str, ...], Optional[str]]]:
        """Read-only view of kind -> (field names, leaf space)."""
        return MappingProxyType(self._kinds)

    # ------------------------------------------------------------------ append
    def emit(self, kind: str, actor: str, *fields: Any) -> int:
        """Append one event and return its index.

        Parameters
        ----------
        kind : str
            A declared kind (table in the module docstring, or :meth:`register_kind`).
        actor : str
            Who acted: ``"host"``, ``"tdx_enable"``, ``"vcpu0"``, a storm actor's name.
        *fields
            Exactly the kind's fields, in order: ints, strs, None or tuples of those.

        Returns
        -------
        int
            The new event's index.

        Raises
        ------
        TdxValueError
            Unknown kind or wrong number of fields.
        TdxTypeError
            ``actor`` is not a str, or a field has another type (nothing is appended).
        """
        # Hot path (every model step emits): one dict lookup for the arity, exact-type tests for
        # the plain fields and for the items of flat tuples; anything else takes the checked path.
        if self._arity.get(kind) != len(fields) or type(actor) is not str:
            self._check_head(kind, actor, fields)
        # Validate every field before anything changes; hashing is deferred to digest(), which
        # encodes the same immutable tuples in order (so emit stays cheap on hot paths). The
        # common case, only int/str/None fields, is one C-level test; else field by field.
        if not _PLAIN_TYPES.issuperset(map(type, fields)):
            for x in fields:
                t = type(x)
                if t is tuple:
                    if not _PLAIN_TYPES.issuperset(map(type, x)):
                        _check_field(x)
                elif t is not int and t is not str and x is not None:
                    _check_field(x)
        events = self._events
        events.append((kind, actor, *fields))
        return len(events) - 1

    def _check_head(self, kind: str, actor: str, fields: Tuple[Any, ...]) -> None:
        """Raise for an undeclared kind, a wrong field count or a non-str actor (emit's slow path)."""
        spec = self._kinds.get(kind)
        if spec is None:
            msg = f"kind={kind!r} is not a declared event kind"
            raise TdxValueError(msg, name="kind", value=kind)
        if len(fields) != len(spec[0]):
            msg = f"kind={kind!r} takes {len(spec[0])} fields {spec[0]}, got {len(fields)}"
            raise TdxValueError(msg, name="fields", value=fields)
        if not isinstance(actor, str):
            msg = f"actor={actor!r} must be a str"
            raise TdxTypeError(msg, name="actor", value=actor)

    # ------------------------------------------------------------------ read
    def __len__(self) -> int:
        return len(self._events)

    @overload
    def __getitem__(self, i: int) -> Event: ...
    @overload
    def __getitem__(self, i: slice) -> List[Event]: ...
    def __getitem__(self, i: Union[int, slice]) -> Union[Event, List[Event]]:
        return self._events[i]

    def __iter__(self) -> Iterator[Event]:
        return iter(self._events)

    def __repr__(self) -> str:
        return f"EventLog(len={len(self._events)}, digest={self.digest():#018x})"

    def digest(self) -> int:
        """Return the running 64-bit digest of every event so far (stable across processes).

        Notes
        -----
        Events are folded into the hash lazily, here, in order, with :func:`encode_event`'s bytes;
        the value is the same as hashing at every ``emit`` (events are immutable tuples).
        """
        evs, n = self._events, len(self._events)
        if self._hashed < n:
            out: List[bytes] = []
            put = out.append
            strs = _STR_ENC
            # encode_event's bytes, unrolled for the common shapes: str / int / None fields and
            # flat tuples of them; anything else (a nested tuple, an int subclass) goes to _enc
            for ev in evs[self._hashed:n]:
                put(b"t%d:" % len(ev))
                for x in ev:
                    t = type(x)
                    if t is int:
                        put(b"i%d;" % x)
                    elif t is str:
                        b = strs.get(x)
                        if b is None:
                            b = _str_enc(x)
                        put(b)
                    elif x is None:
                        put(b"n")
                    elif t is tuple:
                        put(b"t%d:" % len(x))
                        for y in x:
                            if type(y) is int:
                                put(b"i%d;" % y)
                            else:
                                _enc(y, out)
                    else:
                        _enc(x, out)
            self._hash.update(b"".join(out))
            self._hashed = n
        return int.from_bytes(self._hash.digest(), "little")

    def field(self, event: Event, name: str) -> Any:
        """Return field ``name`` of ``event`` by its kind's layout (``KeyError`` if it has none)."""
        names = self._kinds[event[0]][0]
        return event[2 + names.index(name)] if name in names else _missing(name, event)

    def filter(
        self,
        kind: Optional[str] = None,
        actor: Optional[str] = None,
        leaf: Union[Leaf, TdcallLeaf, None] = None,
        gfn: Optional[int] = None,
        pfn: Optional[int] = None,
    ) -> List[Tuple[int, Event]]:
        """Return ``(index, event)`` for every event matching all the given criteria.

        Parameters
        ----------
        kind, actor : str, optional
            Exact match.
        leaf : Leaf or TdcallLeaf, optional
            Matches kinds with a ``leaf`` field in that enum's space (a bare int is refused:
            SEAMCALL and TDCALL numbers overlap).
        gfn, pfn : int, optional
            Matches kinds with that field equal to the value.

        Raises
        ------
        TdxTypeError
            ``leaf`` is not a ``Leaf``/``TdcallLeaf``.
        """
        space: Optional[str] = None
        if leaf is not None:
            if isinstance(leaf, Leaf):
                space = "seamcall"
            elif isinstance(leaf, TdcallLeaf):
                space = "tdcall"
            else:
                msg = f"leaf={leaf!r} must be a tdx.Leaf or tdx.TdcallLeaf, not {type(leaf).__name__}"
                raise TdxTypeError(msg, name="leaf", value=leaf)
        wanted = [(n, v) for n, v in (("gfn", gfn), ("pfn", pfn)) if v is not None]
        # Resolve field positions once per kind.
        plan: Dict[str, Optional[List[Tuple[int, Any]]]] = {}
        for k, (names, ls) in self._kinds.items():
            if (space is not None and ls != space) or any(n not in names for n, _ in wanted):
                plan[k] = None
                continue
            checks: List[Tuple[int, Any]] = [(2 + names.index(n), v) for n, v in wanted]
            if space is not None:
                checks.append((2 + names.index("leaf"), int(leaf)))  # type: ignore[arg-type]
            plan[k] = checks
        out: List[Tuple[int, Event]] = []
        for i, ev in enumerate(self._events):
            if kind is not None and ev[0] != kind:
                continue
            if actor is not None and ev[1] != actor:
                continue
            chk = plan.get(ev[0])
            if chk is None:
                continue
            if all(ev[p] is not None and ev[p] == v for p, v in chk):
                out.append((i, ev))
        return out

    # ------------------------------------------------------------------ files
    def to_jsonl(self, path_or_file: Union[str, "os.PathLike[str]", IO[str]]) -> None:
        """Write a header line then one JSON array per event.

        The header is ``{"schema": "tdxcore.events/1", "nr_events": N, "digest": "0x…",
        "kinds": {kind: {"fields": [...], "leaf_space": ...}}}``; each event line is
        ``[kind, actor, field, ...]`` with tuples as JSON arrays.
        """
        header = {
            "schema": SCHEMA,
            "nr_events": len(self._events),
            "digest": f"{self.digest():#018x}",
            "kinds": {k: {"fields": list(f), "leaf_space": s} for k, (f, s) in sorted(self._kinds.items())},
        }
        if isinstance(path_or_file, (str, os.PathLike)):
            with open(path_or_file, "w", encoding="utf-8") as fh:
                self._write(fh, header)
        elif isinstance(path_or_file, io.TextIOBase) or hasattr(path_or_file, "write"):
            self._write(path_or_file, header)
        else:
            msg = f"path_or_file={path_or_file!r} must be a path or a text file"
            raise TdxTypeError(msg, name="path_or_file", value=path_or_file)

    def _write(self, fh: IO[str], header: Dict[str, Any]) -> None:
        fh.write(json.dumps(header, sort_keys=True) + "\n")
        for ev in self._events:
            fh.write(json.dumps([_plain(x) for x in ev], separators=(",", ":")) + "\n")

    @classmethod
    def from_jsonl(cls, path_or_file: Union[str, "os.PathLike[str]", IO[str]]) -> "EventLog":
        """Read a file written by :meth:`to_jsonl`; the digest must match the header's.

        Raises
        ------
        TdxValueError
            Missing/unknown schema, a malformed line, an event count or digest mismatch.
        """
        if isinstance(path_or_file, (str, os.PathLike)):
            try:
                with open(path_or_file, encoding="utf-8") as fh:
                    lines = fh.read().splitlines()
            except UnicodeDecodeError as e:
                msg = f"events file is not UTF-8: {e}"
                raise TdxValueError(msg, name="path_or_file", value=path_or_file) from None
        else:
            lines = path_or_file.read().splitlines()
        if not lines:
            msg = "events file is empty (no header line)"
            raise TdxValueError(msg, name="path_or_file", value=path_or_file)
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError as e:
            msg = f"events header is not JSON: {e}"
            raise TdxValueError(msg, name="path_or_file", value=path_or_file) from None
        if not isinstance(header, dict) or header.get("schema") != SCHEMA:
            got = header.get("schema") if isinstance(header, dict) else header
            msg = f"events schema={got!r}, expected {SCHEMA!r}"
            raise TdxValueError(msg, name="schema", value=got)
        log = cls()
        try:
            for k, spec in header.get("kinds", {}).items():
                log.register_kind(k, tuple(spec["fields"]), spec["leaf_space"])
        except (AttributeError, KeyError, TypeError) as e:     # kinds not {kind: {fields, leaf_space}}
            msg = f"events header kinds are malformed: {type(e).__name__}: {e}"
            raise TdxValueError(msg, name="kinds", value=header.get("kinds")) from None
        for n, line in enumerate(lines[1:], start=2):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"events line {n} is not JSON: {e}"
                raise TdxValueError(msg, name="path_or_file", value=path_or_file) from None
            if not isinstance(row, list) or len(row) < 2:
                msg = f"events line {n} is not [kind, actor, ...]: {line[:80]!r}"
                raise TdxValueError(msg, name="path_or_file", value=path_or_file)
            ev = _tuples(row)
            log.emit(ev[0], ev[1], *ev[2:])
        if len(log) != header.get("nr_events"):
            msg = f"events file has {len(log)} events, header says {header.get('nr_events')}"
            raise TdxValueError(msg, name="nr_events", value=header.get("nr_events"))
        if f"{log.digest():#018x}" != header.get("digest"):
            msg = f"events digest {log.digest():#018x} does not match header {header.get('digest')}"
            raise TdxValueError(msg, name="digest", value=header.get("digest"))
        return log

    @classmethod
    def from_events(cls, events: List[Event]) -> "EventLog":
        """Build a log by emitting ``events`` in order (base kinds only)."""
        log = cls()
        for ev in events:
            log.emit(ev[0], ev[1], *ev[2:])
        return log


def _missing(name: str, event: Event) -> Any:
    msg = f"event kind {event[0]!r} has no field {name!r}"
    raise KeyError(msg)


def _plain(x: Any) -> Any:
    """JSON form: IntEnum/TdxStatus as plain int, tuples as lists."""
    if isinstance(x, tuple):
        return [_plain(y) for y in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    return int(x)


def _tuples(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_tuples(y) for y in x)
    if isinstance(x, float):
        msg = f"event field {x!r} is a float"
        raise TdxValueError(msg, name="fields", value=x)
    return x
