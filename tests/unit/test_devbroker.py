"""kafka_or_dev_broker: the given servers untouched, or a bundled broker that lives exactly as long as the block."""

from __future__ import annotations

import socket

from outbox.devbroker import kafka_or_dev_broker


def _listening(servers: str) -> bool:
    host, port = servers.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def test_given_servers_are_used_as_they_are() -> None:
    with kafka_or_dev_broker("kafka-a:9092,kafka-b:9092") as servers:
        assert servers == "kafka-a:9092,kafka-b:9092"


def test_without_servers_a_bundled_broker_runs_for_the_block() -> None:
    for blank in (None, ""):
        with kafka_or_dev_broker(blank) as servers:
            assert servers.startswith("127.0.0.1:")
            assert _listening(servers)
        assert not _listening(servers)


def test_stop_is_quick_while_clients_are_connected(monkeypatch) -> None:
    """tansu's graceful shutdown waits for its clients' connections; it keeps everything in memory, so
    stop() ends it after a short grace instead of waiting (it took 5 s with a producer connected)."""
    import time

    from confluent_kafka import Producer

    from outbox.devbroker import STOP_GRACE, DevKafkaBroker

    monkeypatch.setenv("STORAGE_ENGINE", "s3://not-here/")  # the broker stays in memory whatever the environment
    broker = DevKafkaBroker().start()
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "log_level": 0})
    producer.produce("stop-test", b"x")
    assert producer.flush(20) == 0, "the message was not delivered"
    proc = broker._proc
    started = time.monotonic()
    broker.stop()
    took = time.monotonic() - started
    assert proc is not None and proc.poll() is not None and not broker.running
    assert not _listening(broker.bootstrap_servers)
    assert took < STOP_GRACE + 1.5, f"stop() took {took:.2f} s"
