"""Database errors the toolkit can explain, translated where SQLAlchemy raises them.

:func:`explain_errors` registers (once per engine) a ``handle_error`` listener that turns

- a missing toolkit table (a forgotten ``outbox db upgrade``) into :class:`~outbox.errors.SchemaMissing`,
  on PostgreSQL (``relation ... does not exist``), MySQL/MariaDB (error 1146) and SQLite
  (``no such table``);
- a duplicate ``message_id`` in an outbox table into :class:`~outbox.errors.InvalidMessageId`;
- MySQL/MariaDB error 1366 (text the column's character set cannot hold: an outbox table that is not
  utf8mb4) into the ``MessageError`` of that field, saying how to convert the column. Only that
  column: ``ALTER TABLE ... CONVERT TO CHARACTER SET`` would also reset the id and key columns'
  binary collation (see :class:`~outbox.types.ExactString`) and bring back the case-folding loss.

Both are raised in place of SQLAlchemy's exception and chained to the driver's (``__cause__``).
Only errors about the toolkit's own tables are touched; every other error passes unchanged.
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Engine

from ._redact import mask_secrets
from .errors import InvalidHeaders, InvalidKey, InvalidMessageId, InvalidTopic, MessageError, SchemaMissing
from .schema import DEFAULT_TABLE_NAMES, default_tables
from .types import ExactString

__all__ = [
    "ADDED_COLUMNS", "explain_errors", "known_table", "missing_column", "missing_column_error", "missing_table",
]

_MISSING = (
    # PostgreSQL ('column "c" of relation "t" does not exist' is a missing column, not a table)
    re.compile(r'(?<!of )relation "(?:[^"]+\.)?(?P<name>[^".]+)" does not exist'),
    re.compile(r"Table '(?:[^'.]+\.)?(?P<name>[^'.]+)' doesn't exist"),  # MySQL / MariaDB 1146
    re.compile(r"no such table: (?:\w+\.)?(?P<name>\w+)"),  # SQLite
)
#: a column the code uses that the database lacks: it is at an older revision of the toolkit's schema
_MISSING_COLUMN = (
    re.compile(r'column "(?P<column>\w+)" of relation "(?P<table>\w+)" does not exist'),  # PostgreSQL INSERT
    re.compile(r'column (?:"?\w+"?\.)?"?(?P<table>\w+)"?\."?(?P<column>\w+)"? does not exist'),  # PostgreSQL
    re.compile(r"Unknown column '(?:(?P<table>\w+)\.)?(?P<column>\w+)' in"),  # MySQL / MariaDB 1054
    re.compile(r"table (?:\w+\.)?(?P<table>\w+) has no column named (?P<column>\w+)"),  # SQLite INSERT
    re.compile(r"no such column: (?:(?P<table>\w+)\.)?(?P<column>\w+)"),  # SQLite SELECT
)
#: columns added after the first revision, and the revision that adds each
ADDED_COLUMNS = {"attributes": "0004_attributes"}
_UNIQUE_SQLITE = re.compile(r"UNIQUE constraint failed: (?P<name>\w+)\.message_id")
_UNIQUE_NAMED = re.compile(r"uq_(?P<name>\w+?)_message_id")
_PG_KEY = re.compile(r"Key \(message_id\)=\((?P<id>[^)]+)\)")
_MY_KEY = re.compile(r"Duplicate entry '(?P<id>[^']+)'")
_CHARSET = re.compile(r"Incorrect string value: '(?P<value>[^']*)' for column (?P<where>\S+) at row")
_INSERT_INTO = re.compile(r"INSERT INTO [`\"]?(?:\w+[`\"]?\.[`\"]?)?(?P<name>\w+)", re.I)
_FIELD_ERRORS: dict[str, type[MessageError]] = {
    "topic": InvalidTopic, "key": InvalidKey, "headers": InvalidHeaders, "content_type": InvalidHeaders,
}

_lock = threading.Lock()
_tables: set[str] = set()  # toolkit table names (any configured OutboxTables)
_outboxes: set[str] = set()  # of which outbox tables (they carry the unique message_id)
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def known_table(name: str, *, outbox: bool = False) -> None:
    """Teach the translator a toolkit table name (the writer does this for its tables)."""
    with _lock:
        _tables.add(name)
        if outbox:
            _outboxes.add(name)


for _name in DEFAULT_TABLE_NAMES.all():  # known without an Outbox (the CLI, consumers)
    known_table(_name, outbox=_name == DEFAULT_TABLE_NAMES.outbox)


def explain_errors(engine: Engine) -> None:
    """Register the translating ``handle_error`` listener on ``engine`` (idempotent, cheap)."""
    if engine in _engines:
        return
    with _lock:
        if engine in _engines:
            return
        event.listen(engine, "handle_error", _translate)
        _engines.add(engine)


def _db_label(ctx: Any) -> str:
    engine = getattr(ctx, "engine", None)
    if engine is None:
        return "the database"
    return mask_secrets(engine.url.render_as_string(hide_password=True))


def missing_table(text: str) -> str | None:
    """The table a driver's error text says does not exist (PostgreSQL, MySQL/MariaDB, SQLite), if it says so."""
    for pattern in _MISSING:
        m = pattern.search(text)
        if m:
            return m.group("name")
    return None


def _translate(ctx: Any) -> None:
    original = ctx.original_exception
    text = str(original)
    _missing_column(ctx, text)  # first: PostgreSQL's 'column "c" of relation "t" does not exist' names a table
    name = missing_table(text)
    if name is not None and name in _tables:
        raise SchemaMissing(
            f"the toolkit's table {name!r} does not exist in {_db_label(ctx)}: "
            "run `outbox db upgrade --db URL` (or outbox.migrations.upgrade(engine)) first"
        )
    m = _CHARSET.search(text)
    if m:
        _charset(ctx, m)
    if "message_id" not in text and "uq_" not in text:
        return
    m = _UNIQUE_SQLITE.search(text) or _UNIQUE_NAMED.search(text)
    if not m or m.group("name") not in _outboxes:
        return
    key = _PG_KEY.search(text) or _MY_KEY.search(text)
    if key:
        which = f"message_id {key.group('id')}"
    else:  # SQLite does not say which value; a one-row INSERT does
        params = getattr(getattr(ctx, "execution_context", None), "compiled_parameters", None) or []
        one = params[0].get("message_id") if len(params) == 1 else None
        which = f"message_id {one}" if one is not None else "a message_id in this flush"
    raise InvalidMessageId(
        f"{which} is already in the outbox table {m.group('name')!r} (committed earlier): "
        "every message needs its own id (roll the session back and retry with a new one)"
    )


def missing_column_error(table: str, column: str, where: str) -> SchemaMissing:
    """The error for a toolkit column the database lacks (a forgotten ``outbox db upgrade``)."""
    revision = ADDED_COLUMNS.get(column)
    since = f" (it comes with revision {revision})" if revision else ""
    return SchemaMissing(
        f"the column {table}.{column} does not exist in {where}: the database is at an older revision of the "
        f"toolkit's schema{since}; run `outbox db upgrade --db URL` (or outbox.migrations.upgrade(engine)) first"
    )


def missing_column(text: str) -> tuple[str | None, str] | None:
    """``(table or None, column)`` when a driver's error text says a column added by a later revision of the
    toolkit's schema (:data:`ADDED_COLUMNS`) does not exist; MySQL may name only the column."""
    if not any(c in text for c in ADDED_COLUMNS):
        return None
    for pattern in _MISSING_COLUMN:
        m = pattern.search(text)
        if m and m.group("column") in ADDED_COLUMNS:
            return m.group("table"), m.group("column")
    return None


def _missing_column(ctx: Any, text: str) -> None:
    found = missing_column(text)
    if found is None:
        return
    table, column = found
    if table is None:
        into = _INSERT_INTO.search(getattr(ctx, "statement", None) or "")
        table = into.group("name") if into else None
    if table is not None and table in _outboxes:
        raise missing_column_error(table, column, _db_label(ctx))


def _charset(ctx: Any, m: re.Match[str]) -> None:
    parts = [p.strip("`'\"") for p in m.group("where").split(".")]
    column = parts[-1]
    if len(parts) >= 2:
        table = parts[-2]
    else:  # MySQL names only the column
        into = _INSERT_INTO.search(getattr(ctx, "statement", None) or "")
        table = into.group("name") if into else ""
    if table not in _outboxes:
        return
    error = _FIELD_ERRORS.get(column, MessageError)
    value = m.group("value").replace("\\\\", "\\")
    raise error(
        f"the {column} {value} cannot be stored: the character set of {table}.{column} is not utf8mb4. "
        f"Convert the column once ({_utf8mb4_column(table, column)}) and create databases "
        "with CHARACTER SET utf8mb4 (then roll the session back and retry)"
    )


def _utf8mb4_column(table: str, column: str) -> str:
    """The ``ALTER TABLE ... MODIFY`` that makes one outbox column utf8mb4, its definition otherwise kept."""
    col = default_tables().outbox.c.get(column)
    if col is not None and isinstance(col.type, ExactString):  # utf8mb4 since revision 0003_exact_ids
        return "run `outbox db upgrade --db URL`: it makes this column utf8mb4"
    if col is None or not isinstance(col.type, sa.String):  # pragma: no cover - only text columns raise 1366
        return f"ALTER TABLE {table} MODIFY {column} ... CHARACTER SET utf8mb4"
    copy = col._copy()
    copy.type = mysql.VARCHAR(col.type.length, charset="utf8mb4")
    spec = sa.schema.CreateColumn(copy).compile(dialect=mysql.dialect())
    return f"ALTER TABLE {table} MODIFY {spec}"
