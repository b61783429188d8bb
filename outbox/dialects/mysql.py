"""MySQL 8 and MariaDB >= 10.6: LONGBLOB, DATETIME(6), INSERT IGNORE, SKIP LOCKED."""

from __future__ import annotations

from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Insert

from ..errors import UnsupportedDatabase
from .base import Dialect


class MySQLDialect(Dialect):
    name: ClassVar[str] = "mysql"
    supports_skip_locked: ClassVar[bool] = True
    supports_concurrent_relays: ClassVar[bool] = True

    @staticmethod
    def type_variants() -> dict[str, sa.types.TypeEngine[Any]]:
        return {
            "payload": mysql.LONGBLOB(),
            "json": mysql.JSON(),
            "timestamp": mysql.DATETIME(fsp=6),
        }

    def insert_ignore(self, table: sa.Table) -> Insert:
        return sa.insert(table).prefix_with("IGNORE")

    def lock_rows(self, select: sa.Select[Any]) -> sa.Select[Any]:
        return select.with_for_update(skip_locked=True)

    def lock_claim(self, select: sa.Select[Any], table: sa.Table) -> sa.Select[Any]:
        return select.with_for_update(skip_locked=True)

    def check_server(self, connection: Connection) -> None:
        info = connection.dialect.server_version_info or (0,)
        is_mariadb = bool(getattr(connection.dialect, "is_mariadb", False))
        needed = (10, 6) if is_mariadb else (8, 0, 1)
        if tuple(info[: len(needed)]) < needed:
            product = "MariaDB" if is_mariadb else "MySQL"
            have = ".".join(str(p) for p in info)
            raise UnsupportedDatabase(
                f"{product} {have} has no SELECT ... FOR UPDATE SKIP LOCKED; the relay needs "
                f"{product} >= {'.'.join(str(p) for p in needed)}"
            )
