"""NativeCodec: the one owner of outboxkit's own wire format, on both bindings."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from outbox import ConfigurationError
from outbox.message import OutboxRecord
from outbox.transports.base import Envelope
from outbox.transports.codecs import NATIVE, codec_names, get_codec

MID = uuid.uuid4()
AT = dt.datetime(2022, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)


def rec(**kw: object) -> OutboxRecord:
    base: dict = {"id": 1, "message_id": MID, "topic": "orders", "key": "k", "payload": b"{}",
                  "headers": {"trace": "t1", "message-id": "forged", "content-type": "text/x"},
                  "content_type": "application/json", "created_at": AT}
    return OutboxRecord(**{**base, **kw})


def test_kafka_binding_puts_everything_in_headers_and_owns_its_names() -> None:
    env = NATIVE.encode(rec(), "kafka")
    assert (env.topic, env.key, env.payload, env.timestamp, env.properties) == ("orders", "k", b"{}", AT, {})
    assert env.headers == {"trace": "t1", "message-id": str(MID), "content-type": "application/json"}
    assert NATIVE.reserved("kafka") == {"message-id", "content-type", "message-type", "correlation-id", "app-id",
                                        "traceparent", "tracestate"}  # the last five carry row attributes
    assert "content-type" not in NATIVE.encode(rec(content_type=None, headers={}), "kafka").headers


def test_amqp_binding_uses_properties() -> None:
    env = NATIVE.encode(rec(), "amqp")
    assert env.properties == {"delivery_mode": 2, "message_id": str(MID), "content_type": "application/json"}
    assert env.headers == {"trace": "t1", "message-id": str(MID), "content-type": "text/x"}  # as before the move
    assert env.timestamp == AT


def test_decode_is_lossless_and_leaves_the_id_to_the_id_sources() -> None:
    env = Envelope("orders", b"\xffk", b"{}", {"a": b"\xfe", "content-type": b"application/json", "n": 3},
                   partition=2, offset=9)
    msg = NATIVE.decode(env, "kafka")
    assert msg.id is None and msg.key == "~x:%FFk" and msg.headers["a"] == "~x:%FE" and msg.headers["n"] == "3"
    assert msg.content_type == "application/json" and (msg.partition, msg.offset) == (2, 9)
    amqp = NATIVE.decode(Envelope("x", "rk", b"", {}, properties={"content_type": "text/plain",
                                                                   "correlation_id": "c-1", "type": "Paid"}), "amqp")
    assert amqp.content_type == "text/plain" and amqp.attributes == {"correlation_id": "c-1", "type": "Paid"}


def test_registry_and_bad_binding() -> None:
    assert "native" in codec_names() and get_codec(None) is NATIVE and get_codec("native") is NATIVE
    with pytest.raises(ConfigurationError, match=r"unknown codec .nope.; known: .*native"):
        get_codec("nope")
    with pytest.raises(ConfigurationError, match="unknown codec binding 'sqs'"):
        NATIVE.encode(rec(), "sqs")
