"""Which database errors a retry can fix, and which are permanent for the rows involved.

One place decides, for the relay and the consumers alike:

- **transient**: the database is unreachable, restarting or overloaded, or a transaction lost a
  deadlock / lock wait / serialization conflict. Nothing is wrong with the rows: back off,
  reconnect, retry the whole unit of work, and count nothing against the rows.
- **permanent** (a *data error*): the database refused the statement's own values (value too
  long, numeric overflow, NUL in text, an invalid character, a constraint or a trigger refusing
  the row). The same statement fails the same way every time: isolate those rows (mark them dead,
  dead-letter the message) and let everything else go on.

The database-specific error codes live in each dialect (:meth:`outbox.dialects.Dialect.error_kind`);
the dialect is taken from the caller or, where the caller has none (the consumers), from the
driver that raised the error.
"""

from __future__ import annotations

import enum

import sqlalchemy as sa

from .dialects import dialect_for
from .dialects.base import Dialect

__all__ = ["ErrorKind", "classify_db_error", "is_data_error", "is_permanent", "is_transient"]


class ErrorKind(enum.Enum):
    TRANSIENT = "transient"
    """An outage or a conflict with another transaction: back off and try again."""
    PERMANENT = "permanent"
    """The statement's rows are at fault: the same statement will fail again."""


#: top-level module of a DB-API driver -> the toolkit's dialect name
_DRIVER_DIALECTS = {
    "psycopg": "postgresql", "psycopg2": "postgresql", "asyncpg": "postgresql", "pg8000": "postgresql",
    "pymysql": "mysql", "MySQLdb": "mysql", "mysql": "mysql", "aiomysql": "mysql", "asyncmy": "mysql",
    "sqlite3": "sqlite", "aiosqlite": "sqlite",
}


def _dialect_of(exc: sa.exc.DBAPIError) -> Dialect | None:
    module = type(exc.orig).__module__.split(".", 1)[0] if exc.orig is not None else ""
    name = _DRIVER_DIALECTS.get(module)
    if name is None:  # a driver we do not know by name: go by the shape of its error
        args = getattr(exc.orig, "args", ())
        if isinstance(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None), str):
            name = "postgresql"
        elif args and isinstance(args[0], int) and not isinstance(args[0], bool):
            name = "mysql"
    return dialect_for(name) if name is not None else None


def _kind(exc: sa.exc.DBAPIError, dialect: Dialect | None) -> ErrorKind | None:
    """What the driver's own error code says, or the exception class where it is unambiguous."""
    if exc.connection_invalidated:
        return ErrorKind.TRANSIENT
    dialect = dialect if dialect is not None else _dialect_of(exc)
    kind = dialect.error_kind(exc) if dialect is not None else None
    if kind is not None:
        return ErrorKind(kind)
    if isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError)):
        return ErrorKind.PERMANENT
    return None


def classify_db_error(exc: BaseException, dialect: Dialect | None = None) -> ErrorKind:
    """Classify an error raised through SQLAlchemy for the relay. Unknown errors count as transient
    (the relay backs off and tries again rather than dropping rows it cannot judge)."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return ErrorKind.TRANSIENT  # pool timeouts, and anything else that is not about rows
    return _kind(exc, dialect) or ErrorKind.TRANSIENT


def is_permanent(exc: BaseException, dialect: Dialect | None = None) -> bool:
    return classify_db_error(exc, dialect) is ErrorKind.PERMANENT


def is_data_error(exc: BaseException) -> bool:
    """True when the database refused the values of the statement (permanent for that item)."""
    return isinstance(exc, sa.exc.DBAPIError) and _kind(exc, None) is ErrorKind.PERMANENT


def is_transient(exc: BaseException) -> bool:
    """True when the database (not the data) is in trouble: retry the unit of work with backoff.

    Neither this nor :func:`is_data_error` holds for a missing table, a syntax error or a bug: the
    caller's own policy applies to those.
    """
    if isinstance(exc, (sa.exc.DisconnectionError, sa.exc.TimeoutError, ConnectionError, TimeoutError)):
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    kind = _kind(exc, None)
    if kind is not None:
        return kind is ErrorKind.TRANSIENT
    if isinstance(exc, sa.exc.OperationalError):
        # SQLite's "database is locked", a driver code not listed, a connection failure without a
        # code: the database's trouble, not the row's; but SQLite reports a missing table as
        # OperationalError, and that does not go away by itself.
        return not (exc.orig is not None and "no such table" in str(exc.orig))
    return isinstance(exc, sa.exc.InterfaceError)
