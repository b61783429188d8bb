"""Pure-Python parts of the consumers package: messages, ids, settings, state machine."""

from __future__ import annotations

import pytest

import consumers
from consumers import (
    ConfigurationError,
    DecodeError,
    DedupConsumer,
    IllegalTransition,
    IncomingMessage,
    MessageIdMissing,
    StagedConsumer,
    StateMachine,
    content_hash,
    stage,
)
from outbox.cli import main


class Named(DedupConsumer):
    name = "unit.named"

    def handle(self, session, message):
        return None


def msg(**kw):
    base = {"id": "m-1", "topic": "orders", "key": "k", "payload": b'{"a": 1}', "content_type": "application/json"}
    return IncomingMessage(**{**base, **kw})


def test_body_is_decoded_lazily_by_content_type():
    assert msg().body == {"a": 1}
    assert msg(payload=b"hi", content_type="text/plain; charset=utf-8").body == "hi"
    assert msg(payload=b"\x00\x01", content_type=None).body == b"\x00\x01"
    bad = msg(payload=b"{oops")
    with pytest.raises(DecodeError):
        _ = bad.body


def test_lane_and_source():
    m = msg(partition=2, offset=9, broker="kafka")
    assert m.lane == ("orders", 2)
    assert m.source == {"broker": "kafka", "topic": "orders", "partition": 2, "offset": 9}
    assert msg(delivery_tag=3, broker="rabbitmq", redelivered=True).lane is None


def test_content_hash_is_unambiguous():
    h = content_hash("t", "k", b"p")
    assert len(h) == 64 and h == content_hash("t", "k", b"p")
    assert h != content_hash("t", None, b"p") != content_hash("t", "", b"p")
    assert content_hash("ab", "c", b"") != content_hash("a", "bc", b"")


def test_identify():
    c = Named()
    assert c.identify(msg()) == "m-1"
    for bad in (None, "", "   ", "x" * 256):
        with pytest.raises(MessageIdMissing, match="no message id"):
            c.identify(msg(id=bad))
    assert Named(id_strategy="content-hash").identify(msg(id=None)) == content_hash("orders", "k", b'{"a": 1}')
    assert Named(message_id=lambda m: m.headers.get("x")).identify(msg(headers={"x": "custom"})) == "custom"
    with pytest.raises(MessageIdMissing):
        Named(message_id=lambda m: 42).identify(msg())


def test_settings_are_checked_at_construction():
    class NoName(DedupConsumer):
        pass

    with pytest.raises(ConfigurationError, match="has no name"):
        NoName()
    with pytest.raises(ConfigurationError, match="consumer name"):
        Named(name="bad name!")
    with pytest.raises(ConfigurationError, match="max_attempts"):
        Named(max_attempts=0)
    with pytest.raises(ConfigurationError, match="id_strategy"):
        Named(id_strategy="md5")
    with pytest.raises(ConfigurationError, match="savepoints"):
        Named(savepoints="never")
    with pytest.raises(ConfigurationError, match="retry_initial"):
        Named(retry_initial=-1)


def test_retry_delay_grows_and_is_capped():
    c = Named(retry_initial=1.0, retry_max=5.0, retry_jitter=0.0)
    assert [c.retry_delay(n) for n in (1, 2, 3, 4, 10)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_state_machine_transition():
    sm = StateMachine({"pending": {"paid", "cancelled"}, "paid": {"shipped"}})
    assert sm.transition("pending", "paid") is True
    assert sm.transition("paid", "paid") is False
    with pytest.raises(IllegalTransition, match="cannot go from 'shipped' to 'paid'"):
        sm.transition("shipped", "paid")
    with pytest.raises(IllegalTransition, match="unknown state"):
        sm.transition("pending", "teleported")
    with pytest.raises(ConfigurationError):
        StateMachine({"a": "b"})


def test_staged_declarations():
    class Two(StagedConsumer):
        name = "unit.two"

        @stage("first")
        def a(self, session, message): ...

        @stage("second")
        def b(self, session, message): ...

    assert Two().stage_names == ["first", "second"]

    class NoStages(StagedConsumer):
        name = "unit.none"

    with pytest.raises(ConfigurationError, match="no stages"):
        NoStages()

    class Dup(StagedConsumer):
        name = "unit.dup"

        @stage("same")
        def a(self, session, message): ...

        @stage("same")
        def b(self, session, message): ...

    with pytest.raises(ConfigurationError, match="duplicate stage"):
        Dup()


def test_runner_settings_are_checked(tmp_path):
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(ConfigurationError, match="batch_size"):
        consumers.KafkaRunner(Named(), engine=engine, bootstrap_servers="x:1", topics=["t"], group_id="g",
                              batch_size=0)
    with pytest.raises(ConfigurationError, match=r"enable\.auto\.commit"):
        consumers.KafkaRunner(Named(), engine=engine, bootstrap_servers="x:1", topics=["t"], group_id="g",
                              config={"enable.auto.commit": True})
    with pytest.raises(ConfigurationError, match="topics"):
        consumers.KafkaRunner(Named(), engine=engine, bootstrap_servers="x:1", topics=[], group_id="g")
    with pytest.raises(ConfigurationError, match="prefetch"):
        consumers.RabbitMQRunner(Named(), engine=engine, url="amqp://u:secret@h/", queue="q", batch_size=10,
                                 prefetch=5)
    with pytest.raises(ConfigurationError, match="DedupConsumer"):
        consumers.RabbitMQRunner(object(), engine=engine, url="amqp://h/", queue="q")  # type: ignore[arg-type]


def test_consume_cli_errors(capsys):
    assert main(["consume", "nosuchmodule_xyz:C", "--db", "sqlite://", "--kafka", "h:1", "--topic", "t",
                 "--group", "g"]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert main(["consume", "x:C", "--db", "sqlite://"]) == 2
    assert "exactly one broker" in capsys.readouterr().err
    assert main(["consume", "x:C", "--db", "sqlite://", "--rabbitmq", "amqp://u:hunter2@h/"]) == 2
    err = capsys.readouterr().err
    assert "--queue" in err and "hunter2" not in err


def test_public_api():
    for name in consumers.__all__:
        assert getattr(consumers, name) is not None
