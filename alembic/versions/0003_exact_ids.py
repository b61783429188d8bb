"""ids, keys and names compare byte for byte on MySQL/MariaDB (binary NO PAD collation)

The server's default collation (``utf8mb4_general_ci``) folds case and accents and ignores trailing
spaces, so the dedup consumer took message id ``"abc"`` after ``"ABC"`` for a duplicate and skipped
it, and strict ordering merged keys ``"A"`` and ``"a"``. These columns get ``utf8mb4_nopad_bin``
(MariaDB) / ``utf8mb4_0900_bin`` (MySQL), see :class:`outbox.types.ExactString`. Length,
nullability, defaults and comments are kept; existing rows are kept (a binary collation only tells
more values apart, so no key can collide); one ALTER TABLE per table. PostgreSQL and SQLite already
compare that way: a no-op there.

The downgrade returns the columns to the table's default collation. It refuses, before changing
anything, when rows that are distinct now would collide there (``"abc"`` and ``"ABC"`` as ids of one
consumer).

Revision ID: 0003_exact_ids
Revises: 0002_relay_groups
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from alembic import op
from outbox.errors import DatabaseError
from outbox.migrations import tables_for_migration
from outbox.schema import TableNames
from outbox.types import ExactString

revision = "0003_exact_ids"
down_revision = "0002_relay_groups"
branch_labels = None
depends_on = None


class _Col(NamedTuple):
    table: str  # attribute of TableNames
    name: str
    length: int
    nullable: bool
    server_default: str | None = None
    comment: str | None = None


#: the columns as 0002 left them
_COLUMNS = (
    _Col("outbox", "topic", 249, False),
    _Col("outbox", "key", 255, True),
    _Col("processed", "consumer", 200, False),
    _Col("processed", "message_id", 255, False),
    _Col("stages", "consumer", 200, False),
    _Col("stages", "message_id", 255, False),
    _Col("stages", "stage", 100, False),
    _Col("dead_letters", "consumer", 200, False),
    _Col("dead_letters", "message_id", 255, True),
    _Col("dead_letters", "topic", 249, False),
    _Col("dead_letters", "key", 255, True),
    _Col("leases", "relay_group", 64, False, "default",
         "relay group leasing this partition; each group leases all partitions"),
    _Col("leases", "owner", 255, True),
    _Col("relays", "relay_id", 255, False),
    _Col("relays", "instance", 32, True, None,
         "random id of the process holding this relay_id (a duplicate id is refused)"),
    _Col("relays", "relay_group", 64, False, "default"),
)

#: the unique keys among those columns (the primary keys): a downgrade must not make two rows equal
_UNIQUE = {
    "processed": ("consumer", "message_id"),
    "stages": ("consumer", "message_id", "stage"),
    "leases": ("relay_group", "partition"),
    "relays": ("relay_id",),
}


def _is_mysql() -> bool:
    return op.get_context().dialect.name in ("mysql", "mariadb")


def _modify(names: TableNames, exact: bool) -> None:
    """One ``ALTER TABLE ... MODIFY a ..., MODIFY b ...`` per table: the table is rebuilt once, not
    once per column (the processed-ids table can be large). Each column keeps its length,
    nullability, default and comment; only its character set and collation change."""
    dialect = op.get_context().dialect
    preparer = dialect.identifier_preparer
    for attr in dict.fromkeys(c.table for c in _COLUMNS):
        specs = []
        for c in (c for c in _COLUMNS if c.table == attr):
            col = sa.Column(c.name, ExactString(c.length) if exact else sa.String(c.length), nullable=c.nullable,
                            server_default=c.server_default, comment=c.comment)
            specs.append(f"MODIFY {sa.schema.CreateColumn(col).compile(dialect=dialect)}")
        table = preparer.format_table(sa.table(getattr(names, attr), schema=names.schema))
        # validated table names and compiled column specs only; ':' escaped for text()
        op.execute(sa.text(f"ALTER TABLE {table} {', '.join(specs)}".replace(":", "\\:")))


def upgrade() -> None:
    if not _is_mysql():
        return
    _modify(tables_for_migration().names, exact=True)


def _collisions(bind: sa.Connection, names: TableNames) -> list[str]:
    """The tables with rows that would share a unique key under the table's default collation."""
    found = []
    for attr, cols in _UNIQUE.items():
        name = getattr(names, attr)
        charset, default = bind.execute(
            sa.text("SELECT c.CHARACTER_SET_NAME, t.TABLE_COLLATION FROM information_schema.TABLES t "
                    "JOIN information_schema.COLLATIONS c ON c.COLLATION_NAME = t.TABLE_COLLATION "
                    "WHERE t.TABLE_SCHEMA = COALESCE(:s, DATABASE()) AND t.TABLE_NAME = :t"),
            {"s": names.schema, "t": name},
        ).one()
        t = sa.table(name, *(sa.column(c) for c in cols), schema=names.schema)
        # the value as the table default would hold and compare it (a latin1 table: converted first)
        keys = [sa.collate(sa.cast(t.c[c], mysql.CHAR(charset=charset)), default) if c != "partition" else t.c[c]
                for c in cols]
        q = sa.select(sa.literal(1)).select_from(t).group_by(*keys).having(sa.func.count() > 1).limit(1)
        if bind.execute(q).first() is not None:
            found.append(name)
    return found


def check_downgrade(bind: sa.Connection, names: TableNames) -> None:
    """Refuse a downgrade below this revision while it would merge distinct ids. ``outbox.migrations.downgrade``
    calls it before undoing any revision (MySQL/MariaDB commit each DDL statement at once, so a refusal
    half-way would leave later revisions undone but the version table unchanged)."""
    if bind.dialect.name not in ("mysql", "mariadb"):
        return
    clash = _collisions(bind, names)
    if clash:
        raise DatabaseError(
            f"cannot downgrade below 0003_exact_ids: {', '.join(clash)} hold(s) ids that differ only in "
            "case, accents or trailing spaces, which the table's default collation would take for one; "
            "delete one of each pair first"
        )


def downgrade() -> None:
    if not _is_mysql():
        return
    n = tables_for_migration().names
    if not op.get_context().as_sql:  # offline script: nothing to read
        check_downgrade(op.get_bind(), n)
    _modify(n, exact=False)
