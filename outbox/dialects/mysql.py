"""MySQL 8 and MariaDB >= 10.6: LONGBLOB, DATETIME(6), binary NO PAD ids, INSERT IGNORE, SKIP LOCKED."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Insert

from ..errors import UnsupportedDatabase
from .base import Dialect

_IDS = "JSON_TABLE(:ids, '$[*]' COLUMNS (id BIGINT PATH '$')) AS d"


#: server / client error codes a retry can fix: lock wait timeout, deadlock, too many
#: connections, shutdown, network errors, lost connections, killed or timed-out statements.
_TRANSIENT_CODES = frozenset({
    1040, 1053, 1158, 1159, 1160, 1161, 1205, 1213, 1317, 1927, 1969, 2002, 2003, 2006, 2013, 2055, 3024,
    4031,
})
#: codes that are about the statement's rows: data too long (1406), out of range (1264, 1690),
#: incorrect or truncated values (1265, 1292, 1366, 1367), NULL / no default (1048, 1364),
#: duplicate key (1062), foreign keys (1216, 1217, 1451, 1452), CHECK constraints (MariaDB 4025,
#: MySQL 3819), invalid JSON (3140) and a trigger's SIGNAL (1644). pymysql reports several of
#: them as OperationalError, so the code, not the class, decides.
_PERMANENT_CODES = frozenset({
    1048, 1062, 1216, 1217, 1264, 1265, 1292, 1364, 1366, 1367, 1406, 1451, 1452, 1644, 1690, 3140, 3819,
    4025,
})


#: the origin of the claim's created_at integers (DATETIME columns hold UTC, without a zone)
_EPOCH = sa.literal_column("'1970-01-01 00:00:00'")


class MySQLDialect(Dialect):
    name: ClassVar[str] = "mysql"
    supports_skip_locked: ClassVar[bool] = True
    supports_concurrent_relays: ClassVar[bool] = True
    # Not with the relay's statements under READ COMMITTED (its sessions' level): the claim's
    # derived table of due ids is a consistent read and only its outer primary-key look-ups lock,
    # the DELETE and UPDATE go by primary key (eq_ref), and READ COMMITTED takes no gap locks. A
    # neighbour mid-batch, an application session with uncommitted rows in every partition, even a
    # neighbour on REPEATABLE READ, make no claim pass over a committed row of ours
    # (tests/integration/test_relay.py). So InnoDB, like PostgreSQL, checks for gaps only in the
    # claims of partitions just acquired (a previous owner may still hold its batch's locks).
    skip_locked_reaches_neighbours: ClassVar[bool] = False

    def claim_timestamp(self, column: sa.ColumnElement[Any]) -> tuple[sa.ColumnElement[Any], sa.ColumnElement[Any]]:
        """``created_at`` as microseconds since 1970 (an integer), or as text where it is no time.

        pymysql parses every DATETIME it reads in Python (a regular expression and seven ``int()``
        calls a value, a tenth of a MariaDB drain's time); an integer is one ``int()``, and
        :func:`outbox._rows.decode_row` makes the datetime from it. A value ``TIMESTAMPDIFF`` cannot
        read (the zero date, a zero month or day) is NULL there and comes as its text in the
        second column, for its row alone to be refused.
        """
        micros = sa.func.timestampdiff(sa.literal_column("MICROSECOND"), _EPOCH, column)
        return micros, sa.case((sa.and_(micros.is_(None), column.is_not(None)), sa.cast(column, sa.String())),
                               else_=sa.null())

    def error_kind(self, exc: sa.exc.DBAPIError) -> str | None:
        args = getattr(exc.orig, "args", ())
        code = args[0] if args and isinstance(args[0], int) else None
        if code in _TRANSIENT_CODES:
            return "transient"
        if code in _PERMANENT_CODES:
            return "permanent"
        return None

    @staticmethod
    def type_variants() -> dict[str, sa.types.TypeEngine[Any]]:
        return {
            "payload": mysql.LONGBLOB(),
            "json": mysql.JSON(none_as_null=True),
            "timestamp": mysql.DATETIME(fsp=6),
        }

    @staticmethod
    def exact_string(length: int, dialect: sa.engine.Dialect) -> sa.types.TypeEngine[Any] | None:
        # The server default (utf8mb4_general_ci) folds case and accents, and every *_bin collation
        # of utf8mb4 but the NO PAD ones ignores trailing spaces, so a unique key takes "abc" after
        # "ABC" or "a " after "a" for a duplicate. MariaDB's NO PAD binary collation is
        # utf8mb4_nopad_bin; MySQL 8's is utf8mb4_0900_bin (>= 8.0.17). The character set is
        # named too, so the column is right whatever the database's default character set is.
        return mysql.VARCHAR(length, charset="utf8mb4", collation=MySQLDialect.exact_collation(dialect))

    @staticmethod
    def exact_collation(dialect: sa.engine.Dialect) -> str:
        """The collation of :meth:`exact_string` on this server (MariaDB or MySQL)."""
        return "utf8mb4_nopad_bin" if getattr(dialect, "is_mariadb", False) else "utf8mb4_0900_bin"

    def insert_ignore(self, table: sa.Table) -> Insert:
        return sa.insert(table).prefix_with("IGNORE")

    def idle_transaction_statements(self, seconds: float, dialect: sa.engine.Dialect) -> list[str]:
        """MariaDB (>= 10.3): ``idle_transaction_timeout`` closes a connection idle in a transaction.

        MySQL 8 has no such bound; the fallback is ``wait_timeout``, which closes a connection idle
        for that long whether or not it is in a transaction: the relay's pooled connections then get
        closed too when unused that long, which the relay's pre-ping reconnects (whole seconds, at
        least 1).
        """
        whole = max(1, math.ceil(seconds))
        if getattr(dialect, "is_mariadb", False):
            return [f"SET SESSION idle_transaction_timeout = {whole}"]
        return [f"SET SESSION wait_timeout = {whole}"]

    def lock_rows(self, select: sa.Select[Any]) -> sa.Select[Any]:
        return select.with_for_update(skip_locked=True)

    def lock_claim(self, select: sa.Select[Any], table: sa.Table) -> sa.Select[Any]:
        return select.with_for_update(skip_locked=True)

    def relay_session_statements(self) -> list[str]:
        """READ COMMITTED for the relay's sessions, set once per connection.

        REPEATABLE READ would take next-key locks on the claimed id ranges and wait on rows that
        writers are still inserting; the relay needs no snapshot across statements. Set here, on the
        relay's own pool's new connections, rather than as SQLAlchemy's ``isolation_level`` execution
        option: that one sends ``SET SESSION TRANSACTION ISOLATION LEVEL`` and ``COMMIT`` at every checkout
        and again at every return (four round trips a relay round), and a connection lost in between raised the
        driver's own error there, not SQLAlchemy's ``DBAPIError`` that the relay retries.
        """
        return ["SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"]

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

    def inserts_keys_at_end(self, connection: Connection, table: sa.Table) -> bool:
        return True

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
