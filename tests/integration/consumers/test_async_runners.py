"""AsyncKafkaRunner and AsyncRabbitMQRunner end to end on the real brokers (PostgreSQL, async psycopg)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from consumers import AsyncDedupConsumer, AsyncKafkaRunner, AsyncRabbitMQRunner, declare_queue, list_dead_letters

from .conftest import EFFECTS

pytestmark = [pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)]


class AsyncRecorder(AsyncDedupConsumer):
    """Writes one effect row per handled message; fails for ids in ``failing``."""

    name = "test.async-recorder"
    retry_initial = 0.001
    retry_max = 0.01
    retry_jitter = 0.001
    max_attempts = 3

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.failing: set[str] = set()
        self.calls: list[str] = []

    async def handle(self, session, message):
        self.calls.append(message.id)
        await session.execute(EFFECTS.insert().values(message_id=message.id, value=str(message.body)))
        if message.id in self.failing:
            raise RuntimeError(f"handler failed for {message.id}")
        return {"seen": message.id}


async def until(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``condition`` (a sync callable, run in a thread: it reads the database) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(condition):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Running:
    """``async with Running(runner)``: ``run()`` as a task; on exit ``stop()`` and await it (its error re-raised)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.runner.run())
        return self

    async def stop(self) -> None:
        self.runner.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 60)

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None and not self.task.done():
            await self.stop()


@pytest.fixture
async def aengine(async_db_url: str):
    e = create_async_engine(async_db_url)
    yield e
    await e.dispose()


def kitems(n: int, prefix: str = "") -> list[tuple[str | None, str, bytes]]:
    return [(str(uuid.uuid4()), f"key-{i % 7}", json.dumps({"n": i, "p": prefix}).encode()) for i in range(n)]


# ------------------------------------------------------------------ Kafka


@pytest.mark.kafka
async def test_kafka_processed_duplicate_poison_and_restart(aengine, engine, effects, count_effects, produce, committed,
                                                           kafka_bootstrap, kafka_topic, kafka_config):
    group = f"g-{uuid.uuid4().hex[:8]}"
    good = kitems(30)
    poison = (str(uuid.uuid4()), "key-1", b'{"n": -1}')
    produce(kafka_topic, [*good[:10], poison, *good[10:], good[3], (None, "key-2", b'{"n": -2}')])
    consumer = AsyncRecorder()
    consumer.failing = {poison[0]}

    def runner(c):
        return AsyncKafkaRunner(c, engine=aengine, bootstrap_servers=kafka_bootstrap, topics=[kafka_topic],
                                group_id=group, config=kafka_config, batch_size=8, batch_timeout=0.2)

    async with Running(runner(consumer)) as r:
        await until(lambda: count_effects() == 30 and len(list_dead_letters(engine)) == 2, 60,
                    "30 effects and 2 dead letters")
        await until(lambda: sum(committed(group, kafka_topic).values()) == 33, 30, "every offset committed")
    s = r.runner.stats
    assert s.dead == 2 and s.retries == consumer.max_attempts - 1 and s.duplicates == 1 and s.processed == 30
    for msg_id, _, _ in good:
        assert count_effects(msg_id) == 1
    dead = {d["message_id"]: d for d in list_dead_letters(engine)}
    assert "no message id" in dead[None]["error"]
    assert dead[poison[0]]["attempts"] == consumer.max_attempts and dead[poison[0]]["source"]["broker"] == "kafka"

    # restarted in the same group: only the new messages arrive
    more = kitems(5, "more")
    produce(kafka_topic, more)
    again = AsyncRecorder()
    async with Running(runner(again)) as r2:
        await until(lambda: count_effects() == 35, 60, "35 effects")
    assert sorted(again.calls) == sorted(m[0] for m in more) and r2.runner.stats.duplicates == 0
