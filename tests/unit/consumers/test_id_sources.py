"""Id sources: parsing at the edge, the default order, header-name matching and lossless ids."""

from __future__ import annotations

import pytest

from consumers import DedupConsumer, IncomingMessage, MessageIdMissing, content_hash
from consumers.ids import DEFAULT_ID_SOURCES, IdSource, parse_id_sources, resolve_id
from outbox.errors import ConfigurationError
from outbox.incoming import header_text, id_text
from outbox.transports.base import Envelope
from outbox.transports.codecs import NATIVE


class C(DedupConsumer):
    name = "unit.ids"


def kafka_message(headers: dict[str, bytes], payload: bytes = b"{}") -> IncomingMessage:
    """What the Kafka runner hands the consumer: the native codec's decode of raw record headers."""
    return NATIVE.decode(Envelope("t", b"k", payload, dict(headers)), "kafka")


def amqp_message(headers: dict[str, object], message_id: str | bytes | None = None) -> IncomingMessage:
    m = NATIVE.decode(Envelope("x", "rk", b"{}", dict(headers), properties={"message_id": message_id}), "amqp")
    if message_id:
        m.attributes["message_id"] = header_text(message_id)  # as the RabbitMQ runner sets it
    return m


def test_default_order_is_documented_one() -> None:
    assert [str(s) for s in DEFAULT_ID_SOURCES] == ["header:message-id", "cloudevents", "header:id", "message_id"]
    assert C().id_sources == DEFAULT_ID_SOURCES


@pytest.mark.parametrize(("headers", "expected"), [
    ({"message-id": b"own", "ce_id": b"ce", "id": b"dbz"}, "own"),
    ({"ce_id": b"ce", "id": b"dbz"}, "ce"),
    ({"cloudEvents_id": b"amqp-ce", "id": b"dbz"}, "amqp-ce"),
    ({"cloudEvents:id": b"colon-ce"}, "colon-ce"),
    ({"ce-id": b"dash-ce"}, "dash-ce"),
    ({"id": b"dbz"}, "dbz"),
    ({"Message-Id": b"cased"}, "cased"),  # case-insensitive after the exact name
    ({"message-id": b"   ", "id": b"dbz"}, "dbz"),  # blank: the next source
])
def test_default_sources_on_kafka(headers: dict[str, bytes], expected: str) -> None:
    assert C().identify(kafka_message(headers)) == expected


def test_headers_win_over_amqp_message_id_and_message_id_is_the_fallback() -> None:
    assert C().identify(amqp_message({"id": "dbz"}, message_id="random-stamp")) == "dbz"
    assert C().identify(amqp_message({}, message_id="amqp-only")) == "amqp-only"
    assert C().identify(amqp_message({"cloudEvents_id": "ce"}, message_id="random")) == "ce"


def test_exact_name_wins_over_other_case() -> None:
    m = kafka_message({"MESSAGE-ID": b"upper", "message-id": b"exact"})
    assert C().identify(m) == "exact"


def test_invalid_utf8_ids_stay_distinct_and_match_id_text_of_the_bytes() -> None:
    a, b = b"\xff\xfe\xfd\xfc", b"\x80\x81\x82\x83"
    ia, ib = (C().identify(kafka_message({"id": v})) for v in (a, b))
    assert ia != ib
    assert (ia, ib) == (id_text(a), id_text(b))
    long = b"\xff" + b"x" * 600  # over 255 characters: the same bounded form as before the id sources
    assert C().identify(kafka_message({"message-id": long})) == id_text(long)
    plain_long = b"y" * 400
    assert C().identify(kafka_message({"message-id": plain_long})) == id_text(plain_long)


def test_amqp_int_header_and_bytes_message_id() -> None:
    assert C().identify(amqp_message({"id": 42})) == "42"
    assert C().identify(amqp_message({}, message_id=b"\xff\x00")) == id_text(b"\xff\x00")


def test_configured_sources_replace_the_default() -> None:
    c = C(id_from="header:NServiceBus.MessageId,message_id")
    assert c.identify(amqp_message({"NServiceBus.MessageId": "nsb", "message-id": "own"})) == "nsb"
    with pytest.raises(MessageIdMissing, match=r"tried header:NServiceBus\.MessageId, message_id"):
        c.identify(kafka_message({"message-id": b"own"}))


def test_default_keyword_expands_and_hash_is_last() -> None:
    c = C(id_from=["header:X-Request-Id", "default", "hash"])
    assert [str(s) for s in c.id_sources] == ["header:X-Request-Id", *(str(s) for s in DEFAULT_ID_SOURCES), "hash"]
    m = kafka_message({}, payload=b'{"a": 1}')
    assert c.identify(m) == content_hash("t", "k", b'{"a": 1}')
    assert c.identify(kafka_message({"x-request-id": b"req"})) == "req"


def test_structured_cloudevent_body() -> None:
    m = kafka_message({"content-type": b"application/cloudevents+json; charset=utf-8"},
                      payload=b'{"specversion": "1.0", "id": "s-1", "type": "t", "source": "/s"}')
    assert C().identify(m) == "s-1"
    bad = kafka_message({"content-type": b"application/cloudevents+json"}, payload=b"not json")
    with pytest.raises(MessageIdMissing):
        C().identify(bad)


def test_no_id_names_the_sources_tried() -> None:
    with pytest.raises(MessageIdMissing, match=r"no message id \(tried header:message-id, cloudevents, header:id, "
                                               r"message_id\).*id_from"):
        C().identify(kafka_message({"other": b"x"}))


@pytest.mark.parametrize(("spec", "error"), [
    ("", "lists no id source"),
    ("header:", "names no header"),
    ("header", "'header' needs a name"),
    ("bogus", "unknown id source 'bogus'"),
    ("amqp:message_id", "unknown id source"),
    ("hash,message_id", "comes after hash"),
    ("message_id,message_id", "listed twice"),
    (42, "comma-separated str or a list"),
    ([b"header:id"], "must be a str"),
])
def test_bad_specs_are_refused_with_a_clear_error(spec: object, error: str) -> None:
    with pytest.raises(ConfigurationError, match=error):
        parse_id_sources(spec)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"C\.id_from"):
        C(id_from=spec)  # type: ignore[arg-type]


def test_spellings() -> None:
    assert parse_id_sources(" Header:NServiceBus.MessageId , message-id ,CloudEvents") == (
        IdSource("header", "NServiceBus.MessageId"), IdSource("message_id"), IdSource("cloudevents"))


def test_legacy_settings_keep_working() -> None:
    m = kafka_message({"message-id": b"own"}, payload=b"p")
    assert C(id_strategy="content-hash").identify(m) == content_hash("t", "k", b"p")
    assert C(message_id=staticmethod(lambda msg: "custom")).identify(m) == "custom"  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not both"):
        C(id_strategy="content-hash", id_from="hash")
    preset = kafka_message({"message-id": b"own"})
    preset.id = "set-by-hand"
    assert C().identify(preset) == "set-by-hand"


def test_class_attribute() -> None:
    class N(DedupConsumer):
        name = "unit.nsb"
        id_from = ("header:NServiceBus.MessageId",)

    assert N().identify(kafka_message({"nservicebus.messageid": b"n-1"})) == "n-1"
    assert resolve_id(kafka_message({}), N().id_sources) is None
