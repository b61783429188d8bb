"""01 - The writer in a plain SQLAlchemy service.

An order and its "order placed" message are written in ONE transaction: both commit, or neither.

    python examples/01_writer_sqlalchemy.py                      # SQLite file in a temp folder
    OUTBOX_DB_URL=postgresql+psycopg://postgres@127.0.0.1/test python examples/01_writer_sqlalchemy.py
"""

from __future__ import annotations

import os
import tempfile

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


def place_order(session: Session, customer: str, total_cents: int) -> Order:
    order = Order(customer=customer, total_cents=total_cents)
    session.add(order)
    session.flush()  # the order gets its id; the outbox row is still just pending in the session
    outbox.add(
        session,
        "orders.placed",
        {"order_id": order.id, "customer": customer, "total_cents": total_cents},
        key=f"order-{order.id}",  # same key => same partition => delivered in order
        headers={"source": "example-01"},
    )
    return order


def main() -> None:
    url = os.environ.get("OUTBOX_DB_URL") or f"sqlite:///{tempfile.mkdtemp()}/example.db"
    engine = sa.create_engine(url)
    migrations.upgrade(engine)  # the same as `outbox db upgrade --db URL`
    Base.metadata.create_all(engine)

    with Session(engine) as session, session.begin():  # commit: order + message
        order_id = place_order(session, "ada", 4200).id
    print(f"committed order {order_id} and its message")

    try:
        with Session(engine) as session, session.begin():  # an error rolls back both
            place_order(session, "bob", 100)
            raise RuntimeError("payment declined")
    except RuntimeError as exc:
        print(f"rolled back: {exc}")

    with engine.connect() as conn:
        orders = conn.execute(sa.select(sa.func.count()).select_from(Order)).scalar_one()
        table = outbox.tables.outbox
        rows = conn.execute(sa.select(table.c.topic, table.c.key, table.c.payload)).all()
    print(f"orders in the database: {orders}; outbox rows waiting for the relay: {len(rows)}")
    for topic, key, payload in rows:
        print(f"  {topic} key={key} payload={bytes(payload).decode()}")
    assert orders == len(rows) == 1


if __name__ == "__main__":
    main()
