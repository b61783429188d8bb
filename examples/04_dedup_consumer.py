"""A dedup consumer: each order is charged exactly once, however often Kafka or RabbitMQ delivers it.

Run it against a database with the toolkit's tables (``outbox db upgrade --db URL``):

    outbox consume examples.04_dedup_consumer:ChargeOrder --db sqlite:///demo.db \\
        --kafka localhost:9092 --topic orders --group billing

or, without any broker, ``python examples/04_dedup_consumer.py`` (SQLite, messages made up in process).
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from consumers import DedupConsumer, IncomingMessage
from outbox import migrations

metadata = sa.MetaData()
charges = sa.Table(
    "example_charges", metadata,
    sa.Column("order_id", sa.String(64), primary_key=True),
    sa.Column("amount", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
)


class ChargeOrder(DedupConsumer):
    name = "billing.charge-order"
    max_attempts = 5

    def handle(self, session, message):
        order = message.body  # JSON decoded by content type
        session.execute(charges.insert().values(order_id=order["order_id"], amount=order["total"], status="charged"))
        return {"charge_id": f"ch_{order['order_id']}"}  # stored; duplicates get it back


def main() -> None:
    engine = sa.create_engine("sqlite:///example_consumer.db")
    migrations.upgrade(engine)
    metadata.create_all(engine)
    consumer = ChargeOrder()
    order_id = uuid.uuid4().hex[:8]
    message_id = str(uuid.uuid4())
    for delivery in range(3):  # at-least-once: the same message three times
        msg = IncomingMessage(id=message_id, topic="orders", key=order_id, content_type="application/json",
                              payload=f'{{"order_id": "{order_id}", "total": 42}}'.encode())
        [outcome] = consumer.process(engine, msg)
        print(f"delivery {delivery + 1}: {outcome.status.value}, result {outcome.result}")
    with engine.connect() as conn:
        print("charges for the order:", conn.execute(sa.select(sa.func.count()).select_from(charges)
                                                     .where(charges.c.order_id == order_id)).scalar_one())


if __name__ == "__main__":
    main()
