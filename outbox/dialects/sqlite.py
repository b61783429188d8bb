"""SQLite: the embedded default. One relay at a time; claims take the write lock up front."""

from __future__ import annotations

from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Insert

from .base import Dialect


class SQLiteDialect(Dialect):
    name: ClassVar[str] = "sqlite"

    @staticmethod
    def type_variants() -> dict[str, sa.types.TypeEngine[Any]]:
        return {"payload": sqlite.BLOB(), "json": sqlite.JSON()}

    def insert_ignore(self, table: sa.Table) -> Insert:
        return sqlite.insert(table).on_conflict_do_nothing()

    def begin_claim(self, connection: Connection) -> None:
        # Nothing to lock row-by-row: SQLite serialises writers. The relay checks that it is
        # the only one through its lease (see SingleRelayOnly).
        return None
