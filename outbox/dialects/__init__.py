"""Everything that differs between databases, one module per dialect.

:func:`dialect_for` picks the module from ``engine.dialect.name``; nothing else in the
toolkit branches on the database.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedDatabase
from .base import Dialect


def dialect_for(bind: Any) -> Dialect:
    """Return the :class:`Dialect` for an engine, connection, session or dialect name."""
    name = bind if isinstance(bind, str) else _name_of(bind)
    if name == "postgresql":
        from .postgresql import PostgreSQLDialect

        return PostgreSQLDialect()
    if name in ("mysql", "mariadb"):
        from .mysql import MySQLDialect

        return MySQLDialect()
    if name == "sqlite":
        from .sqlite import SQLiteDialect

        return SQLiteDialect()
    raise UnsupportedDatabase(
        f"database dialect {name!r} is not supported: use PostgreSQL, MySQL 8 / MariaDB >= 10.6 or SQLite"
    )


def _name_of(bind: Any) -> str:
    dialect = getattr(bind, "dialect", None)
    if dialect is None and hasattr(bind, "get_bind"):
        dialect = bind.get_bind().dialect
    if dialect is None:
        dialect = bind
    return str(dialect.name)


__all__ = ["Dialect", "dialect_for"]
