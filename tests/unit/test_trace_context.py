"""Trace context: the native codec's traceparent/tracestate headers, the consumer's "process" span
(OpenTelemetry SDK, in-memory exporter, SQLite), and nothing imported without OpenTelemetry."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from consumers import DedupConsumer, IncomingMessage, Status
from outbox.message import OutboxRecord
from outbox.transports.base import Envelope
from outbox.transports.codecs import NATIVE

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TS = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
ROOT = Path(__file__).resolve().parents[2]


def record(**attributes: str) -> OutboxRecord:
    return OutboxRecord(id=1, message_id=uuid.uuid4(), topic="orders", key="k", payload=b"{}",
                        headers={"x-user": "u"}, content_type="application/json",
                        created_at=dt.datetime.now(dt.timezone.utc), attributes=attributes)


@pytest.mark.parametrize("binding", ["kafka", "amqp"])
def test_native_codec_sends_trace_headers_and_decodes_them_into_attributes(binding: str) -> None:
    env = NATIVE.encode(record(traceparent=TP, tracestate=TS, type="order.placed"), binding)
    assert env.headers["traceparent"] == TP and env.headers["tracestate"] == TS
    assert env.headers["x-user"] == "u"
    # what a broker hands back: bytes on Kafka, str (or bytes) in an AMQP table
    wire = {k: (v.encode() if binding == "kafka" and isinstance(v, str) else v) for k, v in env.headers.items()}
    back = Envelope(env.topic, env.key, env.payload, wire, properties=env.properties)
    msg = NATIVE.decode(back, binding)
    assert msg.attributes["traceparent"] == TP and msg.attributes["tracestate"] == TS
    assert msg.headers["traceparent"] == TP  # the headers stay as they came


@pytest.mark.parametrize("binding", ["kafka", "amqp"])
def test_no_trace_context_no_trace_headers_and_the_names_are_reserved(binding: str) -> None:
    assert not {"traceparent", "tracestate"} & set(NATIVE.encode(record(), binding).headers)
    assert {"traceparent", "tracestate"} <= NATIVE.reserved(binding)
    msg = NATIVE.decode(Envelope("orders", b"k", b"{}", {"x": b"1"}), binding)
    assert "traceparent" not in msg.attributes


# ----------------------------------------------------------------------------- the consumer's span
@pytest.fixture(scope="module")
def exporter():
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exp = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    return exp


class Handler(DedupConsumer):
    name = "test.trace-unit"
    max_attempts = 1

    def handle(self, session, message):
        from opentelemetry import trace

        self.inside = trace.get_current_span().get_span_context()
        if message.body.get("fail"):
            raise RuntimeError("handler failed, url amqp://guest:s3cret@host/")
        return None


def incoming(payload: bytes = b"{}", **attributes: str) -> IncomingMessage:
    return IncomingMessage(id=str(uuid.uuid4()), topic="orders", key="k", payload=payload, partition=2, offset=41,
                           content_type="application/json", broker="kafka", consumer_group="billing",
                           attributes=dict(attributes))


@pytest.mark.parametrize("dialect_name", ["sqlite"], indirect=True)
@pytest.mark.parametrize("savepoints", ["on-failure", "always"])
def test_handle_runs_in_a_process_span_child_of_and_linked_to_the_producer(exporter, engine: sa.Engine,
                                                                           savepoints: str) -> None:
    from opentelemetry.trace import SpanKind

    exporter.clear()
    consumer = Handler(savepoints=savepoints)
    m = incoming(traceparent=TP, tracestate=TS)
    (out,) = consumer.process_batch(engine, [m])
    assert out.status is Status.PROCESSED
    (span,) = exporter.get_finished_spans()
    assert span.name == "process orders" and span.kind is SpanKind.CONSUMER
    assert span.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert span.parent is not None and span.parent.span_id == 0xB7AD6B7169203331 and span.parent.is_remote
    assert [link.context.span_id for link in span.links] == [0xB7AD6B7169203331]
    assert span.context.trace_state.get("congo") == "t61rcWkgMzE"
    assert consumer.inside.span_id == span.context.span_id  # current inside handle(): user spans nest under it
    a = span.attributes
    assert (a["messaging.system"], a["messaging.operation.type"], a["messaging.operation.name"]) == (
        "kafka", "process", "process")
    assert (a["messaging.destination.name"], a["messaging.message.id"], a["messaging.consumer.group.name"]) == (
        "orders", m.id, "billing")
    assert (a["messaging.destination.partition.id"], a["messaging.kafka.offset"], a["outboxkit.consumer"]) == (
        "2", 41, "test.trace-unit")


@pytest.mark.parametrize("dialect_name", ["sqlite"], indirect=True)
def test_no_or_bad_trace_context_gives_a_root_span_and_a_failure_is_recorded_without_secrets(exporter,
                                                                                             engine: sa.Engine) -> None:
    from opentelemetry.trace import StatusCode

    exporter.clear()
    consumer = Handler()
    outs = consumer.process_batch(engine, [incoming(), incoming(traceparent="00-zz-bad-01"),
                                           incoming(b'{"fail": true}', traceparent=TP)])
    assert [o.status for o in outs] == [Status.PROCESSED, Status.PROCESSED, Status.DEAD]
    spans = exporter.get_finished_spans()
    ok = [s for s in spans if s.status.status_code is not StatusCode.ERROR]
    assert all(s.parent is None and not s.links for s in ok) and len(ok) >= 2
    # the fast path's try and the savepoint redo's try each ran handle(), so each has its (failed) span
    failed = [s for s in spans if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 2 and {s.context.trace_id for s in failed} == {0x0AF7651916CD43DD8448EB211C80319C}
    assert {s.attributes["error.type"] for s in failed} == {"RuntimeError"}
    text = repr([(s.status.description, [dict(e.attributes) for e in s.events]) for s in failed])
    assert "handler failed" in text and "s3cret" not in text


# ----------------------------------------------------------------------------- without OpenTelemetry
BLOCKED = textwrap.dedent('''
    import sys, importlib.abc

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Block())

    import sqlalchemy as sa
    from outbox import migrations
    from consumers import DedupConsumer, IncomingMessage

    engine = sa.create_engine("sqlite:///" + sys.argv[1])
    migrations.upgrade(engine)
    seen = []

    class C(DedupConsumer):
        name = "test.no-otel"
        def handle(self, session, message):
            seen.append(message.id)

    for savepoints in ("on-failure", "always"):
        msg = IncomingMessage(id=savepoints, topic="orders", key=None, payload=b"{}", broker="kafka",
                              attributes={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        out = C(savepoints=savepoints).process_batch(engine, [msg])
        assert out[0].status.value == "processed", out
    assert seen == ["on-failure", "always"], seen
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
    assert not loaded, loaded
    print("ok")
''')


def test_without_opentelemetry_nothing_is_imported_and_handle_still_runs(tmp_path: Path) -> None:
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "db.sqlite")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


API_ONLY = textwrap.dedent('''
    import sys
    import sqlalchemy as sa
    from opentelemetry import trace
    from outbox import _tracing, migrations
    from consumers import DedupConsumer, IncomingMessage

    engine = sa.create_engine("sqlite:///" + sys.argv[1])
    migrations.upgrade(engine)
    inside = []

    class C(DedupConsumer):
        name = "test.api-only"
        def handle(self, session, message):
            inside.append(trace.get_current_span().get_span_context().is_valid)

    def run(mid):
        msg = IncomingMessage(id=mid, topic="orders", key=None, payload=b"{}", broker="kafka",
                              attributes={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        assert C().process_batch(engine, [msg])[0].status.value == "processed"

    run("before")  # the API alone, no provider: no span is started
    assert _tracing.process_spans() is None and inside == [False], inside
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())  # set after the consumer began: the next batch is traced
    run("after")
    assert inside == [False, True], inside
    print("ok")
''')


def test_with_the_api_but_no_tracer_provider_no_span_is_started_until_one_is_set(tmp_path: Path) -> None:
    script = tmp_path / "api_only.py"
    script.write_text(API_ONLY)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "db.sqlite")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
