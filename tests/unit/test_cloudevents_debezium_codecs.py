"""The cloudevents and debezium codecs: encode / decode round trips, the SDK's view, reserved names.

Broker-free: what the codecs put in an :class:`Envelope` and read back from one. The same
messages on real brokers are in tests/integration/test_codec_wire.py.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from outbox.errors import ConfigurationError
from outbox.message import OutboxRecord
from outbox.transports.base import Envelope
from outbox.transports.codecs import (
    CloudEventsCodec,
    DebeziumCodec,
    codec_names,
    get_codec,
    is_reserved_header,
    register_codec,
    reserved_by,
    reserved_header_names,
)

CREATED = dt.datetime(2026, 12, 1, 13, 5, 7, 123456, tzinfo=dt.timezone.utc)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def dedup_id(msg):
    """The id a consumer with the default id sources stores for ``msg`` (codecs leave ``msg.id`` unset)."""
    from consumers.ids import DEFAULT_ID_FROM, parse_id_sources, resolve_id

    return resolve_id(msg, parse_id_sources(DEFAULT_ID_FROM))


def rec(*, headers=None, attributes=None, content_type="application/json", created=CREATED, key="order-1",
        payload=b'{"total": 12}', topic="orders") -> OutboxRecord:
    return OutboxRecord(id=7, message_id=uuid.uuid4(), topic=topic, key=key, payload=payload,
                        headers=dict(headers or {}), content_type=content_type, created_at=created,
                        attributes=dict(attributes or {}))


def on_kafka(env: Envelope) -> Envelope:
    """What a Kafka consumer hands back: header values and the key as bytes."""
    headers = {k: v.encode() if isinstance(v, str) else v for k, v in env.headers.items()}
    key = env.key.encode() if isinstance(env.key, str) else env.key
    return Envelope(env.topic, key, env.payload, headers, env.timestamp, partition=1, offset=42)


def on_amqp(env: Envelope) -> Envelope:
    return Envelope(env.topic, env.key or "", env.payload, dict(env.headers), None, dict(env.properties),
                    delivery_tag=3)


CE = CloudEventsCodec()
DBZ = DebeziumCodec()


# ------------------------------------------------------------------ registry


def test_registry_knows_the_three_codecs_and_names_them_on_a_typo():
    assert {"native", "cloudevents", "debezium"} <= set(codec_names())
    assert isinstance(get_codec("cloudevents"), CloudEventsCodec)
    assert isinstance(get_codec("debezium"), DebeziumCodec)
    with pytest.raises(ConfigurationError, match=r"unknown codec 'cloudevent'.*cloudevents.*debezium.*native"):
        get_codec("cloudevent")


def test_the_default_source_is_configurable_and_checked():
    assert get_codec("cloudevents").source == "/outboxkit"
    assert get_codec("cloudevents", source="/billing").source == "/billing"
    assert get_codec("native", source="/billing") is get_codec("native")  # not a CloudEvents option there
    for bad in ("", "  ", "has space", "a\x00b", 5):
        with pytest.raises(ConfigurationError, match="CloudEvents source"):
            CloudEventsCodec(source=bad)


# ------------------------------------------------------------------ cloudevents: encode


def test_cloudevents_on_kafka_binary_mode_headers():
    r = rec(headers={"tenant": "t1"})
    env = CE.encode(r, "kafka")
    assert env.topic == "orders" and env.key == "order-1" and env.payload == r.payload
    assert env.timestamp == CREATED
    assert env.properties == {}
    assert env.headers == {
        "tenant": "t1",
        "ce_specversion": "1.0",
        "ce_id": str(r.message_id),
        "ce_source": "/outboxkit",
        "ce_type": "orders",
        "ce_time": "2026-12-01T13:05:07.123456Z",
        "content-type": "application/json",
    }


def test_cloudevents_takes_type_source_subject_and_trace_context_from_the_row():
    r = rec(attributes={"type": "com.example.order.created", "source": "/shop/orders", "subject": "order-1",
                        "traceparent": TRACEPARENT, "tracestate": "vendor=1", "correlation_id": "c-9",
                        "app_id": "shop"})
    h = CE.encode(r, "kafka").headers
    assert h["ce_type"] == "com.example.order.created" and h["ce_source"] == "/shop/orders"
    assert h["ce_subject"] == "order-1"
    # distributed tracing extension: the attribute and the protocol's own W3C header carry the same value
    assert h["ce_traceparent"] == h["traceparent"] == TRACEPARENT
    assert h["ce_tracestate"] == h["tracestate"] == "vendor=1"
    assert h["ce_correlationid"] == "c-9" and h["ce_appid"] == "shop"

    env = CE.encode(r, "amqp")
    assert env.headers["cloudEvents_type"] == "com.example.order.created"
    assert env.headers["cloudEvents_traceparent"] == env.headers["traceparent"] == TRACEPARENT
    assert env.properties["correlation_id"] == "c-9" and env.properties["app_id"] == "shop"
    assert env.properties["type"] == "com.example.order.created"


def test_cloudevents_on_amqp_uses_cloudevents_underscore_headers_and_properties():
    r = rec(headers={"tenant": "t1"})
    env = CE.encode(r, "amqp")
    assert env.headers == {
        "tenant": "t1",
        "cloudEvents_specversion": "1.0",
        "cloudEvents_id": str(r.message_id),
        "cloudEvents_source": "/outboxkit",
        "cloudEvents_type": "orders",
        "cloudEvents_time": "2026-12-01T13:05:07.123456Z",
    }
    assert env.properties == {"delivery_mode": 2, "message_id": str(r.message_id),
                              "content_type": "application/json", "type": "orders"}
    assert env.timestamp == CREATED


def test_cloudevents_time_is_rfc3339_utc_whatever_the_zone_and_absent_without_created_at():
    plus2 = CREATED.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert CE.encode(rec(created=plus2), "kafka").headers["ce_time"] == "2026-12-01T13:05:07.123456Z"
    whole = CREATED.replace(microsecond=0)
    assert CE.encode(rec(created=whole), "kafka").headers["ce_time"] == "2026-12-01T13:05:07Z"
    env = CE.encode(rec(created=None), "kafka")
    assert "ce_time" not in env.headers and env.timestamp is None


def test_cloudevents_drops_user_headers_that_collide_with_its_names():
    """Rows written before the writer refused these names: the codec's own values win, never two."""
    r = rec(headers={"CE_ID": "forged", "ce_type": "forged", "Content-Type": "text/plain", "traceparent": "x",
                     "ok": "1"})
    h = CE.encode(r, "kafka").headers
    assert h["ce_id"] == str(r.message_id) and h["ce_type"] == "orders"
    assert "CE_ID" not in h and "Content-Type" not in h and "traceparent" not in h
    assert h["ok"] == "1"
    a = CE.encode(rec(headers={"cloudEvents:id": "f", "CLOUDEVENTS_type": "f", "ce-id": "f", "ok": "1"}),
                  "amqp").headers
    assert set(a) == {"ok", "cloudEvents_specversion", "cloudEvents_id", "cloudEvents_source", "cloudEvents_type",
                      "cloudEvents_time"}


def test_unknown_binding_is_a_clear_error():
    for codec in (CE, DBZ):
        with pytest.raises(ConfigurationError, match="binding 'mqtt'"):
            codec.encode(rec(), "mqtt")
        with pytest.raises(ConfigurationError, match="binding 'mqtt'"):
            codec.reserved("mqtt")


# ------------------------------------------------------------------ cloudevents: what the SDK reads


def test_the_cloudevents_sdk_parses_the_kafka_record_with_our_id_twice_the_same():
    kafka = pytest.importorskip("cloudevents.core.bindings.kafka")
    r = rec(attributes={"type": "com.example.order.created", "source": "/shop", "subject": "o-1"})
    env = on_kafka(CE.encode(r, "kafka"))
    msg = kafka.KafkaMessage(headers=dict(env.headers), key=env.key, value=env.payload)
    first, second = kafka.from_binary_event(msg), kafka.from_binary_event(msg)
    assert first.get_id() == second.get_id() == str(r.message_id)
    assert first.get_type() == "com.example.order.created"
    assert first.get_source() == "/shop"
    assert first.get_subject() == "o-1"
    assert first.get_time() == CREATED
    assert first.get_datacontenttype() == "application/json"
    assert first.get_data() == {"total": 12}


def test_the_legacy_sdk_api_reads_the_same_id():
    v1kafka = pytest.importorskip("cloudevents.v1.kafka")
    r = rec()
    env = on_kafka(CE.encode(r, "kafka"))
    msg = v1kafka.KafkaMessage(headers=dict(env.headers), key=env.key, value=env.payload)
    ids = {v1kafka.from_binary(msg)["id"] for _ in range(3)}
    assert ids == {str(r.message_id)}  # no invented random id


def test_the_cloudevents_sdk_parses_the_amqp_message():
    amqp = pytest.importorskip("cloudevents.core.bindings.amqp")
    r = rec(attributes={"type": "com.example.order.created", "source": "/shop"})
    env = on_amqp(CE.encode(r, "amqp"))
    msg = amqp.AMQPMessage(properties={"content-type": env.properties["content_type"]},
                           application_properties=dict(env.headers), application_data=env.payload)
    ev = amqp.from_binary_event(msg)
    assert ev.get_id() == amqp.from_binary_event(msg).get_id() == str(r.message_id)
    assert (ev.get_type(), ev.get_source(), ev.get_time(), ev.get_data()) == (
        "com.example.order.created", "/shop", CREATED, {"total": 12})


# ------------------------------------------------------------------ cloudevents: decode


def test_cloudevents_round_trip_on_kafka():
    r = rec(headers={"tenant": "t1"}, attributes={"type": "order.created", "subject": "o-1",
                                                  "correlation_id": "c-1"})
    msg = CE.decode(on_kafka(CE.encode(r, "kafka")), "kafka")
    assert msg.id is None and dedup_id(msg) == str(r.message_id)  # from ce_id, through the default id sources
    assert msg.topic == "orders" and msg.key == "order-1" and msg.payload == r.payload
    assert msg.partition == 1 and msg.offset == 42
    assert msg.content_type == "application/json" and msg.body == {"total": 12}
    assert msg.headers["tenant"] == "t1" and msg.headers["ce_id"] == str(r.message_id)
    a = msg.attributes
    assert a["id"] == str(r.message_id) and a["specversion"] == "1.0"
    assert a["type"] == "order.created" and a["source"] == "/outboxkit" and a["subject"] == "o-1"
    assert a["time"] == "2026-12-01T13:05:07.123456Z"
    assert a["correlation_id"] == "c-1"


def test_cloudevents_round_trip_on_amqp():
    r = rec(attributes={"type": "order.created", "app_id": "shop"})
    msg = CE.decode(on_amqp(CE.encode(r, "amqp")), "amqp")
    assert msg.content_type == "application/json" and msg.body == {"total": 12}
    assert msg.delivery_tag == 3
    a = msg.attributes
    assert (a["id"], a["type"], a["source"], a["time"]) == (str(r.message_id), "order.created", "/outboxkit",
                                                           "2026-12-01T13:05:07.123456Z")
    assert a["app_id"] == "shop"


def test_decode_reads_what_the_sdk_writes():
    kafka = pytest.importorskip("cloudevents.core.bindings.kafka")
    amqp = pytest.importorskip("cloudevents.core.bindings.amqp")
    rabbitmq = pytest.importorskip("cloudevents.core.bindings.rabbitmq")
    from cloudevents.core.v1.event import CloudEvent

    event = CloudEvent(attributes={"id": "ev-1", "type": "com.example.t", "source": "/sdk", "time": CREATED,
                                   "subject": "s", "datacontenttype": "application/json"}, data={"x": 1})
    k = kafka.to_binary_event(event)
    msg = CE.decode(Envelope("t", k.key, k.value, dict(k.headers)), "kafka")
    assert (msg.attributes["id"], msg.attributes["type"], msg.attributes["source"]) == ("ev-1", "com.example.t",
                                                                                       "/sdk")
    assert msg.body == {"x": 1}
    # AMQP binding: cloudEvents_ application properties, the time as an AMQP timestamp (ms)
    a = amqp.to_binary_event(event)
    msg = CE.decode(Envelope("x", "", a.application_data, dict(a.application_properties), None,
                             {"content_type": a.properties["content-type"]}), "amqp")
    assert (msg.attributes["id"], msg.attributes["source"], dedup_id(msg)) == ("ev-1", "/sdk", "ev-1")
    assert msg.attributes["time"] == "2026-12-01T13:05:07.123000Z"
    assert msg.body == {"x": 1}
    # the knative RabbitMQ binding: ce- headers
    q = rabbitmq.to_binary_event(event)
    msg = CE.decode(Envelope("x", "", q.body, dict(q.headers), None, {"content_type": q.content_type}), "amqp")
    assert (msg.attributes["id"], msg.attributes["type"], msg.attributes["time"]) == (
        "ev-1", "com.example.t", "2026-12-01T13:05:07.123456Z")


def test_decode_accepts_the_colon_prefix_and_prefers_the_amqp_spelling():
    env = Envelope("x", "", b"hi", {"cloudEvents:id": "a", "cloudEvents:type": "t", "ce-id": "knative",
                                    "ce-source": "/k"}, None, {"content_type": "text/plain"})
    msg = CE.decode(env, "amqp")
    assert msg.attributes["id"] == "a" and msg.attributes["type"] == "t" and msg.attributes["source"] == "/k"
    assert msg.body == "hi"


def test_decode_keeps_ids_that_are_not_utf8_apart():
    one = Envelope("t", None, b"{}", {"ce_id": b"\xff\xfe\xfd\xfc"})
    two = Envelope("t", None, b"{}", {"ce_id": b"\x80\x81\x82\x83"})
    m1, m2 = CE.decode(one, "kafka"), CE.decode(two, "kafka")
    a, b = m1.attributes["id"], m2.attributes["id"]
    assert a != b and "\ufffd" not in a + b
    assert dedup_id(m1) is not None and dedup_id(m2) is not None and dedup_id(m1) != dedup_id(m2)
    d1 = DBZ.decode(Envelope("t", None, b"{}", {"id": b"\xff\xfe\xfd\xfc"}), "kafka")
    d2 = DBZ.decode(Envelope("t", None, b"{}", {"id": b"\x80\x81\x82\x83"}), "kafka")
    assert dedup_id(d1) != dedup_id(d2) and "\ufffd" not in (dedup_id(d1) or "") + (dedup_id(d2) or "")


def test_decode_of_a_message_without_cloudevents_headers_is_the_native_reading():
    env = Envelope("t", b"k", b"{}", {"message-id": b"m-1", "content-type": b"application/json"})
    msg = CE.decode(env, "kafka")
    assert msg.attributes == {} and msg.headers == {"message-id": "m-1", "content-type": "application/json"}
    assert msg.id is None  # the runner reads message-id as for the native codec
    assert msg.content_type == "application/json"


# ------------------------------------------------------------------ debezium


def test_debezium_on_kafka_is_the_outbox_event_router_layout():
    r = rec(headers={"eventType": "OrderCreated"}, attributes={"traceparent": TRACEPARENT, "type": "ignored"})
    env = DBZ.encode(r, "kafka")
    assert env.key == "order-1" and env.payload == r.payload and env.timestamp == CREATED
    assert env.headers == {"eventType": "OrderCreated", "id": str(r.message_id), "traceparent": TRACEPARENT,
                           "content-type": "application/json"}
    assert env.properties == {}


def test_debezium_on_amqp_headers_table_and_properties():
    r = rec(attributes={"correlation_id": "c-1", "type": "OrderCreated"})
    env = DBZ.encode(r, "amqp")
    assert env.headers == {"id": str(r.message_id)}
    assert env.properties == {"delivery_mode": 2, "message_id": str(r.message_id),
                              "content_type": "application/json", "correlation_id": "c-1", "type": "OrderCreated"}


def test_debezium_drops_colliding_user_headers_and_decodes_as_received():
    r = rec(headers={"ID": "forged", "other": "x"})
    env = DBZ.encode(r, "kafka")
    assert "ID" not in env.headers and env.headers["id"] == str(r.message_id)
    msg = DBZ.decode(on_kafka(env), "kafka")
    assert msg.headers["id"] == str(r.message_id) and msg.headers["other"] == "x"
    assert msg.key == "order-1" and msg.body == {"total": 12} and dedup_id(msg) == str(r.message_id)


# ------------------------------------------------------------------ reserved names


def test_reserved_names_are_lower_case_with_prefixes_marked():
    assert CE.reserved("kafka") == {"ce_*", "content-type", "traceparent", "tracestate"}
    assert CE.reserved("amqp") == {"cloudevents_*", "cloudevents:*", "ce-*", "traceparent", "tracestate"}
    assert DBZ.reserved("kafka") == {"id", "content-type", "traceparent", "tracestate"}
    assert DBZ.reserved("amqp") == {"id", "traceparent", "tracestate"}
    names = reserved_header_names()
    assert {"message-id", "content-type", "id", "traceparent", "tracestate", "ce_*", "cloudevents_*",
            "cloudevents:*"} <= names
    assert all(n == n.lower() for n in names)


@pytest.mark.parametrize("name", ["message-id", "Message-Id", "CONTENT-TYPE", "id", "ID", "traceparent",
                                  "TraceState", "ce_id", "CE_Type", "ce_anything", "cloudEvents_id",
                                  "cloudevents:source", "ce-id"])
def test_reserved_by_names_the_codec_case_insensitively(name):
    assert reserved_by(name) in ("native", "cloudevents", "debezium")
    assert is_reserved_header(name)


@pytest.mark.parametrize("name", ["tenant", "x-id", "idempotency-key", "cex", "message_id", "traceparentx"])
def test_other_headers_are_free(name):
    assert reserved_by(name) is None
    assert not is_reserved_header(name)


def test_a_registered_codec_adds_its_reserved_names():
    class Mine:
        name = "test-mine"

        def reserved(self, binding):
            return frozenset({"x-mine-id"})

    assert not is_reserved_header("X-Mine-Id")
    register_codec(Mine())
    try:
        assert is_reserved_header("X-Mine-Id") and reserved_by("x-mine-id") == "test-mine"
        assert "test-mine" in codec_names()
    finally:
        from outbox.transports import codecs

        del codecs._codecs["test-mine"]
        codecs._reserved = None


# ------------------------------------------------------------------ native: row attributes


def test_native_carries_row_attributes_as_amqp_properties_and_kafka_headers():
    native = get_codec("native")
    attrs = {"type": "OrderCreated", "correlation_id": "c-1", "app_id": "shop", "traceparent": TRACEPARENT,
             "tracestate": "v=1", "source": "/not-native", "subject": "s"}
    r = rec(attributes=attrs)
    k = native.encode(r, "kafka").headers
    assert {h: k[h] for h in ("message-type", "correlation-id", "app-id", "traceparent", "tracestate")} == {
        "message-type": "OrderCreated", "correlation-id": "c-1", "app-id": "shop", "traceparent": TRACEPARENT,
        "tracestate": "v=1"}
    assert "source" not in k and "subject" not in k
    a = native.encode(r, "amqp")
    assert (a.properties["type"], a.properties["correlation_id"], a.properties["app_id"]) == ("OrderCreated", "c-1",
                                                                                           "shop")
    assert a.headers["traceparent"] == TRACEPARENT and "correlation-id" not in a.headers
    want = {"type": "OrderCreated", "correlation_id": "c-1", "app_id": "shop", "traceparent": TRACEPARENT,
            "tracestate": "v=1"}
    assert native.decode(on_kafka(native.encode(r, "kafka")), "kafka").attributes == want
    assert native.decode(on_amqp(a), "amqp").attributes == want
    # a row without attributes: the wire format as before
    plain = native.encode(rec(), "kafka").headers
    assert set(plain) == {"message-id", "content-type"}
