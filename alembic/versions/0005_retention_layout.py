"""the retention layout: plain (batched DELETE purge, the default) or partitioned (PostgreSQL only)

``outbox db upgrade --layout partitioned`` (or ``migrations.upgrade(..., layout="partitioned")``) on
PostgreSQL turns the processed-messages table into one partitioned by day and adds an archive,
partitioned by day, that published outbox rows (audit mode) move into in the same statement that
marks them; ``outbox purge`` then drops whole partitions (see outbox/dialects/pg_partitions.py and
docs/retention.md). Every row is kept. With the default ``plain`` layout, and on MySQL, MariaDB
and SQLite, this revision changes nothing.

The downgrade puts the plain layout back (rows kept; the archived rows return to the outbox table
as ``published``); it reads which layout the database has, not the flag. Switching layouts is a
downgrade to 0004_attributes and an upgrade with the other ``--layout``.

Revision ID: 0005_retention_layout
Revises: 0004_attributes
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op
from outbox.migrations import layout_for_migration, tables_for_migration

revision = "0005_retention_layout"
down_revision = "0004_attributes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if layout_for_migration() != "partitioned" or op.get_context().dialect.name != "postgresql":
        return
    from outbox.dialects.pg_partitions import create_layout

    create_layout(op.get_bind(), tables_for_migration())


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql" or op.get_context().as_sql:
        return
    from outbox.dialects.pg_partitions import drop_layout

    drop_layout(op.get_bind(), tables_for_migration())
