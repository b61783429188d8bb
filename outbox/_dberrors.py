"""One place that says whether a database error is the database's trouble or one item's data.

- **transient** (:func:`is_transient`): the database is unreachable, restarting, overloaded, or a
  transaction lost a deadlock / lock wait. Nothing is wrong with the item: retry the whole unit of
  work with backoff, and do not count it against the item.
- **data error** (:func:`is_data_error`): the database refused *this item's values* (too long,
  out of range, NUL in text, an invalid character, a constraint). Retrying the same values can
  never work: the item is permanent trouble (dead-letter it, mark it dead) and the rest go on.
- anything else (a missing table, a syntax error, a bug): neither; the caller's own policy applies.

Classification is by exception class first, refined by the driver's error code where the class
is ambiguous (PyMySQL raises ``OperationalError`` for many codes, data codes included;
PostgreSQL's SQLSTATE class names the cause).
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["is_data_error", "is_transient"]

#: MySQL/MariaDB error codes caused by the values of one row.
MYSQL_DATA_CODES = frozenset({
    1048,  # column cannot be null
    1062,  # duplicate entry
    1264,  # out of range value
    1265,  # data truncated
    1292,  # incorrect datetime/value
    1366,  # incorrect string value (e.g. not valid in the column's charset)
    1406,  # data too long for column
    1451, 1452,  # foreign key constraint
    1690,  # value out of range
    3140,  # invalid JSON text
    4025,  # CHECK constraint failed (MariaDB)
})
#: MySQL/MariaDB error codes of a database in trouble (connection, server, locks).
MYSQL_TRANSIENT_CODES = frozenset({
    1040,  # too many connections
    1053,  # server shutdown in progress
    1205,  # lock wait timeout exceeded
    1213,  # deadlock found
    1927,  # connection was killed (MariaDB)
    2002, 2003, 2005, 2006, 2013, 2014, 2055,  # cannot connect / server has gone away / lost connection
    4031,  # disconnected by the server because of inactivity
})
#: PostgreSQL SQLSTATE classes / codes caused by one row's values.
PG_DATA_CLASSES = ("22", "23")  # data exception, integrity constraint violation
#: PostgreSQL SQLSTATE classes / codes of a database in trouble.
PG_TRANSIENT_CLASSES = ("08", "53", "57", "58")  # connection, resources, operator intervention, system
PG_TRANSIENT_CODES = frozenset({"40001", "40P01", "55P03", "55006"})  # serialization, deadlock, lock not available


def _driver_code(exc: sa.exc.DBAPIError) -> tuple[int | None, str | None]:
    """``(MySQL error number, PostgreSQL SQLSTATE)`` of the driver exception, where there is one."""
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    number: int | None = None
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        number = args[0]
    return number, sqlstate if isinstance(sqlstate, str) else None


def is_data_error(exc: BaseException) -> bool:
    """True when the database refused the values of the statement (permanent for that item)."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return False
    number, sqlstate = _driver_code(exc)
    if number is not None and number in MYSQL_DATA_CODES:
        return True
    if number is not None and number in MYSQL_TRANSIENT_CODES:
        return False
    if sqlstate is not None:
        return sqlstate.startswith(PG_DATA_CLASSES)
    return isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError))


def is_transient(exc: BaseException) -> bool:
    """True when the database (not the data) is in trouble: retry the unit of work with backoff."""
    if isinstance(exc, (sa.exc.DisconnectionError, sa.exc.TimeoutError, ConnectionError, TimeoutError)):
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if is_data_error(exc):
        return False
    number, sqlstate = _driver_code(exc)
    if number is not None and number in MYSQL_TRANSIENT_CODES:
        return True
    if sqlstate is not None and (sqlstate.startswith(PG_TRANSIENT_CLASSES) or sqlstate in PG_TRANSIENT_CODES):
        return True
    if isinstance(exc, sa.exc.OperationalError):
        # SQLite's "database is locked", a PyMySQL code not listed above, a psycopg connection
        # failure without SQLSTATE: the database's trouble, not the row's.
        if exc.orig is not None and "no such table" in str(exc.orig):
            return False  # SQLite reports a missing table as OperationalError: not going away by itself
        return True
    return isinstance(exc, sa.exc.InterfaceError)
