"""SQLite: the embedded default. One relay at a time; claims take the write lock up front."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import Insert

from .base import Dialect

log = logging.getLogger("outbox.relay")


class SQLiteDialect(Dialect):
    name: ClassVar[str] = "sqlite"

    @staticmethod
    def type_variants() -> dict[str, sa.types.TypeEngine[Any]]:
        return {"payload": sqlite.BLOB(), "json": sqlite.JSON(none_as_null=True)}

    # No idle_transaction_statements: there is no server to end a frozen relay's transaction. One
    # relay runs at a time (a standby waits for its row to expire); a relay frozen after its batch's
    # first write keeps SQLite's write lock until it wakes or dies, before that only a WAL snapshot.

    def insert_ignore(self, table: sa.Table) -> Insert:
        return sqlite.insert(table).on_conflict_do_nothing()

    def prepare_relay_engine(self, engine: Engine) -> Engine:
        # WAL lets the application keep committing while the relay's transaction is open.
        # Nothing is locked row by row: SQLite serialises writers, and the relay refuses to
        # start next to another relay (SingleRelayOnly).
        if engine.url.database in (None, "", ":memory:"):
            return engine
        try:
            with engine.connect() as conn:
                mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
                if str(mode).lower() != "wal":
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        except sa.exc.OperationalError as exc:  # busy: keep the rollback journal, say what it costs
            log.warning("could not switch SQLite to WAL mode (%s); writers may wait while the relay publishes", exc)
        return engine

    def ensure_transaction(self, connection: Connection) -> None:
        # pysqlite (legacy transaction control) only sends BEGIN before INSERT/UPDATE/DELETE, so a
        # SAVEPOINT issued first would open the transaction and its RELEASE would commit it.
        # aiosqlite behaves the same; SQLAlchemy's adapter keeps the aiosqlite connection in ``_connection``.
        dbapi_connection = connection.connection.dbapi_connection
        if dbapi_connection is None:
            return
        began = getattr(dbapi_connection, "in_transaction", None)
        if began is None:
            began = getattr(getattr(dbapi_connection, "_connection", None), "in_transaction", True)
        if not began:
            connection.exec_driver_sql("BEGIN")
