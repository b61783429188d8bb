"""outboxkit initial schema: outbox, processed messages, stages, dead letters, relay leases and members

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op
from outbox.migrations import tables_for_migration
from outbox.types import JSONDocument, MessageUUID, Payload, UTCDateTime

revision = "0001_initial"
down_revision = None
branch_labels = ("outboxkit",)
depends_on = None


def _bigint_pk() -> sa.types.TypeEngine:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    n = tables_for_migration().names
    s = n.schema
    op.create_table(
        n.outbox,
        sa.Column("id", _bigint_pk(), primary_key=True, autoincrement=True, comment="publication order"),
        sa.Column("message_id", MessageUUID(), nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("key", sa.String(255), nullable=True),
        sa.Column("payload", Payload(), nullable=False),
        sa.Column("headers", JSONDocument(), nullable=True),
        sa.Column("content_type", sa.String(127), nullable=True),
        sa.Column("partition", sa.SmallInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("available_at", UTCDateTime(), nullable=False,
                  comment="1970-01-01 = due now; later = delayed or backing off until then"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("published_at", UTCDateTime(), nullable=True),
        sa.UniqueConstraint("message_id", name=f"uq_{n.outbox}_message_id"),
        schema=s,
    )
    op.create_index(f"ix_{n.outbox}_claim", n.outbox, ["partition", "status", "available_at", "id"], schema=s)

    op.create_table(
        n.processed,
        sa.Column("consumer", sa.String(200), primary_key=True),
        sa.Column("message_id", sa.String(255), primary_key=True),
        sa.Column("processed_at", UTCDateTime(), nullable=False),
        sa.Column("result", JSONDocument(), nullable=True),
        schema=s,
    )
    op.create_index(f"ix_{n.processed}_processed_at", n.processed, ["processed_at"], schema=s)

    op.create_table(
        n.stages,
        sa.Column("consumer", sa.String(200), primary_key=True),
        sa.Column("message_id", sa.String(255), primary_key=True),
        sa.Column("stage", sa.String(100), primary_key=True),
        sa.Column("completed_at", UTCDateTime(), nullable=False),
        sa.Column("result", JSONDocument(), nullable=True),
        schema=s,
    )

    op.create_table(
        n.dead_letters,
        sa.Column("id", _bigint_pk(), primary_key=True, autoincrement=True),
        sa.Column("consumer", sa.String(200), nullable=False),
        sa.Column("message_id", sa.String(255), nullable=True),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("key", sa.String(255), nullable=True),
        sa.Column("payload", Payload(), nullable=False),
        sa.Column("headers", JSONDocument(), nullable=True),
        sa.Column("content_type", sa.String(127), nullable=True),
        sa.Column("source", JSONDocument(), nullable=True, comment="partition/offset or delivery facts"),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_failed_at", UTCDateTime(), nullable=False),
        sa.Column("last_failed_at", UTCDateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="dead"),
        schema=s,
    )
    op.create_index(f"ix_{n.dead_letters}_consumer", n.dead_letters, ["consumer", "status", "id"], schema=s)

    op.create_table(
        n.leases,
        sa.Column("partition", sa.SmallInteger(), primary_key=True, autoincrement=False),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=False, server_default=sa.text("0"),
                  comment="fencing token: bumped on every change of owner"),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        schema=s,
    )

    op.create_table(
        n.relays,
        sa.Column("relay_id", sa.String(255), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        schema=s,
    )


def downgrade() -> None:
    n = tables_for_migration().names
    s = n.schema
    for name in (n.relays, n.leases, n.dead_letters, n.stages, n.processed, n.outbox):
        op.drop_table(name, schema=s)
