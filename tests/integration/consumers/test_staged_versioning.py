"""Staged consumers, optimistic versions and state-machine guards on every dialect."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from consumers import IllegalTransition, StagedConsumer, StaleVersion, StateMachine, Status, stage, versioned_update
from outbox.schema import default_tables

T = default_tables()
md = sa.MetaData()
ACCOUNTS = sa.Table(
    "test_consumer_accounts", md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("balance", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)


@pytest.fixture
def accounts(engine):
    md.create_all(engine)
    with engine.begin() as c:
        c.execute(ACCOUNTS.delete())
        c.execute(ACCOUNTS.insert().values(id=1, balance=10, status="pending", version=1))
    yield ACCOUNTS
    with engine.begin() as c:
        c.execute(ACCOUNTS.delete())


class Fulfil(StagedConsumer):
    name = "test.fulfil"
    max_attempts = 1

    def __init__(self, effects):
        super().__init__()
        self.effects = effects
        self.runs: list[str] = []
        self.fail_after_reserve = True

    @stage("reserve")
    def reserve(self, session, message):
        self.runs.append("reserve")
        session.execute(self.effects.insert().values(message_id=message.id, value="reserve"))
        return {"slot": 7}

    @stage("label")
    def label(self, session, message):
        self.runs.append("label")
        if self.fail_after_reserve:
            raise RuntimeError("killed between the stages")
        session.execute(self.effects.insert().values(message_id=message.id, value="label"))
        return {"label_for": message.stage_results["reserve"]["slot"]}


def test_staged_resume(engine, effects, count_effects, make_message):
    consumer = Fulfil(effects)
    assert consumer.stage_names == ["reserve", "label"]
    m = make_message()
    [first] = consumer.process_batch(engine, [m])
    assert first.status is Status.DEAD  # max_attempts=1: the failure is final for this delivery
    with engine.connect() as c:
        stages = c.execute(sa.select(T.stages.c.stage).where(T.stages.c.message_id == m.id)).scalars().all()
    assert stages == ["reserve"]  # stage 1 committed on its own
    assert count_effects(m.id) == 1

    consumer.fail_after_reserve = False
    redelivered = make_message(m.id)
    [second] = consumer.process_batch(engine, [redelivered])
    assert second.status is Status.PROCESSED
    assert second.result == {"reserve": {"slot": 7}, "label": {"label_for": 7}}
    assert consumer.runs == ["reserve", "label", "label"]  # reserve ran once, label retried
    with engine.connect() as c:
        values = sorted(c.execute(sa.select(effects.c.value).where(effects.c.message_id == m.id)).scalars())
        assert c.execute(sa.select(sa.func.count()).select_from(T.stages)).scalar_one() == 0
    assert values == ["label", "reserve"]  # each finished stage's effect exactly once

    [third] = consumer.process_batch(engine, [make_message(m.id)])
    assert third.status is Status.DUPLICATE and third.result == second.result
    assert consumer.runs == ["reserve", "label", "label"]


def test_staged_declared_by_list(engine, effects, make_message):
    class Listed(StagedConsumer):
        name = "test.listed"
        stages = ["one", "two"]

        def one(self, session, message):
            return 1

        def two(self, session, message):
            return message.stage_results["one"] + 1

    [o] = Listed().process_batch(engine, [make_message()])
    assert o.status is Status.PROCESSED and o.result == {"one": 1, "two": 2}


def test_versioned_update(engine, accounts):
    from sqlalchemy.orm import Session

    with Session(engine) as s, s.begin():
        assert versioned_update(s, accounts, 1, 1, {"balance": 20}) == 2
    with Session(engine) as s, s.begin():
        with pytest.raises(StaleVersion, match="expected version 1, but the row is at version 2"):
            versioned_update(s, accounts, 1, 1, {"balance": 99})
        with pytest.raises(StaleVersion, match="no such row"):
            versioned_update(s, accounts, 42, 1, {"balance": 99})
    with engine.connect() as c:
        assert c.execute(sa.select(accounts.c.balance, accounts.c.version)).one() == (20, 2)


def test_state_machine_apply(engine, accounts):
    from sqlalchemy.orm import Session

    sm = StateMachine({"pending": {"paid", "cancelled"}, "paid": {"shipped"}})
    with Session(engine) as s, s.begin():
        assert sm.apply(s, accounts, 1, "paid") is True
        assert sm.apply(s, accounts, 1, "paid") is False  # repeated: no-op
        with pytest.raises(IllegalTransition, match="'paid' to 'cancelled'"):
            sm.apply(s, accounts, 1, "cancelled")
        with pytest.raises(IllegalTransition, match="no such row"):
            sm.apply(s, accounts, 2, "paid")
        assert sm.apply(s, accounts, 1, "shipped", values={"balance": 0}) is True
    with engine.connect() as c:
        assert c.execute(sa.select(accounts.c.status, accounts.c.balance)).one() == ("shipped", 0)
