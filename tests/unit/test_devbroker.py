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
