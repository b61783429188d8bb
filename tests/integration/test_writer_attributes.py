"""Message attributes (type, source, subject, correlation_id, app_id, trace context) from ``add()`` to the
relay's records, on SQLite, PostgreSQL and MariaDB; reserved header names; the trace context capture
with and without OpenTelemetry.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from outbox import (
    ConfigurationError,
    InvalidAttribute,
    InvalidHeaders,
    MessageError,
    Outbox,
    OutgoingMessage,
    PayloadTooLarge,
    ReservedHeader,
    default_tables,
)
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.message import NO_ATTRIBUTES, OutboxRecord
from outbox.relay import Relay

T = default_tables().outbox
REPO = Path(__file__).resolve().parents[2]
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.2,
        "progress_interval": 0, "lease_ttl": 3.0}


def relay_records(engine: sa.Engine) -> list[OutboxRecord]:
    got: list[OutboxRecord] = []
    relay = Relay(engine, MemoryPublisher(), config=RelayConfig(**FAST), on_published=got.extend)
    try:
        relay.drain()
    finally:
        relay.close()
    return got


def stored_attributes(engine: sa.Engine) -> list[object]:
    with engine.connect() as c:
        return list(c.execute(sa.select(T.c.attributes).order_by(T.c.id)).scalars())


ALL = {"type": "com.example.order.placed", "source": "/shop/orders", "subject": "order-7",
       "correlation_id": "corr-\u00e9-1", "app_id": "shop"}


# ----------------------------------------------------------------------------- round trip


def test_attributes_round_trip_writer_to_relay_records(engine: sa.Engine) -> None:
    box = Outbox(source="/shop")
    plain = Outbox()
    with Session(engine) as s, s.begin():
        a = box.add(s, "orders", {"n": 1}, key="k", **ALL)
        b = box.add(s, "orders", {"n": 2}, key="k", type="t.only")  # source from Outbox(source=...)
        c = plain.add(s, "orders", {"n": 3}, key="k")  # nothing given: no attributes at all
        d, e = box.add_many(s, [OutgoingMessage("orders", {"n": 4}, key="k", subject="s4", app_id="a"),
                                {"topic": "orders", "payload": {"n": 5}, "key": "k", "correlation_id": "c5"}])
    assert stored_attributes(engine) == [ALL, {"type": "t.only", "source": "/shop"}, None,
                                         {"source": "/shop", "subject": "s4", "app_id": "a"},
                                         {"source": "/shop", "correlation_id": "c5"}]
    recs = {r.message_id: r for r in relay_records(engine)}
    assert [dict(recs[i].attributes) for i in (a, b, c, d, e)] == [
        ALL, {"type": "t.only", "source": "/shop"}, {},
        {"source": "/shop", "subject": "s4", "app_id": "a"}, {"source": "/shop", "correlation_id": "c5"}]
    assert recs[c].attributes is NO_ATTRIBUTES


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"], indirect=True)  # async drivers installed
def test_async_session_stores_attributes(engine: sa.Engine, async_db_url: str) -> None:
    box = Outbox()

    async def run() -> None:
        aeng = create_async_engine(async_db_url)
        try:
            async with AsyncSession(aeng) as s, s.begin():
                box.add(s, "orders", {"async": True}, key="a", type="t", correlation_id="c")
        finally:
            await aeng.dispose()

    asyncio.run(run())
    assert [dict(r.attributes) for r in relay_records(engine)] == [{"type": "t", "correlation_id": "c"}]


def test_hand_written_bad_attributes_dead_letter_the_row_with_a_reason(engine: sa.Engine,
                                                                         dialect_name: str) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        good = box.add(s, "orders", {"n": 1}, key="good")
        bad = box.add(s, "orders", {"n": 2}, key="bad", type="t")
    with engine.begin() as c:
        c.execute(T.update().where(T.c.message_id == bad).values(attributes={"type": 7}))
    assert [r.message_id for r in relay_records(engine)] == [good]
    with engine.connect() as c:
        status, error = c.execute(sa.select(T.c.status, T.c.last_error).where(T.c.message_id == bad)).one()
    assert status == "dead" and "attributes must be a JSON object of strings" in error


# ----------------------------------------------------------------------------- validation at the edge


@pytest.mark.parametrize("kw, error, fragment", [
    ({"type": ""}, InvalidAttribute, "type must be 1-255 UTF-8 bytes, got 0"),
    ({"type": 5}, InvalidAttribute, "type must be a str or None, got int"),
    ({"correlation_id": "c" * 256}, InvalidAttribute, "correlation_id must be 1-255 UTF-8 bytes, got 256"),
    ({"app_id": "\u00e9" * 128}, InvalidAttribute, "app_id must be 1-255 UTF-8 bytes, got 256"),
    ({"source": "s" * 2049}, InvalidAttribute, "source must be 1-2048"),
    ({"subject": "a\x00b"}, InvalidAttribute, "subject contains NUL"),
    ({"source": "/x\ud800"}, InvalidAttribute, "source contains a lone surrogate"),
    ({"headers": {"Message-ID": "x"}}, ReservedHeader, "pass message_id=... instead"),
    ({"headers": {"content-type": "x"}}, ReservedHeader, "pass content_type=... instead"),
    ({"headers": {"TraceParent": "00-x"}}, ReservedHeader, "W3C trace context"),
    ({"headers": {"tracestate": "a=b"}}, ReservedHeader, "W3C trace context"),
    ({"headers": {"ID": "1"}}, ReservedHeader, "debezium codec"),
    ({"headers": {"ce_type": "x"}}, ReservedHeader, "cloudevents codec"),
    ({"headers": {"CE_ID": "x"}}, ReservedHeader, "cloudevents codec"),
    ({"headers": {"cloudEvents_id": "x"}}, ReservedHeader, "cloudevents codec"),
    ({"headers": {"cloudevents:source": "x"}}, ReservedHeader, "cloudevents codec"),
    ({"headers": {"X-Trace": "a", "x-trace": "b"}}, ReservedHeader, "differ only in case"),
])
def test_bad_attributes_and_reserved_headers_are_refused(engine: sa.Engine, kw: dict, error: type,
                                                         fragment: str) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        with pytest.raises(error) as err:
            box.add(s, "orders", {}, **kw)
        assert fragment in str(err.value)
        assert isinstance(err.value, MessageError)
        if error is ReservedHeader:
            assert isinstance(err.value, InvalidHeaders)
            assert "reserved" in str(err.value) or "differ only in case" in str(err.value)
        with pytest.raises(error, match=r"^message #1: "):  # add_many names the message
            box.add_many(s, [OutgoingMessage("orders", {}), OutgoingMessage("orders", {}, **kw)])
        assert not s.new
    assert stored_attributes(engine) == []


def test_headers_near_reserved_names_are_fine(engine: sa.Engine) -> None:
    box = Outbox()
    ok = {"x-message-id": "1", "identity": "2", "cet": "3", "trace": "4", "cloudevents": "5"}
    with Session(engine) as s, s.begin():
        box.add(s, "orders", {}, headers=ok)
    assert [r.headers for r in relay_records(engine)] == [ok]


def test_default_headers_take_the_same_check_and_a_message_header_overrides_one_in_any_case(
        engine: sa.Engine) -> None:
    with pytest.raises(ConfigurationError, match="default_headers: header 'Content-Type' is reserved"):
        Outbox(default_headers={"Content-Type": "x"})
    with pytest.raises(ConfigurationError, match="differ only in case"):
        Outbox(default_headers={"team": "a", "Team": "b"})
    with pytest.raises(ConfigurationError, match=r"Outbox\(source=...\): source must be 1-2048"):
        Outbox(source="")
    box = Outbox(default_headers={"Team": "core", "env": "prod"})
    with Session(engine) as s, s.begin():
        box.add(s, "orders", {}, headers={"team": "billing"})
        box.add(s, "orders", {})
    assert [r.headers for r in relay_records(engine)] == [{"env": "prod", "team": "billing"},
                                                          {"Team": "core", "env": "prod"}]


def test_attributes_count_towards_the_message_size(engine: sa.Engine) -> None:
    box = Outbox(max_payload_bytes=2100)
    with Session(engine) as s, s.begin():
        box.add(s, "orders", {}, subject="s" * 2000)
        with pytest.raises(PayloadTooLarge):
            box.add(s, "orders", {}, subject="s" * 2000, source="x" * 200)


# ----------------------------------------------------------------------------- trace context


def test_active_span_stores_its_trace_context_and_no_span_stores_nothing(engine: sa.Engine) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState, use_span

    tracer = TracerProvider().get_tracer("test")
    box = Outbox()
    with Session(engine) as s, s.begin():
        box.add(s, "orders", {"n": 0})  # no span
        with tracer.start_as_current_span("place order") as span:
            box.add(s, "orders", {"n": 1}, type="t")
            ctx = span.get_span_context()
        state = SpanContext(trace_id=0x1234, span_id=0x99, is_remote=True, trace_flags=TraceFlags(1),
                            trace_state=TraceState([("vendor", "v1")]))
        with use_span(NonRecordingSpan(state)):
            box.add(s, "orders", {"n": 2})
        with tracer.start_as_current_span("off"):
            Outbox(trace_context=False).add(s, "orders", {"n": 3})
    recs = relay_records(engine)
    assert recs[0].attributes == {} and recs[3].attributes == {}
    tp = recs[1].attributes["traceparent"]
    version, trace_id, span_id, flags = tp.split("-")
    assert (version, int(trace_id, 16), int(span_id, 16), flags) == ("00", ctx.trace_id, ctx.span_id,
                                                                     f"{ctx.trace_flags:02x}")
    assert int(flags, 16) & 1  # sampled
    assert recs[1].attributes["type"] == "t" and "tracestate" not in recs[1].attributes
    assert recs[2].attributes == {"traceparent": f"00-{0x1234:032x}-{0x99:016x}-01", "tracestate": "vendor=v1"}


def test_without_opentelemetry_nothing_is_imported_and_nothing_stored(tmp_path: Path) -> None:
    """A process where ``opentelemetry`` cannot be imported (a meta path finder refuses it)."""
    db = tmp_path / "no_otel.db"
    code = textwrap.dedent(f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        import sqlalchemy as sa
        from sqlalchemy.orm import Session
        from outbox import Outbox, default_tables, migrations
        engine = sa.create_engine("sqlite:///{db}")
        migrations.upgrade(engine)
        box = Outbox()
        with Session(engine) as s, s.begin():
            box.add(s, "orders", {{}})
            box.add(s, "orders", {{}}, type="t")
        with engine.connect() as c:
            print(list(c.execute(sa.select(default_tables().outbox.c.attributes)).scalars()))
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[None, {'type': 't'}]", "[]"]
