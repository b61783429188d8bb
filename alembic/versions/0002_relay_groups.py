"""relay groups and instances: leases keyed by (relay_group, partition); relays record their process
instance, group, broker and topic patterns

Existing rows are kept: lease rows join the ``default`` group with their generation, relay rows get
an empty instance (an unknown process: never mistaken for a live copy of a new relay) and the
all-topics pattern.

Revision ID: 0002_relay_groups
Revises: 0001_initial
Create Date: 2026-12-01
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from alembic import op
from outbox.migrations import tables_for_migration
from outbox.types import UTCDateTime

revision = "0002_relay_groups"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

_RELAY_COLUMNS = ("instance", "relay_group", "broker_kind", "broker_target", "topics")


def _leases_0001(name: str, schema: str | None, group: bool) -> sa.Table:
    """The lease table as a revision left it (batch mode on SQLite copies from it, also offline)."""
    cols = [
        sa.Column("partition", sa.SmallInteger(), primary_key=True, autoincrement=False),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=False, server_default=sa.text("0"),
                  comment="fencing token: bumped on every change of owner"),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
    ]
    if group:
        cols.insert(0, sa.Column("relay_group", sa.String(64), primary_key=True, server_default="default",
                                 comment="relay group leasing this partition; each group leases all partitions"))
    return sa.Table(name, sa.MetaData(), *cols, schema=schema)


def _relays_0001(name: str, schema: str | None) -> sa.Table:
    return sa.Table(
        name, sa.MetaData(),
        sa.Column("relay_id", sa.String(255), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        *[_relay_column(c) for c in _RELAY_COLUMNS],
        schema=schema,
    )


def _relay_column(name: str) -> sa.Column[object]:
    return {
        "instance": lambda: sa.Column(
            "instance", sa.String(32), nullable=True,
            comment="random id of the process holding this relay_id (a duplicate id is refused)"),
        "relay_group": lambda: sa.Column("relay_group", sa.String(64), nullable=False, server_default="default"),
        "broker_kind": lambda: sa.Column("broker_kind", sa.String(32), nullable=True),
        "broker_target": lambda: sa.Column("broker_target", sa.String(255), nullable=True,
                                           comment="host:port list or vhost; never credentials"),
        "topics": lambda: sa.Column("topics", sa.String(2000), nullable=False, server_default="*",
                                    comment="comma-separated topic names and prefixes ending in *"),
    }[name]()


@contextlib.contextmanager
def _pk_swap_batch(table: sa.Table) -> Iterator[Any]:
    """SQLite: a primary key change is a table copy. Batch mode copies ``table`` and swaps its key;
    SQLAlchemy warns about that swap, which is exactly what is wanted here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not matching locally specified columns.*")
        with op.batch_alter_table(table.name, schema=table.schema, recreate="always", copy_from=table) as batch:
            yield batch


def _pk_name(table: str) -> str:
    # the name PostgreSQL gave the unnamed primary key of 0001 (MySQL: always PRIMARY)
    return f"{table}_pkey"


def upgrade() -> None:
    n = tables_for_migration().names
    s = n.schema
    for c in _RELAY_COLUMNS:
        op.add_column(n.relays, _relay_column(c), schema=s)

    if op.get_context().dialect.name == "sqlite":  # a primary key change means a table copy on SQLite
        with _pk_swap_batch(_leases_0001(n.leases, s, group=False)) as batch:
            batch.add_column(sa.Column("relay_group", sa.String(64), nullable=False, server_default="default",
                                       comment="relay group leasing this partition; each group leases all "
                                               "partitions"))
            batch.create_primary_key(_pk_name(n.leases), ["relay_group", "partition"])
        return
    op.add_column(n.leases, sa.Column("relay_group", sa.String(64), nullable=False, server_default="default",
                                      comment="relay group leasing this partition; each group leases all partitions"),
                  schema=s)
    op.drop_constraint(_pk_name(n.leases), n.leases, type_="primary", schema=s)
    op.create_primary_key(_pk_name(n.leases), n.leases, ["relay_group", "partition"], schema=s)


def downgrade() -> None:
    n = tables_for_migration().names
    s = n.schema
    le = sa.table(n.leases, sa.column("relay_group"), schema=s)
    # 0001 has one lease per partition: only the default group's leases can stay
    op.execute(le.delete().where(le.c.relay_group != "default"))
    if op.get_context().dialect.name == "sqlite":
        with _pk_swap_batch(_leases_0001(n.leases, s, group=True)) as batch:
            batch.drop_column("relay_group")
            batch.create_primary_key(_pk_name(n.leases), ["partition"])
        with _pk_swap_batch(_relays_0001(n.relays, s)) as batch:
            for c in _RELAY_COLUMNS:
                batch.drop_column(c)
        return
    op.drop_constraint(_pk_name(n.leases), n.leases, type_="primary", schema=s)
    op.drop_column(n.leases, "relay_group", schema=s)
    op.create_primary_key(_pk_name(n.leases), n.leases, ["partition"], schema=s)
    for c in _RELAY_COLUMNS:
        op.drop_column(n.relays, c, schema=s)
