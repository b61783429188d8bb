"""01 - The writer in a plain SQLAlchemy service.

An order and its "order placed" message are written in ONE transaction: both commit, or neither.

    python examples/01_writer_sqlalchemy.py                      # SQLite file in a temp folder
    OUTBOX_DB_URL=postgresql+psycopg://postgres@127.0.0.1/test python examples/01_writer_sqlalchemy.py

PostgreSQL needs its driver: ``pip install 'outboxkit[postgresql]'`` (MySQL/MariaDB: ``[mysql]``).
It creates the toolkit's tables (``migrations.upgrade``) and its own ``example_orders`` table if
they are missing, so it runs on a fresh database and again on the same one: it checks only the
rows of its own run. The outbox rows stay there for a relay (example 03) to publish.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox import Outbox, migrations


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "example_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(sa.String(100))
    total_cents: Mapped[int]


outbox = Outbox()  # configured once per service: serializer, partitions, size limit, table names


def place_order(session: Session, customer: str, total_cents: int) -> tuple[Order, uuid.UUID]:
    order = Order(customer=customer, total_cents=total_cents)
    session.add(order)
    session.flush()  # the order gets its id; the outbox row is still just pending in the session
    message_id = outbox.add(
        session,
        "orders.placed",
        {"order_id": order.id, "customer": customer, "total_cents": total_cents},
        key=f"order-{order.id}",  # same key => same partition => delivered in order
        headers={"source": "example-01"},
    )
    return order, message_id


def main() -> None:
    url = os.environ.get("OUTBOX_DB_URL") or f"sqlite:///{tempfile.mkdtemp()}/example.db"
    engine = sa.create_engine(url)
    migrations.upgrade(engine)  # the same as `outbox db upgrade --db URL`
    Base.metadata.create_all(engine)
    run = uuid.uuid4().hex[:8]  # this run's customers, so that a re-run checks only its own rows

    with Session(engine) as session, session.begin():  # commit: order + message
        order, kept = place_order(session, f"ada-{run}", 4200)
        order_id = order.id
    print(f"committed order {order_id} and its message {kept}")

    dropped = None
    try:
        with Session(engine) as session, session.begin():  # an error rolls back both
            _, dropped = place_order(session, f"bob-{run}", 100)
            raise RuntimeError("payment declined")
    except RuntimeError as exc:
        print(f"rolled back: {exc} (message {dropped} is gone with the order)")

    table = outbox.tables.outbox
    with engine.connect() as conn:
        orders = conn.execute(sa.select(sa.func.count()).select_from(Order)
                              .where(Order.customer.in_([f"ada-{run}", f"bob-{run}"]))).scalar_one()
        rows = conn.execute(sa.select(table.c.message_id, table.c.topic, table.c.key, table.c.payload)
                            .where(table.c.message_id.in_([kept, dropped]))).all()
    print(f"orders of this run in the database: {orders}; their outbox rows waiting for the relay: {len(rows)}")
    for message_id, topic, key, payload in rows:
        print(f"  {message_id} {topic} key={key} payload={bytes(payload).decode()}")
    assert orders == len(rows) == 1 and rows[0].message_id == kept
    engine.dispose()


if __name__ == "__main__":
    main()
