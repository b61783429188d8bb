"""Which database errors a retry can fix, and which are permanent for the rows involved.

One place decides, for every dialect: connection loss, timeouts, deadlocks, lock wait timeouts and
serialization failures are **transient** (back off, reconnect, try again); data errors (value
too long, numeric overflow, a malformed value, a constraint or a trigger refusing the row) are
**permanent** for the rows in the statement: retrying the same statement fails the same way, so
the relay isolates those rows instead of retrying the whole batch. The database-specific error
codes live in each dialect (:meth:`outbox.dialects.Dialect.error_kind`).
"""

from __future__ import annotations

import enum

import sqlalchemy as sa

from .dialects.base import Dialect

__all__ = ["ErrorKind", "classify_db_error", "is_permanent"]


class ErrorKind(enum.Enum):
    TRANSIENT = "transient"
    """An outage or a conflict with another transaction: back off and try again."""
    PERMANENT = "permanent"
    """The statement's rows are at fault: the same statement will fail again."""


def classify_db_error(exc: BaseException, dialect: Dialect) -> ErrorKind:
    """Classify a database error raised through SQLAlchemy. Unknown errors count as transient."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return ErrorKind.TRANSIENT  # pool timeouts, and anything else that is not about rows
    if exc.connection_invalidated:
        return ErrorKind.TRANSIENT
    kind = dialect.error_kind(exc)
    if kind is not None:
        return ErrorKind(kind)
    if isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError)):
        return ErrorKind.PERMANENT
    return ErrorKind.TRANSIENT


def is_permanent(exc: BaseException, dialect: Dialect) -> bool:
    return classify_db_error(exc, dialect) is ErrorKind.PERMANENT
