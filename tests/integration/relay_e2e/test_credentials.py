"""Passwords in broker URLs never reach the relay's output, even while it retries a broker it cannot use."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from outbox.devbroker import free_port

from .conftest import wait_until

SECRET = "pw-S3cr3t-xyzzy"


@pytest.mark.parametrize("case", ["wrong-port", "wrong-password"])
def test_rabbitmq_password_never_in_relay_output(case, db, rabbitmq_url, start_relay):
    d = db("sqlite")
    port = free_port() if case == "wrong-port" else (urlsplit(rabbitmq_url).port or 5672)
    url = f"amqp://guest:{SECRET}@127.0.0.1:{port}/%2F"
    relay = start_relay("--db", d.url, "--rabbitmq", url, "--lease-ttl", "3", name=case, log_level="DEBUG")

    wait_until(lambda: relay.log().count("broker unavailable") >= 2, 60, "two 'broker unavailable' retries")
    assert relay.alive, "the relay gave up instead of retrying"
    assert relay.stop() == 0
    log = relay.log()
    assert SECRET not in log
    assert f"127.0.0.1:{port}" in log, "the error does not say which broker is unusable"
