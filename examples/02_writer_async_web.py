"""02 - The writer in an async web handler (AsyncSession).

A tiny asyncio HTTP server (standard library only, so the example runs anywhere) whose POST /orders
handler writes the order and its outbox message in one AsyncSession transaction. The example
starts the server, sends itself two requests (one valid, one invalid) and shows what was stored.

    python examples/02_writer_async_web.py                 # SQLite via aiosqlite in a temp folder
    OUTBOX_ASYNC_DB_URL=postgresql+psycopg://postgres@127.0.0.1/test python examples/02_writer_async_web.py

SQLAlchemy's asyncio support needs ``greenlet``, and each database its async driver:
``pip install 'outboxkit[sqlite-async]'`` (aiosqlite + greenlet) for the default, and
``pip install 'outboxkit[postgresql,async]'`` (psycopg, which is async-capable, + greenlet) for PostgreSQL.
It creates its tables if they are missing and checks only the rows of its own run, so it runs on a
fresh database and again on the same one.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from outbox import MessageError, Outbox, migrations

meta = sa.MetaData()
orders = sa.Table(
    "example_async_orders", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sku", sa.String(500), nullable=False),  # room for the bad request below: the outbox rejects it
    sa.Column("qty", sa.Integer, nullable=False),
)
outbox = Outbox()


async def create_order(sessions: async_sessionmaker[AsyncSession], body: dict) -> tuple[int, dict]:
    """The handler: validate, write the order and the message together, answer."""
    try:
        async with sessions() as session, session.begin():
            result = await session.execute(orders.insert().values(sku=body["sku"], qty=body["qty"]))
            order_id = result.inserted_primary_key[0]
            message_id = outbox.add(session, "orders.created", {"order_id": order_id, **body}, key=body["sku"])
        return 201, {"order_id": order_id, "message_id": str(message_id)}
    except (KeyError, MessageError) as exc:  # nothing was committed: not the order, not the message
        return 400, {"error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # anything else is our fault, and still rolled back
        return 500, {"error": f"{type(exc).__name__}: {exc}"}


async def serve(sessions: async_sessionmaker[AsyncSession]) -> asyncio.base_events.Server:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length")), 0)
        body = json.loads(await reader.readexactly(length) or b"{}")
        status, answer = await create_order(sessions, body)
        data = json.dumps(answer).encode()
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (status, len(data), data))
        await writer.drain()
        writer.close()

    return await asyncio.start_server(on_client, "127.0.0.1", 0)


async def post(port: int, body: dict) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /orders HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    await writer.drain()
    head, _, answer = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    return {"status": int(head.split()[1]), **json.loads(answer)}


async def main() -> None:
    url = os.environ.get("OUTBOX_ASYNC_DB_URL") or f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/example.db"
    engine: AsyncEngine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: migrations.upgrade(c))
        await conn.run_sync(meta.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    server = await serve(sessions)
    port = server.sockets[0].getsockname()[1]
    valid = await post(port, {"sku": "book-1", "qty": 2})
    print("POST valid  ->", valid)
    bad = await post(port, {"sku": "x" * 300, "qty": 1})  # key over 255 bytes: InvalidKey, rolled back
    print("POST bad    ->", bad)
    broken = await post(port, {"qty": 1})  # a missing sku rolls everything back too
    print("POST broken ->", broken)
    server.close()
    await server.wait_closed()
    async with engine.connect() as conn:
        order = (await conn.execute(sa.select(orders).where(orders.c.id == valid["order_id"]))).one_or_none()
        table = outbox.tables.outbox
        n_msgs = (await conn.execute(sa.select(sa.func.count()).select_from(table)
                                     .where(table.c.message_id == uuid.UUID(valid["message_id"])))).scalar_one()
        n_bad = (await conn.execute(sa.select(sa.func.count()).select_from(orders)
                                    .where(orders.c.sku == "x" * 300))).scalar_one()
    print(f"the valid order is stored: {order is not None}, with its outbox row: {n_msgs == 1}; "
          f"orders of the bad request: {n_bad}")
    assert (valid["status"], bad["status"], broken["status"]) == (201, 400, 400)
    assert order is not None and n_msgs == 1 and n_bad == 0
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
