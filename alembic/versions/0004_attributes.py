"""outbox rows carry message attributes (CloudEvents type/source/subject, correlation and app ids, trace context)

A nullable JSON column ``attributes`` on the outbox table: a JSON object of short strings that the
writer fills only when ``add()`` is given one of them (or finds an active OpenTelemetry span), so a
row that uses none of them costs no extra bytes. Rows written before this revision keep NULL, which
the relay reads as "no attributes". Adding a nullable column without a default is a metadata-only
change on PostgreSQL, MariaDB (INSTANT) and SQLite: no table rewrite, existing rows untouched.

The downgrade drops the column (and with it the attributes of rows still pending).

Revision ID: 0004_attributes
Revises: 0003_exact_ids
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op
from outbox.migrations import tables_for_migration
from outbox.types import JSONDocument

revision = "0004_attributes"
down_revision = "0003_exact_ids"
branch_labels = None
depends_on = None


def upgrade() -> None:
    n = tables_for_migration().names
    op.add_column(n.outbox, sa.Column("attributes", JSONDocument(), nullable=True,
                                      comment="message attributes: type, source, subject, correlation_id, "
                                              "app_id, traceparent, tracestate"),
                  schema=n.schema)


def downgrade() -> None:
    n = tables_for_migration().names
    with op.batch_alter_table(n.outbox, schema=n.schema) as batch:
        batch.drop_column("attributes")
