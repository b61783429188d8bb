"""02 - The writer in an async web handler (AsyncSession).

A tiny asyncio HTTP server (standard library only, so the example runs anywhere) whose POST /orders
handler writes the order and its outbox message in one AsyncSession transaction. The example
starts the server, sends itself two requests (one valid, one invalid) and shows what was stored.

    python examples/02_writer_async_web.py                 # SQLite via aiosqlite in a temp folder
    OUTBOX_ASYNC_DB_URL=postgresql+psycopg://postgres@127.0.0.1/test python examples/02_writer_async_web.py
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from outbox import MessageError, Outbox, migrations

meta = sa.MetaData()
orders = sa.Table(
    "example_async_orders", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sku", sa.String(50), nullable=False),
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
        return 400, {"error": str(exc)}


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


async def post(port: int, body: dict) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /orders HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    await writer.drain()
    answer = (await reader.read()).split(b"\r\n\r\n", 1)[1].decode()
    writer.close()
    return answer


async def main() -> None:
    url = os.environ.get("OUTBOX_ASYNC_DB_URL") or f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/example.db"
    engine: AsyncEngine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: migrations.upgrade(c))
        await conn.run_sync(meta.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    server = await serve(sessions)
    port = server.sockets[0].getsockname()[1]
    print("POST valid  ->", await post(port, {"sku": "book-1", "qty": 2}))
    print("POST bad    ->", await post(port, {"sku": "x" * 300, "qty": 1}))  # key over 255 bytes: rolled back
    print("POST broken ->", await post(port, {"qty": 1}))  # a missing sku rolls everything back too
    server.close()
    async with engine.connect() as conn:
        n_orders = (await conn.execute(sa.select(sa.func.count()).select_from(orders))).scalar_one()
        n_msgs = (await conn.execute(sa.select(sa.func.count()).select_from(outbox.tables.outbox))).scalar_one()
    print(f"orders: {n_orders}, outbox rows: {n_msgs}")
    assert n_orders == n_msgs == 1
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
