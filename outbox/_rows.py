"""Decoding a claimed outbox row into an :class:`~outbox.message.OutboxRecord`, or a reason it cannot be.

Rows are written by :class:`~outbox.Outbox`, which validates everything, but a person with a SQL
prompt or a bad migration can leave anything in the table. The relay and the broker adapters rely
on a record's fields having their declared types, so every claimed row goes through
:func:`decode_row` first: a row that fails is marked ``dead`` with the returned reason, in the
claim's transaction, and never reaches a publisher.

The columns that SQLAlchemy would convert on the way out (``message_id``, ``payload``,
``headers``) are read raw (see :func:`claim_columns`), so one undecodable value fails its own row
here, not the whole claim inside the driver's result processing; ``created_at`` is read as the
dialect says (:meth:`~outbox.dialects.base.Dialect.claim_timestamp`) for the same reason.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from .message import NO_ATTRIBUTES, OutboxRecord, claimed_record
from .schema import KEY_LENGTH, TOPIC_LENGTH

__all__ = [
    "KNOWN_STATUSES", "MAX_ATTEMPTS_VALUE", "MAX_PARTITION", "ROW_ID", "ROW_KEY", "ROW_PARTITION", "ROW_TOPIC",
    "RowError", "claim_columns", "decode_row", "overdue_rows", "unclaimable_rows",
]

#: largest ``attempts`` the relay can still count up from (the column is a 32-bit INTEGER)
MAX_ATTEMPTS_VALUE = 2**31 - 2
#: largest partition a SMALLINT column holds (writers use 1..32767 partitions)
MAX_PARTITION = 32767

CONTENT_TYPE_LENGTH = 127
#: keys of at most this many characters are within KEY_LENGTH UTF-8 bytes whatever they hold (4 bytes a character)
_SHORT_KEY = KEY_LENGTH // 4
_RAW = ("message_id", "payload", "headers", "created_at", "attributes")
_COLUMNS = ("id", "message_id", "topic", "key", "payload", "headers", "content_type", "partition", "attempts",
            "created_at", "attributes", "created_at_text")
#: read only when present (an object with the column names as attributes may lack them)
_OPTIONAL = ("created_at", "attributes", "created_at_text")
#: positions in a claimed row (the claim's columns are in _COLUMNS order)
ROW_ID, ROW_TOPIC, ROW_KEY, ROW_PARTITION = 0, 2, 3, 7
_UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)
#: IANA names of zones that are UTC at every instant, and the zone objects seen with one of them
_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu"})
_UTC_ZONES: set[dt.tzinfo] = set()
#: bounds of one attribute value (the writer's limit; a hand-made row over it is refused here)
ATTRIBUTE_LENGTH = 2048


class RowError(ValueError):
    """A claimed row whose values the relay cannot use; ``str()`` is the reason stored in ``last_error``."""


def claim_columns(
    table: sa.Table,
    timestamp: Callable[[sa.ColumnElement[Any]], tuple[sa.ColumnElement[Any], sa.ColumnElement[Any]]] | None = None,
) -> list[sa.ColumnElement[Any]]:
    """The columns a claim reads, in :func:`decode_row`'s order; converting types are read raw.

    ``timestamp``: how the dialect reads ``created_at`` so that no stored value fails the driver
    (:meth:`~outbox.dialects.base.Dialect.claim_timestamp`: the value, or its text where the driver
    would fail on it); raw, with no text column, by default.
    """
    cols: list[sa.ColumnElement[Any]] = []
    created = table.c.created_at
    value, text = (sa.type_coerce(created, sa.types.NullType()), sa.null()) if timestamp is None else timestamp(created)
    for n in _COLUMNS:
        if n == "created_at":
            cols.append(value.label(n))
        elif n == "created_at_text":
            cols.append(text.label(n))
        elif n in _RAW:
            cols.append(sa.type_coerce(table.c[n], sa.types.NullType()).label(n))
        else:
            cols.append(table.c[n])
    return cols


def decode_row(row: Any, *, json_as_text: bool) -> OutboxRecord:
    """Build the record for one claimed row, or raise :class:`RowError` naming the row and the problem.

    ``json_as_text``: the driver hands JSON columns over as text (SQLite, MySQL/MariaDB), rather
    than already parsed (psycopg).

    Every claimed row comes through here, so each field takes the checks the writer's own rows
    pass with a few type and length tests, and only a value that fails them goes through the
    full check that names the problem (the same rules either way).
    """
    try:
        rid, mid, topic, key, payload, headers, ctype, part, attempts, created, attrs, created_text = row  # _COLUMNS
    except TypeError:  # an object with the column names as attributes (the _OPTIONAL ones may be absent)
        rid, mid, topic, key, payload, headers, ctype, part, attempts, created, attrs, created_text = (
            getattr(row, n) if n not in _OPTIONAL else getattr(row, n, None) for n in _COLUMNS)
    try:
        if type(mid) is not uuid.UUID:
            mid = _message_id(mid)
        if type(topic) is not str or not topic or len(topic) > TOPIC_LENGTH or "\x00" in topic or topic.isspace():
            topic = _topic(topic)
        if key is not None and (type(key) is not str or not key or len(key) > _SHORT_KEY):
            key = _key(key)  # (a str of at most _SHORT_KEY characters is at most KEY_LENGTH UTF-8 bytes)
        if type(payload) is not bytes:
            payload = _payload(payload)
        headers = {} if headers is None else _headers(headers, json_as_text)
        if ctype is not None and (type(ctype) is not str or len(ctype) > CONTENT_TYPE_LENGTH):
            ctype = _optional_text("content_type", ctype, CONTENT_TYPE_LENGTH)
        if type(part) is not int or not 0 <= part <= MAX_PARTITION:
            part = _int("partition", part, 0, MAX_PARTITION)
        if type(attempts) is not int or not 0 <= attempts <= MAX_ATTEMPTS_VALUE:
            attempts = _int("attempts", attempts, 0, MAX_ATTEMPTS_VALUE)
        attrs = NO_ATTRIBUTES if attrs is None else _attributes(attrs, json_as_text)
        created = _created_at(created if created_text is None else created_text)
    except RowError as exc:
        raise RowError(f"row {rid}: {exc}") from None
    return claimed_record(rid, mid, topic, key, payload, headers, ctype, part, attempts, created, attrs)


def _created_at(value: Any) -> dt.datetime | None:
    """The row's ``created_at`` as an aware UTC datetime (the broker timestamp), ``None`` if absent.

    Read raw (PostgreSQL: the timestamp, or ISO text near and past the ends of what a datetime
    holds, see :meth:`~outbox.dialects.base.Dialect.claim_timestamp`): a hand-made value no datetime
    holds (PostgreSQL's ``'infinity'``, year 10000, BC, MariaDB's zero date) raises
    :class:`RowError` naming it, so its row alone is refused, never the claim.
    """
    if type(value) is dt.datetime:
        tz = value.tzinfo
        if tz is _UTC or tz in _UTC_ZONES:  # already UTC (psycopg hands over the session's zone, often UTC)
            return value
        if tz is None:
            return value.replace(tzinfo=_UTC)
        if getattr(tz, "key", None) in _UTC_NAMES:
            _UTC_ZONES.add(tz)
            return value
        return value.astimezone(_UTC)
    if type(value) is int:  # microseconds since 1970 (MySQL/MariaDB's claim, see its claim_timestamp)
        try:
            return _EPOCH + dt.timedelta(microseconds=value)
        except OverflowError:
            raise RowError(f"created_at must be a date and time between the years 1 and 9999, got {value} "
                           "microseconds from 1970; set it to a real time (or delete the row)") from None
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        try:
            parsed = dt.datetime.fromisoformat(value.decode("ascii") if isinstance(value, bytes) else value)
        except (ValueError, UnicodeDecodeError):
            raise RowError(f"created_at must be a date and time between the years 1 and 9999, got "
                           f"{_short_repr(value)}; set it to a real time (or delete the row)") from None
        return parsed.replace(tzinfo=_UTC) if parsed.tzinfo is None else parsed.astimezone(_UTC)
    raise RowError(f"created_at must be a date and time, got {_kind(value)}")


def _kind(value: Any) -> str:
    """How a value reads to someone who wrote it with SQL or JSON."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "a JSON boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "binary data"
    return type(value).__name__


def _json_kind(value: Any) -> str:
    if value is None:
        return "JSON null"
    if isinstance(value, str):
        return "a JSON string"
    if isinstance(value, list):
        return "a JSON array"
    if isinstance(value, bool):
        return "a JSON boolean"
    if isinstance(value, (int, float)):
        return "a JSON number"
    if isinstance(value, dict):
        return "a JSON object"
    return type(value).__name__


def _message_id(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise RowError("message_id must be a UUID, got binary data") from None
    if isinstance(value, str):
        try:
            return uuid.UUID(value.strip())
        except ValueError:
            pass
    raise RowError(f"message_id must be a UUID, got {_short_repr(value)}")


def _topic(value: Any) -> str:
    if not isinstance(value, str):
        raise RowError(f"topic must be non-empty text, got {_kind(value)}")
    if not value.strip():
        raise RowError("topic must be non-empty text, got an empty topic")
    if "\x00" in value:
        raise RowError("topic must not contain NUL characters")
    if len(value) > TOPIC_LENGTH:
        raise RowError(f"topic must be at most {TOPIC_LENGTH} characters, got {len(value)}")
    return value


def _key(value: Any) -> str | None:
    key = _optional_text("key", value)
    if key is not None and not 1 <= len(key.encode("utf-8")) <= KEY_LENGTH:
        raise RowError(f"key must be NULL or 1-{KEY_LENGTH} UTF-8 bytes, got {len(key.encode('utf-8'))} bytes")
    return key


def _optional_text(name: str, value: Any, limit: int | None = None) -> str | None:
    if value is not None and not isinstance(value, str):
        raise RowError(f"{name} must be text or NULL, got {_kind(value)}")
    if value is not None and limit is not None and len(value) > limit:
        raise RowError(f"{name} must be at most {limit} characters, got {len(value)}")
    return value


def _payload(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise RowError(f"payload must be binary data, got {_kind(value)}")


def _headers(value: Any, json_as_text: bool) -> dict[str, str]:
    value = _string_object(value, json_as_text, "headers", "header ", "header name")
    return {} if value is None else value


def _attributes(value: Any, json_as_text: bool) -> Mapping[str, str]:
    value = _string_object(value, json_as_text, "attributes", "", "name")
    if not value:
        return NO_ATTRIBUTES
    for k, v in value.items():
        if len(v) > ATTRIBUTE_LENGTH or "\x00" in v:
            raise RowError(f"attribute {_short_repr(k)} must be at most {ATTRIBUTE_LENGTH} characters without NUL")
    return value


def _string_object(value: Any, json_as_text: bool, what: str, item: str, name: str) -> dict[str, str] | None:
    """A column holding a JSON object of strings (``headers``, ``attributes``), ``None`` for SQL NULL / JSON null;
    anything else raises :class:`RowError` naming ``what``, and the ``item`` (prefix) or ``name`` at fault."""
    if json_as_text and isinstance(value, (str, bytes, bytearray)):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise RowError(f"{what} must be a JSON object of strings, got invalid JSON ({exc})") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RowError(f"{what} must be a JSON object of strings, got {_json_kind(value)}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise RowError(f"{what} must be a JSON object of strings, got {_json_kind(v)} for {item}"
                           f"{_short_repr(k)}")
        if not k:
            raise RowError(f"{what} must be a JSON object of strings, got an empty {name}")
    return value


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowError(f"{name} must be an integer between {lo} and {hi}, got {_kind(value)}")
    if not lo <= value <= hi:
        raise RowError(f"{name} must be an integer between {lo} and {hi}, got {value}")
    return value


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ rows no claim can ever reach

#: statuses the toolkit writes; anything else is a hand edit or a bad migration
KNOWN_STATUSES = ("dead", "pending", "published")


#: later than any time a writer sets (``deliver_at`` ends at 9999-12-31 23:59:59 UTC): PostgreSQL's
#: ``'infinity'`` and years from 10000, or (SQLite) text that sorts after every time
_LAST = dt.datetime.max.replace(tzinfo=_UTC)


def unclaimable_rows(
    conn: Any, table: sa.Table, held: list[int], partition_count: int, limit: int = 1000,
    timestamp: Callable[[sa.ColumnElement[Any]], sa.ColumnElement[Any]] | None = None,
) -> list[tuple[int, dict[str, Any], str]]:
    """Rows no relay will ever claim: ``(id, the values they were found with, the reason)``.

    - rows not dead or published whose partition no writer can produce (below 0, above 32767), so no
      lease will ever cover it. A partition from ``partition_count`` up to 32767 is not one of them:
      a writer may use more partitions than the relays know yet, and the relays extend their
      leases to it (:meth:`~outbox.leases.LeaseManager.ensure_partitions`), so its rows are claimed;
    - rows of the ``held`` partitions with a status the toolkit does not know;
    - pending rows of the ``held`` partitions whose ``available_at`` is after any time a writer
      sets (a hand-written ``'infinity'``): never due, and under strict ordering, if tried, holding
      back their key for good. ``timestamp`` reads the value for the reason (see :func:`claim_columns`).

    A found row's values are conditions to mark it with (``column == value``, or an SQL
    condition where the value is one), so an operator's fix in between is not overwritten.

    Every query is a range read of the claim index (partition, status, ...): the partition
    ranges below 0 and from ``partition_count``, and the four status ranges around the known
    statuses, so an unknown status is found under any collation without a table scan.
    """
    o = table
    found: list[tuple[int, dict[str, Any], str]] = []
    top = partition_count - 1
    out_of_range = (
        sa.select(o.c.id, o.c.partition, o.c.status)
        .where(sa.or_(o.c.partition < 0, o.c.partition > MAX_PARTITION), o.c.status.not_in(("dead", "published")))
        .limit(limit)
    )
    for rid, part, status in conn.execute(out_of_range):
        also = "" if status == "pending" else f" (and its status {status!r} is unknown)"
        found.append((rid, {"partition": part, "status": status},
                      f"row {rid}: partition {part} is out of range 0..{top}, so no relay can claim it{also}; "
                      "`outbox dead requeue` gives it the partition of its key"))
    if held:
        a, b, c = sorted(KNOWN_STATUSES)
        ranges = [o.c.status < a, sa.and_(o.c.status > a, o.c.status < b), sa.and_(o.c.status > b, o.c.status < c),
                  o.c.status > c]
        for cond in ranges:
            if len(found) >= limit:
                break
            q = sa.select(o.c.id, o.c.status).where(o.c.partition.in_(held), cond).limit(limit - len(found))
            for rid, status in conn.execute(q):
                found.append((rid, {"status": status},
                              f"row {rid}: unknown status {status!r} (only 'pending' rows are sent); "
                              "fix the row, or `outbox dead requeue` it"))
    if held and len(found) < limit:
        at = o.c.available_at
        shown = (timestamp or (lambda c: sa.type_coerce(c, sa.types.NullType())))(at).label("available_at")
        q = (sa.select(o.c.id, shown).where(o.c.partition.in_(held), o.c.status == "pending", at > _LAST)
             .limit(limit - len(found)))
        for rid, value in conn.execute(q):
            found.append((rid, {"status": "pending", "available_at": at > _LAST},
                          f"row {rid}: available_at {_short_repr(value)} is never reached, so no relay will "
                          "send it (nor, under strict ordering, if it was tried, the later rows of its key); "
                          "set it to a real time, or `outbox dead requeue` it"))
    return found


def overdue_rows(conn: Any, table: sa.Table, held: list[int], due: dt.datetime, limit: int = 1000) -> list[int]:
    """Pending rows of the ``held`` partitions with an ``available_at`` before ``due`` (the due-now
    mark, 1970): a hand-written old time (``'-infinity'``, 1960) that neither the promotion of
    delayed rows (after the mark) nor the claim (at it) ever reaches. They are long due: the relay
    sets them to the mark."""
    o = table
    q = (sa.select(o.c.id).where(o.c.partition.in_(held), o.c.status == "pending", o.c.available_at < due)
         .limit(limit))
    return [rid for (rid,) in conn.execute(q)]
