"""04 - A dedup consumer: each order is charged exactly once, however often Kafka or RabbitMQ delivers it.

Without any broker (messages made up in process, each delivered three times)::

    python examples/04_dedup_consumer.py        # SQLite file example_consumer.db in the current folder
    OUTBOX_DB_URL=postgresql+psycopg://postgres@127.0.0.1/test python examples/04_dedup_consumer.py

On a broker, from the repository root (``outbox consume`` imports ``examples.04_dedup_consumer``
from the current folder), against a database with the toolkit's tables::

    outbox db upgrade --db sqlite:///demo.db
    outbox consume examples.04_dedup_consumer:ChargeOrder --db sqlite:///demo.db \\
        --kafka localhost:9092 --topic orders --group billing
    outbox consume examples.04_dedup_consumer:ChargeOrder --db sqlite:///demo.db \\
        --rabbitmq amqp://guest:guest@localhost:5672/%2F --queue orders

It consumes JSON messages like ``{"order_id": "o-1", "total": 42}`` that carry a message id (the
relay puts it in the ``message-id`` Kafka header / the AMQP ``message_id``), until SIGTERM or Ctrl-C.
The consumer creates its own ``example_charges`` table when it first opens a session (an
application would create it with its migrations). PostgreSQL needs ``pip install 'outboxkit[postgresql]'``.
"""

from __future__ import annotations

import os
import uuid
import weakref

import sqlalchemy as sa
from sqlalchemy.orm import Session

from consumers import DedupConsumer, IncomingMessage
from outbox import migrations

metadata = sa.MetaData()
charges = sa.Table(
    "example_charges", metadata,
    sa.Column("order_id", sa.String(64), primary_key=True),
    sa.Column("amount", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
)


_ready: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


class ChargeOrder(DedupConsumer):
    name = "billing.charge-order"
    max_attempts = 5

    def session(self, engine: sa.Engine) -> Session:
        if engine not in _ready:  # the example's own table; your application has migrations for this
            metadata.create_all(engine)
            _ready.add(engine)
        return super().session(engine)

    def handle(self, session, message):
        order = message.body  # JSON decoded by content type
        session.execute(charges.insert().values(order_id=order["order_id"], amount=order["total"], status="charged"))
        return {"charge_id": f"ch_{order['order_id']}"}  # stored; duplicates get it back


def main() -> None:
    engine = sa.create_engine(os.environ.get("OUTBOX_DB_URL") or "sqlite:///example_consumer.db")
    migrations.upgrade(engine)
    consumer = ChargeOrder()
    order_id = uuid.uuid4().hex[:8]
    message_id = str(uuid.uuid4())
    for delivery in range(3):  # at-least-once: the same message three times
        msg = IncomingMessage(id=message_id, topic="orders", key=order_id, content_type="application/json",
                              payload=f'{{"order_id": "{order_id}", "total": 42}}'.encode())
        [outcome] = consumer.process(engine, msg)
        print(f"delivery {delivery + 1}: {outcome.status.value}, result {outcome.result}")
    with engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(charges).where(charges.c.order_id == order_id)
                         ).scalar_one()
    print("charges for the order:", n)
    assert n == 1
    engine.dispose()


if __name__ == "__main__":
    main()
