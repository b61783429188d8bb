"""SQLite: the embedded default. One relay at a time; claims take the write lock up front."""

from __future__ import annotations

from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Insert

from .base import Dialect


class SQLiteDialect(Dialect):
    name: ClassVar[str] = "sqlite"

    @staticmethod
    def type_variants() -> dict[str, sa.types.TypeEngine[Any]]:
        return {"payload": sqlite.BLOB(), "json": sqlite.JSON()}

    def insert_ignore(self, table: sa.Table) -> Insert:
        return sqlite.insert(table).on_conflict_do_nothing()

    def prepare_relay_engine(self, engine: Engine) -> None:
        # WAL lets the application keep committing while the relay's transaction is open.
        # Nothing is locked row by row: SQLite serialises writers, and the relay refuses to
        # start next to another relay (SingleRelayOnly).
        if engine.url.database in (None, "", ":memory:"):
            return
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
