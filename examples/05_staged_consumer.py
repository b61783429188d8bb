"""05 - A staged consumer: a step that already finished is never repeated when the message comes back.

    python examples/05_staged_consumer.py       # SQLite file example_staged.db in the current folder
    OUTBOX_DB_URL=postgresql+psycopg://postgres@127.0.0.1/test python examples/05_staged_consumer.py

The label printer fails once, the message is redelivered, and the reservation (stage 1) is not
made again. Each run uses a new message and order, so it runs again on the same database.
PostgreSQL needs ``pip install 'outboxkit[postgresql]'``.
"""

from __future__ import annotations

import os
import uuid

import sqlalchemy as sa

from consumers import IncomingMessage, StagedConsumer, stage
from outbox import migrations

metadata = sa.MetaData()
reservations = sa.Table(
    "example_reservations", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("order_id", sa.String(64), nullable=False),
)


class Fulfil(StagedConsumer):
    name = "shipping.fulfil"
    max_attempts = 1  # fail fast for the demo: the message goes to the dead letters, then is redelivered
    printer_jammed = True

    @stage("reserve")
    def reserve(self, session, message):
        result = session.execute(reservations.insert().values(order_id=message.body["order_id"]))
        print("  reserved stock")
        return {"reservation": result.inserted_primary_key[0]}

    @stage("label")
    def label(self, session, message):
        if self.printer_jammed:
            raise RuntimeError("label printer jammed")
        print(f"  printed label for reservation {message.stage_results['reserve']['reservation']}")
        return {"label": "LBL-1"}


def main() -> None:
    engine = sa.create_engine(os.environ.get("OUTBOX_DB_URL") or "sqlite:///example_staged.db")
    migrations.upgrade(engine)
    metadata.create_all(engine)
    consumer = Fulfil()
    message_id, order_id = str(uuid.uuid4()), uuid.uuid4().hex[:8]

    def deliver() -> str:
        msg = IncomingMessage(id=message_id, topic="orders", key=order_id, content_type="application/json",
                              payload=f'{{"order_id": "{order_id}"}}'.encode())
        return consumer.process_batch(engine, [msg])[0].status.value

    print("first delivery:", deliver())
    consumer.printer_jammed = False
    print("redelivery:", deliver())
    with engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(reservations)
                         .where(reservations.c.order_id == order_id)).scalar_one()
    print("reservations for the order:", n)
    assert n == 1
    engine.dispose()


if __name__ == "__main__":
    main()
