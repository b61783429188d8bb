"""Where a dedup consumer finds a message's id: an ordered, configurable list of id sources.

A source is spelled as text (class attribute ``id_from``, ``outbox consume --id-from``,
``OUTBOX_CONSUMER_ID_FROM``, ``id_from`` in the ``[consume]`` table):

``header:NAME``
    the header ``NAME`` as received (Kafka record header, AMQP headers table). The exact name is
    tried first, then the name case-insensitively (the first such header, in the order received).
``message_id``
    the AMQP ``message_id`` property (``message.attributes["message_id"]``; Kafka has none).
``cloudevents``
    the CloudEvents ``id``: the ``ce_id`` header (Kafka binary mode), ``cloudEvents_id`` or
    ``cloudEvents:id`` (AMQP binary mode, both conventions), ``ce-id`` (the ``ce-`` prefix of HTTP
    and of the SDK's RabbitMQ binding), or the ``id`` member of a structured mode body (content
    type ``application/cloudevents+json``).
``hash``
    SHA-256 of topic, key and payload (:func:`outbox.incoming.content_hash`): identical content
    is processed once. It always yields an id, so it can only be the last source.
``default``
    the default list below, in place (``header:X-Request-Id,default``).

The first source that yields a non-blank value wins. The default order (:data:`DEFAULT_ID_FROM`)
is outboxkit's own ``message-id`` header, the CloudEvents id, Debezium's ``id`` header, then the
AMQP ``message_id``: headers win over the property, since some clients stamp a random
``message_id`` on every send. No content hash by default. A message no source identifies goes to
the dead letters with :class:`~outbox.errors.MessageIdMissing` naming the sources tried.

Ids keep their bytes: values that are not valid UTF-8, hold NUL or are longer than 255 characters
get the lossless, bounded text form of :func:`outbox.incoming.id_text`, so two ids that differ
only in invalid bytes stay two ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from outbox.errors import ConfigurationError
from outbox.incoming import HASHED_PREFIX, IncomingMessage, content_hash, id_text, storable_id
from outbox.schema import MESSAGE_ID_LENGTH

__all__ = ["DEFAULT_ID_FROM", "DEFAULT_ID_SOURCES", "IdSource", "describe_id_sources", "parse_id_sources",
           "resolve_id"]

#: the default id sources, in order
DEFAULT_ID_FROM: tuple[str, ...] = ("header:message-id", "cloudevents", "header:id", "message_id")

_KINDS = ("header", "message_id", "cloudevents", "hash")
_SPELLINGS = "header:NAME, message_id, cloudevents, hash or default"
#: the CloudEvents id headers: Kafka binary mode; AMQP (the SDKs' ``cloudEvents_``, the older ``cloudEvents:``);
#: ``ce-`` (HTTP, and the Python SDK's RabbitMQ binding after knative eventing-rabbitmq)
CLOUDEVENTS_ID_HEADERS = ("ce_id", "cloudEvents_id", "cloudEvents:id", "ce-id")
_STRUCTURED = "application/cloudevents+json"


@dataclass(frozen=True)
class IdSource:
    """One place to look for an id: ``kind`` ``header`` (with ``name``), ``message_id``, ``cloudevents``, ``hash``."""

    kind: str
    name: str | None = None

    def __str__(self) -> str:
        return f"header:{self.name}" if self.kind == "header" else self.kind


def _parse_one(text: str, where: str) -> list[IdSource]:
    item = text.strip()
    kind, sep, name = item.partition(":")
    kind = kind.strip().lower()
    if sep:
        if kind != "header":
            raise ConfigurationError(f"{where}: unknown id source {item!r}; use {_SPELLINGS}")
        name = name.strip()
        if not name:
            raise ConfigurationError(f"{where}: {item!r} names no header; write header:NAME, e.g. header:message-id")
        return [IdSource("header", name)]
    kind = kind.replace("-", "_")
    if kind == "default":
        return list(DEFAULT_ID_SOURCES)
    if kind in ("message_id", "cloudevents", "hash"):
        return [IdSource(kind)]
    if kind == "header":
        raise ConfigurationError(f"{where}: 'header' needs a name: header:NAME, e.g. header:NServiceBus.MessageId")
    raise ConfigurationError(f"{where}: unknown id source {item!r}; use {_SPELLINGS}")


def parse_id_sources(spec: str | Sequence[str | IdSource], where: str = "id_from") -> tuple[IdSource, ...]:
    """The id sources of ``spec``: a comma-separated str or a sequence of str / :class:`IdSource`.

    Raises :class:`~outbox.errors.ConfigurationError` (naming ``where``) for an unknown source, an
    empty list, a source listed twice, or anything after ``hash`` (which always yields an id).
    """
    if isinstance(spec, str):
        items: list[str | IdSource] = [p for p in spec.split(",")]
    elif isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        items = list(spec)
    else:
        raise ConfigurationError(f"{where} must be a comma-separated str or a list of id sources ({_SPELLINGS}), "
                                 f"got {type(spec).__name__}")
    out: list[IdSource] = []
    for item in items:
        if isinstance(item, IdSource):
            parsed = [item]
        elif isinstance(item, str):
            if not item.strip():
                continue
            parsed = _parse_one(item, where)
        else:
            raise ConfigurationError(f"{where}: each id source must be a str ({_SPELLINGS}), got {item!r}")
        for src in parsed:
            if out and out[-1].kind == "hash":
                raise ConfigurationError(f"{where}: {src} comes after hash, which always yields an id; put hash last")
            if src in out:
                raise ConfigurationError(f"{where}: {src} is listed twice")
            out.append(src)
    if not out:
        raise ConfigurationError(f"{where} lists no id source; use {_SPELLINGS}")
    return tuple(out)


DEFAULT_ID_SOURCES: tuple[IdSource, ...] = tuple(IdSource("header", n.partition(":")[2]) if n.startswith("header:")
                                                 else IdSource(n) for n in DEFAULT_ID_FROM)


def describe_id_sources(sources: Sequence[IdSource]) -> str:
    """``header:message-id, cloudevents, ...``: the sources as one would spell them."""
    return ", ".join(str(s) for s in sources)


def _header(headers: dict[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None and value.strip():
        return value
    folded = name.casefold()
    for k, v in headers.items():
        if k != name and k.casefold() == folded and v is not None and v.strip():
            return v
    return None


def _structured_id(message: IncomingMessage) -> str | None:
    ctype = (message.content_type or "").split(";", 1)[0].strip().lower()
    if ctype != _STRUCTURED:
        return None
    try:
        event = json.loads(message.payload)
    except (ValueError, UnicodeDecodeError):
        return None
    value = event.get("id") if isinstance(event, dict) else None
    return value if isinstance(value, str) and value.strip() else None


def _stored(text: str) -> str:
    """The stored id form of a value already in lossless text form (a decoded header or property).

    The same as :func:`~outbox.incoming.id_text` of the original bytes: short forms stay as they
    are, longer ones get ``~h:`` + prefix + SHA-256; a str with NUL or lone surrogates (a message
    built by hand) goes through :func:`~outbox.incoming.id_text`.
    """
    if storable_id(text):
        return text
    if "\x00" in text:
        return id_text(text)
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        return id_text(text)
    digest = hashlib.sha256(raw).hexdigest()  # what bounded_text does with the original value's text form
    keep = max(0, MESSAGE_ID_LENGTH - len(HASHED_PREFIX) - 1 - len(digest))
    return f"{HASHED_PREFIX}{text[:keep]}~{digest}"[:MESSAGE_ID_LENGTH] if keep else digest[:MESSAGE_ID_LENGTH]


def resolve_id(message: IncomingMessage, sources: Sequence[IdSource]) -> str | None:
    """The stored id of ``message`` from the first of ``sources`` that yields one, else ``None``."""
    headers = message.headers
    for src in sources:
        kind = src.kind
        value: str | None = None
        if kind == "header":
            value = _header(headers, src.name or "")
        elif kind == "cloudevents":
            for name in CLOUDEVENTS_ID_HEADERS:
                value = _header(headers, name)
                if value is not None:
                    break
            else:
                value = _structured_id(message)
        elif kind == "message_id":
            value = message.attributes.get("message_id")
            if value is not None and not value.strip():
                value = None
        elif kind == "hash":
            return content_hash(message.topic, message.key, message.payload)
        if value is not None:
            return _stored(value)
    return None
