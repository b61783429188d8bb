"""Outbox records as the relay hands them to a publisher, made up for the contract suites."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Mapping

from ..message import OutboxRecord

__all__ = ["record"]

_ids = itertools.count(1)


def record(topic: str, payload: bytes = b"{}", *, key: str | None = None, headers: Mapping[str, str] | None = None,
           content_type: str | None = None, created_at: dt.datetime | None = None,
           attributes: Mapping[str, str] | None = None, message_id: uuid.UUID | None = None) -> OutboxRecord:
    """An :class:`~outbox.message.OutboxRecord` with a fresh row id and (unless given) message id."""
    extra = {} if attributes is None else {"attributes": dict(attributes)}
    return OutboxRecord(id=next(_ids), message_id=message_id or uuid.uuid4(), topic=topic, key=key, payload=payload,
                        headers=dict(headers or {}), content_type=content_type, created_at=created_at, **extra)
