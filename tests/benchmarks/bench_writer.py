"""Scenario 4: the writer's overhead. A 1-row business transaction (ORM session: add an order,
commit) with and without one outbox message (``Outbox.add`` in the same session), in alternating
blocks of ``--block`` transactions so drift (other load on the machine) hits both sides alike.

Target: time with / time without <= 1.15.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox import Outbox


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "bench_orders"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=True)
    customer: Mapped[str] = mapped_column(sa.String(64))
    amount: Mapped[int] = mapped_column(sa.Integer)
    note: Mapped[str] = mapped_column(sa.String(255))


def main() -> None:
    p = b.parser(__doc__ or "", n=10_000)
    p.add_argument("--block", type=int, default=100, help="transactions per alternating block")
    args = b.parse(p)
    outbox = Outbox()
    payload = b.payload_bytes(0)
    with b.bench_database(args.db) as engine:
        Base.metadata.create_all(engine)

        def tx(i: int, with_message: bool) -> None:
            with Session(engine) as s, s.begin():
                s.add(Order(customer=f"c{i % 1000}", amount=i, note="benchmark order"))
                if with_message:
                    outbox.add(s, "orders", payload, key=f"c{i % 1000}")

        for i in range(200):  # warm up both paths (pool, statement caches)
            tx(i, i % 2 == 0)
        per_block: dict[bool, list[float]] = {False: [], True: []}
        totals = {False: 0.0, True: 0.0}
        i = 0
        blocks = max(1, args.n // args.block)
        for blk in range(blocks):
            order = (False, True) if blk % 2 == 0 else (True, False)
            for with_message in order:
                t0 = time.perf_counter()
                for _ in range(args.block):
                    tx(i, with_message)
                    i += 1
                took = time.perf_counter() - t0
                totals[with_message] += took
                per_block[with_message].append(took / args.block)
        with engine.connect() as conn:
            outbox_rows = conn.execute(sa.text("SELECT count(*) FROM outbox_messages")).scalar_one()
        if outbox_rows != blocks * args.block + 100:
            raise SystemExit(f"{outbox_rows} outbox rows, expected {blocks * args.block + 100}")

    tx_n = blocks * args.block
    without_us = totals[False] / tx_n * 1e6
    with_us = totals[True] / tx_n * 1e6
    med_ratio = statistics.median(w / wo for w, wo in zip(per_block[True], per_block[False], strict=True))
    b.emit("writer_db", args.db)
    b.emit("writer_transactions_each", tx_n)
    b.emit("writer_without_outbox_us_per_tx", without_us)
    b.emit("writer_with_outbox_us_per_tx", with_us)
    b.emit("writer_with_vs_without_ratio", b.ratio(with_us, without_us))
    b.emit("writer_with_vs_without_block_median_ratio", med_ratio)


if __name__ == "__main__":
    main()
