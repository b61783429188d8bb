"""MySQL 8 and MariaDB >= 10.6: LONGBLOB, DATETIME(6), INSERT IGNORE, SKIP LOCKED."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import Insert

from ..errors import UnsupportedDatabase
from .base import Dialect

_IDS = "JSON_TABLE(:ids, '$[*]' COLUMNS (id BIGINT PATH '$')) AS d"


class MySQLDialect(Dialect):
    name: ClassVar[str] = "mysql"
    supports_skip_locked: ClassVar[bool] = True
    supports_concurrent_relays: ClassVar[bool] = True
    skip_locked_reaches_neighbours: ClassVar[bool] = True

    @staticmethod
    def type_variants() -> dict[str, sa.types.TypeEngine[Any]]:
        return {
            "payload": mysql.LONGBLOB(),
            "json": mysql.JSON(none_as_null=True),
            "timestamp": mysql.DATETIME(fsp=6),
        }

    def insert_ignore(self, table: sa.Table) -> Insert:
        return sa.insert(table).prefix_with("IGNORE")

    def lock_rows(self, select: sa.Select[Any]) -> sa.Select[Any]:
        return select.with_for_update(skip_locked=True)

    def lock_claim(self, select: sa.Select[Any], table: sa.Table) -> sa.Select[Any]:
        return select.with_for_update(skip_locked=True)

    def prepare_relay_engine(self, engine: Engine) -> Engine:
        # REPEATABLE READ would take next-key locks on the claimed id ranges and wait on rows
        # that writers are still inserting; the relay needs no snapshot across statements.
        return engine.execution_options(isolation_level="READ COMMITTED")

    # InnoDB plans `DELETE ... WHERE id IN (...)` as a full scan when the table is small (the
    # normal state of a drained outbox) and then waits on rows that writers are still inserting,
    # even under READ COMMITTED. Driving the statement from a JSON_TABLE of ids, joined first,
    # makes every row an eq_ref primary-key lookup, so only the relay's own rows are touched.
    def delete_ids(self, connection: Connection, table: sa.Table, ids: Sequence[int]) -> None:
        name = connection.dialect.identifier_preparer.format_table(table)
        connection.execute(
            sa.text(f"DELETE o FROM {_IDS} STRAIGHT_JOIN {name} AS o ON o.id = d.id"),
            {"ids": json.dumps([int(i) for i in ids])},
        )

    def update_ids(self, connection: Connection, table: sa.Table, ids: Sequence[int], values: dict[str, Any]) -> None:
        name = connection.dialect.identifier_preparer.format_table(table)
        cols = [table.c[k] for k in values]  # KeyError for unknown columns: never SQL from strings
        quote = connection.dialect.identifier_preparer.quote
        sets = ", ".join(f"o.{quote(col.name)} = :v{i}" for i, col in enumerate(cols))
        sql = f"UPDATE {_IDS} STRAIGHT_JOIN {name} AS o ON o.id = d.id SET {sets}"  # noqa: S608 - quoted names
        stmt = sa.text(sql).bindparams(
            *(sa.bindparam(f"v{i}", values[col.name], type_=col.type) for i, col in enumerate(cols))
        )
        connection.execute(stmt, {"ids": json.dumps([int(i) for i in ids])})

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
