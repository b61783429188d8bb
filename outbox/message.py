"""Message shapes: what a service hands to the writer and what the relay reads back."""

from __future__ import annotations

import datetime as dt
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["NO_ATTRIBUTES", "OutboxRecord", "OutgoingMessage", "partition_for"]

#: The attributes of a record that has none: one shared, read-only empty mapping (no allocation per row).
NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class OutgoingMessage:
    """One message for :meth:`outbox.Outbox.add_many`; the fields mirror :meth:`~outbox.Outbox.add`."""

    topic: str
    payload: Any
    key: str | None = None
    headers: Mapping[str, str] | None = None
    message_id: uuid.UUID | str | None = None
    deliver_at: dt.datetime | None = None
    delay: dt.timedelta | float | None = None
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """A committed outbox row as the relay publishes it."""

    id: int
    message_id: uuid.UUID
    topic: str
    key: str | None
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    partition: int = 0
    attempts: int = 0
    created_at: dt.datetime | None = None
    attributes: Mapping[str, str] = field(default_factory=lambda: NO_ATTRIBUTES)
    """Per-message attributes (``type``, ``source``, ``subject``, ``correlation_id``, ``app_id``,
    ``traceparent``, ``tracestate``) that codecs map onto the wire; empty when none were given."""


def partition_for(key: str | None, message_id: uuid.UUID, partitions: int) -> int:
    """Stable partition of a key: CRC-32 of its UTF-8 bytes modulo ``partitions``.

    Keyless messages have no order to keep; they are spread by message id.
    """
    if key is None:
        return message_id.int % partitions
    return zlib.crc32(key.encode("utf-8")) % partitions
