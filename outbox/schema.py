"""The toolkit's tables, defined once on a SQLAlchemy :class:`~sqlalchemy.MetaData`.

``OutboxTables()`` gives the default names. Every name is a validated identifier, so no SQL is
ever built from an unchecked string. The migrations in ``alembic/versions`` create exactly these
tables (a test checks there is no drift on every dialect).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import sqlalchemy as sa

from ._identifiers import identifier
from .types import ExactString, JSONDocument, MessageUUID, Payload, UTCDateTime

__all__ = [
    "ALL_TOPICS",
    "DEFAULT_GROUP",
    "DEFAULT_TABLE_NAMES",
    "DUE_NOW",
    "STATUS_DEAD",
    "STATUS_PENDING",
    "STATUS_PUBLISHED",
    "OutboxTables",
    "TableNames",
    "default_tables",
]

STATUS_PENDING = "pending"
STATUS_DEAD = "dead"
STATUS_PUBLISHED = "published"  # audit mode only; by default published rows are deleted

#: ``available_at`` of a row that is due now. Due rows share this one value, so the claim index
#: (partition, status, available_at, id) hands a partition's due rows out in ``id`` order without a
#: sort, however large the backlog. Delayed and backing-off rows carry their real time and are
#: moved to DUE_NOW by the relay when that time comes.
DUE_NOW = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

TOPIC_LENGTH = 249
KEY_LENGTH = 255
MESSAGE_ID_LENGTH = 255
CONSUMER_LENGTH = 200
STAGE_LENGTH = 100
RELAY_ID_LENGTH = 255
GROUP_LENGTH = 64
BROKER_KIND_LENGTH = 32
BROKER_TARGET_LENGTH = 255
TOPIC_PATTERNS_LENGTH = 2000
INSTANCE_LENGTH = 32
DEFAULT_GROUP = "default"
ALL_TOPICS = "*"


@dataclass(frozen=True)
class TableNames:
    """Names of the toolkit's tables, and an optional schema. Validated at construction."""

    outbox: str = "outbox_messages"
    processed: str = "outbox_processed_messages"
    stages: str = "outbox_consumer_stages"
    dead_letters: str = "outbox_dead_letters"
    leases: str = "outbox_relay_leases"
    relays: str = "outbox_relays"
    schema: str | None = None

    def __post_init__(self) -> None:
        for f in ("outbox", "processed", "stages", "dead_letters", "leases", "relays"):
            identifier(getattr(self, f), f"table name for {f!r}")
        if self.schema is not None:
            identifier(self.schema, "schema name")
        names = [self.outbox, self.processed, self.stages, self.dead_letters, self.leases, self.relays]
        if len(set(names)) != len(names):
            from .errors import InvalidIdentifier

            raise InvalidIdentifier(f"table names must be distinct, got {names}")

    def all(self) -> list[str]:
        return [self.outbox, self.processed, self.stages, self.dead_letters, self.leases, self.relays]


DEFAULT_TABLE_NAMES = TableNames()


@dataclass(eq=False)
class OutboxTables:
    """The toolkit's tables on one :class:`~sqlalchemy.MetaData`.

    Pass ``metadata`` to put them on your own metadata (for your Alembic autogenerate), or let the
    toolkit create one.
    """

    names: TableNames = field(default_factory=TableNames)
    metadata: sa.MetaData = field(default_factory=sa.MetaData)

    def __post_init__(self) -> None:
        n = self.names
        md = self.metadata
        schema = n.schema
        self.outbox = sa.Table(
            n.outbox,
            md,
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                      autoincrement=True, comment="publication order"),
            sa.Column("message_id", MessageUUID(), nullable=False),
            sa.Column("topic", ExactString(TOPIC_LENGTH), nullable=False),
            sa.Column("key", ExactString(KEY_LENGTH), nullable=True),
            sa.Column("payload", Payload(), nullable=False),
            sa.Column("headers", JSONDocument(), nullable=True),
            sa.Column("content_type", sa.String(127), nullable=True),
            sa.Column("partition", sa.SmallInteger(), nullable=False),
            sa.Column("created_at", UTCDateTime(), nullable=False),
            sa.Column("available_at", UTCDateTime(), nullable=False,
                      comment="1970-01-01 = due now; later = delayed or backing off until then"),
            sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
            sa.Column("last_error", sa.Text(), nullable=True),
            sa.Column("status", sa.String(16), nullable=False, server_default=STATUS_PENDING),
            sa.Column("published_at", UTCDateTime(), nullable=True),
            sa.Column("attributes", JSONDocument(), nullable=True,
                      comment="message attributes: type, source, subject, correlation_id, app_id, traceparent, "
                              "tracestate"),
            sa.UniqueConstraint("message_id", name=f"uq_{n.outbox}_message_id"),
            schema=schema,
        )
        sa.Index(
            f"ix_{n.outbox}_claim",
            self.outbox.c.partition,
            self.outbox.c.status,
            self.outbox.c.available_at,
            self.outbox.c.id,
        )

        self.processed = sa.Table(
            n.processed,
            md,
            # byte_order: COLLATE "C" on PostgreSQL (migration 0006), the key of one index insert per message
            sa.Column("consumer", ExactString(CONSUMER_LENGTH, byte_order=True), primary_key=True),
            sa.Column("message_id", ExactString(MESSAGE_ID_LENGTH, byte_order=True), primary_key=True),
            sa.Column("processed_at", UTCDateTime(), nullable=False),
            sa.Column("result", JSONDocument(), nullable=True),
            schema=schema,
        )
        sa.Index(f"ix_{n.processed}_processed_at", self.processed.c.processed_at)

        self.stages = sa.Table(
            n.stages,
            md,
            sa.Column("consumer", ExactString(CONSUMER_LENGTH), primary_key=True),
            sa.Column("message_id", ExactString(MESSAGE_ID_LENGTH), primary_key=True),
            sa.Column("stage", ExactString(STAGE_LENGTH), primary_key=True),
            sa.Column("completed_at", UTCDateTime(), nullable=False),
            sa.Column("result", JSONDocument(), nullable=True),
            schema=schema,
        )

        self.dead_letters = sa.Table(
            n.dead_letters,
            md,
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                      autoincrement=True),
            sa.Column("consumer", ExactString(CONSUMER_LENGTH), nullable=False),
            sa.Column("message_id", ExactString(MESSAGE_ID_LENGTH), nullable=True),
            sa.Column("topic", ExactString(TOPIC_LENGTH), nullable=False),
            sa.Column("key", ExactString(KEY_LENGTH), nullable=True),
            sa.Column("payload", Payload(), nullable=False),
            sa.Column("headers", JSONDocument(), nullable=True),
            sa.Column("content_type", sa.String(127), nullable=True),
            sa.Column("source", JSONDocument(), nullable=True, comment="partition/offset or delivery facts"),
            sa.Column("error", sa.Text(), nullable=False),
            sa.Column("traceback", sa.Text(), nullable=True),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("first_failed_at", UTCDateTime(), nullable=False),
            sa.Column("last_failed_at", UTCDateTime(), nullable=False),
            sa.Column("status", sa.String(16), nullable=False, server_default=STATUS_DEAD),
            schema=schema,
        )
        sa.Index(f"ix_{n.dead_letters}_consumer", self.dead_letters.c.consumer, self.dead_letters.c.status,
                 self.dead_letters.c.id)

        self.leases = sa.Table(
            n.leases,
            md,
            sa.Column("relay_group", ExactString(GROUP_LENGTH), primary_key=True, server_default=DEFAULT_GROUP,
                      comment="relay group leasing this partition; each group leases all partitions"),
            sa.Column("partition", sa.SmallInteger(), primary_key=True, autoincrement=False),
            sa.Column("owner", ExactString(RELAY_ID_LENGTH), nullable=True),
            sa.Column("generation", sa.BigInteger(), nullable=False, server_default=sa.text("0"),
                      comment="fencing token: bumped on every change of owner"),
            sa.Column("expires_at", UTCDateTime(), nullable=True),
            schema=schema,
        )

        self.relays = sa.Table(
            n.relays,
            md,
            sa.Column("relay_id", ExactString(RELAY_ID_LENGTH), primary_key=True),
            sa.Column("hostname", sa.String(255), nullable=False),
            sa.Column("pid", sa.Integer(), nullable=False),
            sa.Column("started_at", UTCDateTime(), nullable=False),
            sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
            sa.Column("expires_at", UTCDateTime(), nullable=False),
            sa.Column("instance", ExactString(INSTANCE_LENGTH), nullable=True,
                      comment="random id of the process holding this relay_id (a duplicate id is refused)"),
            sa.Column("relay_group", ExactString(GROUP_LENGTH), nullable=False, server_default=DEFAULT_GROUP),
            sa.Column("broker_kind", sa.String(BROKER_KIND_LENGTH), nullable=True),
            sa.Column("broker_target", sa.String(BROKER_TARGET_LENGTH), nullable=True,
                      comment="host:port list or vhost; never credentials"),
            sa.Column("topics", sa.String(TOPIC_PATTERNS_LENGTH), nullable=False, server_default=ALL_TOPICS,
                      comment="comma-separated topic names and prefixes ending in *"),
            schema=schema,
        )

    def all(self) -> list[sa.Table]:
        return [self.outbox, self.processed, self.stages, self.dead_letters, self.leases, self.relays]


_DEFAULT: OutboxTables | None = None


def default_tables() -> OutboxTables:
    """The tables with default names, on a metadata of their own (created once)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = OutboxTables()
    return _DEFAULT
