"""PostgreSQL: BYTEA, JSONB, native UUID, timestamptz, SKIP LOCKED and LISTEN/NOTIFY."""

from __future__ import annotations

from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Insert

from .base import Dialect


class PostgreSQLDialect(Dialect):
    name: ClassVar[str] = "postgresql"
    supports_skip_locked: ClassVar[bool] = True
    supports_concurrent_relays: ClassVar[bool] = True
    supports_notify: ClassVar[bool] = True

    @staticmethod
    def type_variants() -> dict[str, sa.types.TypeEngine[Any]]:
        return {
            "payload": pg.BYTEA(),
            "json": pg.JSONB(),
            "uuid": pg.UUID(as_uuid=True),
            "timestamp": pg.TIMESTAMP(timezone=True),
        }

    def insert_ignore(self, table: sa.Table) -> Insert:
        return pg.insert(table).on_conflict_do_nothing()

    def lock_rows(self, select: sa.Select[Any]) -> sa.Select[Any]:
        return select.with_for_update(skip_locked=True)

    def notify(self, connection: Connection, channel: str) -> None:
        connection.execute(sa.select(sa.func.pg_notify(channel, "")))
