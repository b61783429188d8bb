"""07 - A FastStream Kafka subscriber that charges each order exactly once through an AsyncDedupConsumer.

The subscriber's handler turns FastStream's message into ours (``message_from_kafka``, the same
codec decode as ``outbox consume``), awaits ``consumer.process(engine, message)`` and commits the
offset (``msg.ack()``) only after a final outcome; for a RETRY it waits ``outcome.retry_in`` and
nacks (FastStream seeks back, Kafka redelivers the record). The example publishes six records the
way the relay does (a ``message-id`` header): an order, the same order again (a duplicate: the
stored result comes back), an order whose charge fails once (retry, then processed), a record that
is not JSON (dead-lettered at once), an order whose charge always fails (retried ``max_attempts``
times, then dead-lettered) and a last order, charged after the failures before it; it waits until each has
a final outcome, prints them, checks the charges and dead-letter tables and exits 0 (1 on failure or after
``OUTBOX_EXAMPLE_DEADLINE`` seconds, default 60)::

    pip install 'outboxkit[examples]'            # fastapi, uvicorn, httpx, faststream[kafka], aiosqlite, tansu
    python examples/07_faststream_consumer.py    # SQLite (aiosqlite) in a temp folder + the bundled broker

    pip install 'outboxkit[examples,postgresql,async]'
    OUTBOX_ASYNC_DB_URL=postgresql+psycopg://postgres@127.0.0.1/test \\
    OUTBOX_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python examples/07_faststream_consumer.py

``OUTBOX_ASYNC_DB_URL`` takes any async SQLAlchemy URL (``postgresql+psycopg``,
``postgresql+asyncpg``, ``sqlite+aiosqlite``, ``mysql+asyncmy`` with ``[examples,async]``). Without
``OUTBOX_KAFKA_BOOTSTRAP_SERVERS`` it starts the bundled Kafka-protocol broker (tansu). The topic is
``OUTBOX_EXAMPLE_TOPIC`` (default: a new ``example-charges-<run>`` topic per run), the consumer group
``OUTBOX_EXAMPLE_GROUP`` (default ``billing-async``). The example creates its tables if they are
missing and checks only the records of its own run, so it runs on a fresh database and again on the
same one (on a reused topic, a new group also reads the records of earlier runs: they come back as
duplicates and are committed past).

**The ack rule**: commit the offset (or ack) only after ``process`` returned an outcome with
``outcome.done`` (processed, duplicate, dead): the effects, the processed row and any dead letter
have then committed together. If the process dies before the ack, Kafka redelivers the record and
it comes back as a duplicate; nothing is charged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import uuid
from typing import Any

import sqlalchemy as sa
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from consumers import AsyncDedupConsumer, IncomingMessage, Outcome, message_from_kafka
from outbox import migrations
from outbox.devbroker import kafka_or_dev_broker

DEADLINE = float(os.environ.get("OUTBOX_EXAMPLE_DEADLINE", "60"))
GROUP = os.environ.get("OUTBOX_EXAMPLE_GROUP", "billing-async")

metadata = sa.MetaData()
charges = sa.Table(
    "example_async_charges", metadata,
    sa.Column("order_id", sa.String(64), primary_key=True),  # a second charge of an order would fail here
    sa.Column("amount", sa.Integer, nullable=False),
)


class PaymentGatewayBusy(Exception):
    """A transient failure: the consumer retries it (RETRY with ``retry_in``), then dead-letters it."""


class ChargeOrder(AsyncDedupConsumer):
    name = "billing.charge-order-async"
    max_attempts = 3
    retry_initial = 0.2  # the example's backoff; the default starts at 0.5 s

    def __init__(self, flaky: set[str], down: set[str]) -> None:
        super().__init__()
        self.flaky = flaky  # orders whose first try fails (the gateway is busy)
        self.down = down  # orders whose every try fails: dead-lettered after max_attempts

    async def handle(self, session: AsyncSession, message: IncomingMessage) -> Any:
        order = message.body  # JSON by content type; not-JSON raises DecodeError, dead-lettered without retries
        if order["order_id"] in self.down or (order["order_id"] in self.flaky and message.attempt == 1):
            raise PaymentGatewayBusy("the payment gateway is busy, try again")
        await session.execute(charges.insert().values(order_id=order["order_id"], amount=order["total"]))
        return {"charge_id": f"ch_{order['order_id']}"}  # stored with the message id; duplicates get it back


async def undecoded(msg: KafkaMessage) -> bytes:
    """FastStream's decoder would parse JSON itself and fail on a bad record before our handler sees it:
    the codec behind ``message_from_kafka`` decodes, so a bad record gets its dead letter."""
    return msg.body


def subscribe(broker: KafkaBroker, topic: str, engine: AsyncEngine, consumer: ChargeOrder,
              outcomes: asyncio.Queue[Outcome]) -> None:
    """The FastStream subscriber: process, then ack (commit) on a final outcome, nack on a RETRY."""
    next_try: dict[tuple[int, int], int] = {}  # (partition, offset) -> number of its next try, across redeliveries

    @broker.subscriber(topic, group_id=GROUP, ack_policy=AckPolicy.MANUAL, auto_offset_reset="earliest",
                       decoder=undecoded, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    async def on_charge(msg: KafkaMessage) -> None:
        message = message_from_kafka(msg, group_id=GROUP)
        where = (message.partition or 0, message.offset or 0)
        message.attempt = next_try.get(where, 1)  # a redelivered record goes on counting up to max_attempts
        try:
            outcome = await consumer.process(engine, message)
        except Exception:  # database trouble: nothing committed, so the record must come again
            await asyncio.sleep(1.0)  # not at once: an outage would make that a busy loop
            await msg.nack()
            raise
        if outcome.done:
            next_try.pop(where, None)
            await msg.ack()  # only now: the transaction has committed
            # (ack commits the consumer's positions on all its partitions: right for FastStream's default of one
            # record at a time; with max_workers > 1 it could commit past a record still being processed)
        else:  # RETRY: nothing of the handler committed; wait, then have Kafka redeliver it
            next_try[where] = message.attempt  # process() counted it up for the next try
            await asyncio.sleep(outcome.retry_in or 0)
            await msg.nack()
        await outcomes.put(outcome)


async def publish(broker: KafkaBroker, topic: str, records: list[tuple[str, bytes]]) -> None:
    """Records as the relay writes them: the outbox message id in the ``message-id`` header."""
    for message_id, payload in records:
        await broker.publish(payload, topic, key=b"orders", partition=0,
                             headers={"message-id": message_id, "content-type": "application/json"})


def describe(outcome: Outcome) -> str:
    text = f"{outcome.status.value}"
    if outcome.result is not None:
        text += f", result {outcome.result}"
    if outcome.error is not None:
        text += f" ({type(outcome.error).__name__})"
    return text


async def run(servers: str) -> int:
    url = os.environ.get("OUTBOX_ASYNC_DB_URL") or f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/example.db"
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: migrations.upgrade(c))
        await conn.run_sync(metadata.create_all)

    run_id = uuid.uuid4().hex[:8]
    topic = os.environ.get("OUTBOX_EXAMPLE_TOPIC") or f"example-charges-{run_id}"
    first, flaky, down, last = (f"{run_id}-{n}" for n in range(1, 5))
    ids = {name: str(uuid.uuid4()) for name in ("first", "flaky", "poison", "down", "last")}
    records = [
        (ids["first"], json.dumps({"order_id": first, "total": 42}).encode()),
        (ids["first"], json.dumps({"order_id": first, "total": 42}).encode()),  # redelivered: a duplicate
        (ids["flaky"], json.dumps({"order_id": flaky, "total": 7}).encode()),
        (ids["poison"], b"{not json"),
        (ids["down"], json.dumps({"order_id": down, "total": 9}).encode()),
        (ids["last"], json.dumps({"order_id": last, "total": 5}).encode()),
    ]
    labels = ["order 1", "order 1 again", "order 2 (gateway busy once)", "not JSON", "order 3 (gateway always busy)",
              "order 4"]

    consumer = ChargeOrder(flaky={flaky}, down={down})
    outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
    quiet = logging.getLogger("example.faststream")
    quiet.setLevel(logging.WARNING)  # FastStream's per-message lines off; its warnings and errors still show
    broker = KafkaBroker(servers, client_id=f"example-{run_id}", logger=quiet)
    subscribe(broker, topic, engine, consumer, outcomes)
    seen: list[Outcome] = []
    async with broker:
        await publish(broker, topic, records)
        await broker.start()

        async def settle() -> None:
            while sum(o.done for o in seen) < len(records):
                outcome = await outcomes.get()
                if outcome.message.id in ids.values():  # a reused topic also holds records of earlier runs
                    seen.append(outcome)

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(settle(), DEADLINE)

    by_offset: dict[int, list[Outcome]] = {}  # each record's tries, in the order they were published
    for o in seen:
        by_offset.setdefault(o.message.offset or 0, []).append(o)
    histories = [tries for _, tries in sorted(by_offset.items())]
    histories += [[]] * (len(labels) - len(histories))  # records that got no outcome before the deadline
    for label, tries in zip(labels, histories, strict=False):
        print(f"{label}: " + (" -> ".join(describe(o) for o in tries) or "no outcome"))
    dead = consumer.tables.dead_letters
    async with engine.connect() as conn:
        mine = (await conn.execute(sa.select(charges.c.order_id).where(charges.c.order_id.like(f"{run_id}-%"))
                                   )).scalars().all()
        letters = (await conn.execute(sa.select(dead.c.message_id, dead.c.attempts, dead.c.error).where(
            dead.c.consumer == consumer.name, dead.c.message_id.in_(ids.values())).order_by(dead.c.id))).all()
    await engine.dispose()
    print(f"charges of this run: {len(mine)} ({', '.join(sorted(mine))})")
    for letter in letters:  # what `outbox dead list` shows; `outbox dead requeue` sends one through again
        print(f"dead letter: {letter.attempts} tries, {letter.error.split(':')[0]}")

    statuses = [[o.status.value for o in tries] for tries in histories]
    expected = [["processed"], ["duplicate"], ["retry", "processed"], ["dead"], ["retry", "retry", "dead"],
                ["processed"]]
    ok = statuses == expected and sorted(mine) == [first, flaky, last] \
        and [(r.message_id, r.attempts) for r in letters] == [(ids["poison"], 1), (ids["down"], 3)] \
        and histories[1][0].result == {"charge_id": f"ch_{first}"}  # the duplicate got the stored result
    print("all records settled as expected" if ok else f"UNEXPECTED outcomes: {statuses}")
    return 0 if ok else 1


def main() -> int:
    given = os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS")
    with kafka_or_dev_broker(given) as servers:
        if not given:
            print(f"started the bundled Kafka-protocol broker on {servers}")
        return asyncio.run(run(servers))


if __name__ == "__main__":
    sys.exit(main())
