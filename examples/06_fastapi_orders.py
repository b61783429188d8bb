"""06 - A FastAPI service writes each order and its outbox message in one AsyncSession transaction.

``POST /orders`` inserts the order row and adds its message (``Outbox.add`` on the request's
``AsyncSession``, topic ``example.orders``) in one transaction: both commit or neither does. A relay (the in-process
``Relay``; in production the ``outbox relay`` daemon) publishes the committed messages to Kafka,
keyed by customer, so each customer's orders stay in order. The example starts the service with
uvicorn on a free port, sends it orders with httpx (valid ones, one that the outbox refuses and one
that FastAPI's validation refuses), waits until the relay has published this run's messages, prints
what happened and exits 0 (1 if something is missing after ``OUTBOX_EXAMPLE_DEADLINE`` seconds,
default 60)::

    pip install 'outboxkit[examples]'          # fastapi, uvicorn, httpx, faststream[kafka], aiosqlite, tansu
    python examples/06_fastapi_orders.py       # SQLite (aiosqlite) in a temp folder + the bundled broker

    pip install 'outboxkit[examples,postgresql,async]'
    OUTBOX_ASYNC_DB_URL=postgresql+psycopg://postgres@127.0.0.1/test \\
    OUTBOX_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python examples/06_fastapi_orders.py

``OUTBOX_ASYNC_DB_URL`` takes an async SQLAlchemy URL (``postgresql+psycopg``, ``postgresql+asyncpg``,
``sqlite+aiosqlite``, ``mysql+asyncmy`` with ``[examples,mysql,async]``); the relay, which is not
asyncio, gets the same database through the matching sync driver. Without
``OUTBOX_KAFKA_BOOTSTRAP_SERVERS`` the example starts the bundled Kafka-protocol broker (tansu). The
topic is ``OUTBOX_EXAMPLE_TOPIC`` (default ``example.orders``); ``OUTBOX_EXAMPLE_ORDERS`` orders are
sent (default 20). It creates its tables if they are missing and checks only the rows of its own run,
so it runs on a fresh database and again on the same one. examples/07_faststream_consumer.py is the
other side: a consumer of such records.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import sqlalchemy as sa
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from outbox import MessageError, Outbox, migrations
from outbox.brokers import KafkaPublisher
from outbox.config import RelayConfig
from outbox.devbroker import kafka_or_dev_broker
from outbox.message import OutboxRecord
from outbox.relay import Relay

N = int(os.environ.get("OUTBOX_EXAMPLE_ORDERS", "20"))
TOPIC = os.environ.get("OUTBOX_EXAMPLE_TOPIC", "example.orders")
DEADLINE = float(os.environ.get("OUTBOX_EXAMPLE_DEADLINE", "60"))
SYNC_DRIVERS = {"aiosqlite": "sqlite", "asyncpg": "postgresql+psycopg", "asyncmy": "mysql+pymysql",
                "aiomysql": "mysql+pymysql"}

meta = sa.MetaData()
orders = sa.Table(
    "example_fastapi_orders", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("customer", sa.String(500), nullable=False),  # room for the refused request below
    sa.Column("sku", sa.String(64), nullable=False),
    sa.Column("qty", sa.Integer, nullable=False),
)
outbox = Outbox()


# ------------------------------------------------------------------ the service
class NewOrder(BaseModel):
    customer: str
    sku: str = Field(min_length=1, max_length=64)
    qty: int = Field(gt=0)


async def session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as s:
        yield s


app = FastAPI(title="orders")


@app.post("/orders", status_code=201)
async def create_order(order: NewOrder, db: Annotated[AsyncSession, Depends(session)]) -> dict[str, object]:
    """The order and its message in one transaction; the outbox validates before anything is written."""
    try:
        async with db.begin():
            result = await db.execute(orders.insert().values(**order.model_dump()))
            order_id = result.inserted_primary_key[0]
            message_id = outbox.add(db, TOPIC, {"order_id": order_id, **order.model_dump()}, key=order.customer)
    except MessageError as exc:  # e.g. a key over 255 bytes: nothing committed, not the order, not the message
        raise HTTPException(400, f"{type(exc).__name__}: {exc}") from None
    return {"order_id": order_id, "message_id": str(message_id)}


# ------------------------------------------------------------------ the example around it
def sync_url(url: str) -> sa.URL:
    """The relay is not asyncio: the same database through the sync driver."""
    parsed = sa.make_url(url)
    return parsed.set(drivername=SYNC_DRIVERS.get(parsed.get_driver_name(), parsed.drivername))


class Published:
    """Message ids the relay reports as published (``on_published``, on its own thread), awaitable."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ids: set[str] = set()
        self.changed = asyncio.Event()

    def __call__(self, records: list[OutboxRecord]) -> None:
        self.loop.call_soon_threadsafe(self._add, [str(r.message_id) for r in records])

    def _add(self, ids: list[str]) -> None:
        self.ids.update(ids)
        self.changed.set()

    async def wait_for(self, wanted: set[str]) -> None:
        while not wanted <= self.ids:
            self.changed.clear()
            await self.changed.wait()


@contextlib.asynccontextmanager
async def serving(engine: AsyncEngine) -> AsyncIterator[str]:
    """uvicorn in this process on a free port; yields the base URL."""
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # uvicorn offers no event for this
        if task.done():
            task.result()  # raises what stopped it
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def run(servers: str) -> int:
    url = os.environ.get("OUTBOX_ASYNC_DB_URL") or f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/example.db"
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: migrations.upgrade(c))
        await conn.run_sync(meta.create_all)
    run_id = uuid.uuid4().hex[:8]  # this run's customers start with it

    published = Published(asyncio.get_running_loop())
    relay_engine = sa.create_engine(sync_url(url))
    publisher = KafkaPublisher(bootstrap_servers=servers, config={"allow.auto.create.topics": True},
                               auto_create_topics=True)
    relay = Relay(relay_engine, publisher, config=RelayConfig(poll_interval=0.2), on_published=published)
    relay_thread = threading.Thread(target=relay.run, name="relay")
    relay_thread.start()
    try:
        async with serving(engine) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
            answers = [await http.post("/orders", json={"customer": f"{run_id}-customer-{i % 3}", "sku": f"sku-{i}",
                                                        "qty": 1 + i % 4}) for i in range(N)]
            refused = await http.post("/orders", json={"customer": "x" * 300, "sku": "sku-x", "qty": 1})
            invalid = await http.post("/orders", json={"customer": f"{run_id}-customer-0", "sku": "", "qty": 0})
        created = [a.json() for a in answers if a.status_code == 201]
        print(f"POST /orders: {len(created)} of {N} created (201); a 300-byte customer key: {refused.status_code} "
              f"{refused.json()['detail'][:40]}...; an empty sku and qty 0: {invalid.status_code}")
        wanted = {c["message_id"] for c in created}
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(published.wait_for(wanted), DEADLINE)
        print(f"the relay published {len(wanted & published.ids)} of this run's {len(wanted)} messages to "
              f"{TOPIC!r} (relay totals: published {relay.stats.published}, dead {relay.stats.dead})")
    finally:
        relay.stop()  # what SIGTERM does in `outbox relay`
        await asyncio.to_thread(relay_thread.join)
        relay_engine.dispose()

    table = outbox.tables.outbox
    async with engine.connect() as conn:
        stored = (await conn.execute(sa.select(sa.func.count()).select_from(orders)
                                     .where(orders.c.customer.like(f"{run_id}-%")))).scalar_one()
        refused_rows = (await conn.execute(sa.select(sa.func.count()).select_from(orders)
                                           .where(orders.c.customer == "x" * 300))).scalar_one()
        waiting = (await conn.execute(sa.select(sa.func.count()).select_from(table)
                                      .where(table.c.key.like(f"{run_id}-%")))).scalar_one()
    await engine.dispose()
    print(f"orders of this run in the database: {stored}; refused orders stored: {refused_rows}; "
          f"this run's outbox rows left (published rows are deleted): {waiting}")
    ok = (len(created) == stored == N and (refused.status_code, invalid.status_code) == (400, 422)
          and refused_rows == 0 and wanted <= published.ids and waiting == 0)
    print("every order committed with its message, and every message published" if ok else "UNEXPECTED result")
    return 0 if ok else 1


def main() -> int:
    given = os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS")
    with kafka_or_dev_broker(given) as servers:
        if not given:
            print(f"started the bundled Kafka-protocol broker on {servers}")
        return asyncio.run(run(servers))


if __name__ == "__main__":
    sys.exit(main())
