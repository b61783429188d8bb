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
    m = msg(partition=2, offset=9, broker="kafka", ordered_by_partition=True)
    assert m.lane == ("orders", 2)
    assert msg(partition=2, offset=9, broker="kafka").lane is None  # lanes come from the transport's flag
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
    for bad in (None, "", "   "):
        with pytest.raises(MessageIdMissing, match="no message id"):
            c.identify(msg(id=bad))
    long = c.identify(msg(id="x" * 256))  # over-long: a stable prefix + hash, not a dead letter
    assert len(long) == 255 and long.startswith("~h:xxx") and long == c.identify(msg(id="x" * 256))
    assert c.identify(msg(id="x" * 256)) != c.identify(msg(id="x" * 257))
    assert c.identify(msg(id="a\x00b")) == "~x:a%00b"
    assert Named(message_id=lambda m: b"\xff-x").identify(msg()) == "~x:%FF-x"
    with pytest.raises(MessageIdMissing, match="no message id"):
        Named(message_id=lambda m: b"  ").identify(msg())
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


# ------------------------------------------------------------------ lossless id text (issue 10, items 1 and 2)


@pytest.mark.parametrize("a, b", [
    (b"\xff-x", b"\xfe-x"),            # both were '\ufffd-x': the second was dropped as a duplicate
    (b"\xff-x", "\ufffd-x"),
    (b"a\x00b", "a"),
    (b"a\x00b", "ab"),
    ("~x:%FF-x", b"\xff-x"),            # a valid id that looks like an escaped one stays distinct
    ("~h:" + "m" * 300, "m" * 300),
    ("m" * 300, "m" * 299 + "n"),       # two long ids that share their first 255 characters
    ("a%00b", "a\x00b"),
])
def test_id_text_is_injective(a, b):
    from consumers.message import id_text

    assert id_text(a) != id_text(b)


@pytest.mark.parametrize("value", [b"\xff-x", "a\x00b", "m" * 300, b"\x00" * 300, "é" * 254, "\udcff", "ok", ""])
def test_id_text_is_stable_and_storable(value):
    from consumers.message import id_text, storable_id

    text = id_text(value)
    assert text == id_text(value) and storable_id(text)
    assert len(text) <= 255 and "\x00" not in text
    text.encode("utf-8")  # no lone surrogate: every database driver can send it


def test_id_text_keeps_plain_ids():
    from consumers.message import id_text, text_form

    for plain in ("7f1c2d9e-0f6a-4c59-9d59-8a3c0a3c9b11", "order:42/é", "x" * 255, "a%b"):
        assert id_text(plain) == plain == id_text(plain.encode())
    assert text_form(b"\xff-x") == "~x:%FF-x" and text_form("~x:a") == "~x:~x:a"
    assert text_form("100%\x00") == "~x:100%25%00"


@pytest.mark.parametrize("value", [
    b"plain", "plain", b"", "", "order:42/\u00e9".encode(), "order:42/\u00e9", b"\xff-x", b"a\x00b", "a\x00b",
    b"~x:a", "~x:a", b"~h:a", "~h:a", "\udcff", "caf\u00e9\x00", "x" * 300, b"x" * 300,
    bytearray(b"ba"), memoryview(b"mv"), bytearray(b"\xfe"),
])
def test_header_text_is_text_form_for_bytes_and_str(value: object) -> None:
    """header_text's shortcuts for the usual bytes and str give exactly text_form's answer."""
    from outbox.incoming import header_text, text_form

    assert header_text(value) == text_form(value)  # type: ignore[arg-type]


# ------------------------------------------------------------------ error classification (outbox._dberrors)


class _Orig(Exception):
    def __init__(self, *args, sqlstate=None):
        super().__init__(*args)
        self.sqlstate = sqlstate


def _wrap(cls, orig, invalidated=False):
    import sqlalchemy as sa

    exc = cls("INSERT ...", {}, orig, connection_invalidated=invalidated)
    assert isinstance(exc, sa.exc.DBAPIError)
    return exc


def _cases():
    import sqlalchemy as sa

    e = sa.exc
    return [
        # (exception, transient, data error)
        (_wrap(e.DataError, _Orig("value too long", sqlstate="22001")), False, True),
        (_wrap(e.DataError, _Orig("NUL bytes")), False, True),
        (_wrap(e.IntegrityError, _Orig("dup", sqlstate="23505")), False, True),
        (_wrap(e.OperationalError, _Orig(1406, "Data too long for column")), False, True),
        (_wrap(e.OperationalError, _Orig(1264, "Out of range value")), False, True),
        (_wrap(e.InternalError, _Orig(1366, "Incorrect string value")), False, True),
        (_wrap(e.OperationalError, _Orig(1213, "Deadlock found")), True, False),
        (_wrap(e.OperationalError, _Orig(1205, "Lock wait timeout exceeded")), True, False),
        (_wrap(e.OperationalError, _Orig(2013, "Lost connection")), True, False),
        (_wrap(e.OperationalError, _Orig("deadlock detected", sqlstate="40P01")), True, False),
        (_wrap(e.OperationalError, _Orig("server closed the connection", sqlstate="08006")), True, False),
        (_wrap(e.OperationalError, _Orig("terminating connection", sqlstate="57P01")), True, False),
        (_wrap(e.OperationalError, _Orig("database is locked")), True, False),
        (_wrap(e.DataError, _Orig("x"), invalidated=True), True, False),
        (_wrap(e.InterfaceError, _Orig("connection already closed")), True, False),
        (_wrap(e.ProgrammingError, _Orig("relation does not exist", sqlstate="42P01")), False, False),
        (_wrap(e.OperationalError, _Orig("no such table: x")), False, False),
        (e.TimeoutError("QueuePool limit"), True, False),
        (ConnectionResetError(), True, False),
        (RuntimeError("handler bug"), False, False),
    ]


def test_database_errors_are_classified_in_one_place():
    from outbox._dberrors import is_data_error, is_transient

    for exc, transient, data in _cases():
        assert (is_transient(exc), is_data_error(exc)) == (transient, data), exc


def test_no_test_hook_in_production_code():
    """Issue 10 item 16: no environment switch makes a consumer kill itself; tests bring their own hooks."""
    import pathlib
    import re

    import consumers
    import outbox

    for path in pathlib.Path(consumers.__file__).parent.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "OUTBOX_TEST_" not in text and "SIGKILL" not in text, path
    # nor anywhere else in the shipped code (outbox/testing is the contract kit for other transports: its
    # crashes are exceptions the suite raises, not a switch in the product)
    root = pathlib.Path(outbox.__file__).parent
    for path in root.rglob("*.py"):
        if path.is_relative_to(root / "testing"):
            continue
        text = path.read_text(encoding="utf-8")
        assert "OUTBOX_TEST_" not in text, path
        assert not re.search(r"os\.kill\(\s*os\.getpid\(\)", text), f"{path} kills its own process"
