"""The per-dialect interface. Each database implements it once, in its own module."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import Insert


class Blocker(NamedTuple):
    """The earliest row of a (topic, key) that holds back that key's later rows under strict ordering."""

    partition: int
    topic: str
    key: str
    id: int


#: a SELECT made ready to run many times (:meth:`Dialect.prepared_select`): connection, parameters -> rows
PreparedSelect = Callable[[Connection, Mapping[str, Any] | None], Sequence[Sequence[Any]]]


def blocking_rows(table: sa.Table, due: Any, partitions: Sequence[int] | None = None) -> sa.Select[Any]:
    """``(partition, topic, key, id)`` of the earliest dead or backing-off row of each (topic, key).

    A row is *backing off* while it is pending, has been tried (``attempts > 0``) and its
    ``available_at`` is still ahead (anything but ``due``). Rows that were merely delayed by their
    writer do not block. Rows without a key are never ordered, so they neither block nor wait.
    """
    failing = sa.or_(
        table.c.status == "dead",
        sa.and_(table.c.status == "pending", table.c.available_at > due, table.c.attempts > 0),
    )
    q = sa.select(table.c.partition, table.c.topic, table.c.key, sa.func.min(table.c.id).label("id")).where(
        table.c.key.is_not(None), failing)
    if partitions is not None:
        q = q.where(table.c.partition.in_(list(partitions)))
    return q.group_by(table.c.partition, table.c.topic, table.c.key)


#: seconds a relay connection may rest in its pool and still be handed out without a ping. A relay
#: checks a connection out for every round, and at low load a round is a few round trips: SQLAlchemy's
#: ``pool_pre_ping`` would add one to each. A connection used this recently is as likely to be alive
#: as one pinged; one that broke since fails its round's first statement, which the relay retries as
#: any lost connection (HikariCP's ``aliveBypassWindowMs`` is the same rule, 500 ms by default).
PING_AFTER_IDLE = 0.5

_RETURNED_AT = "outbox_returned_at"


def _ping_when_idle(engine: Engine) -> None:
    """Ping ``engine``'s connections on checkout only when they rested :data:`PING_AFTER_IDLE` seconds
    or more (a new connection is not pinged, as with ``pool_pre_ping``); a failed ping replaces the
    connection and every other one of the pool, as ``pool_pre_ping`` does."""

    def returned(_dbapi_connection: Any, record: Any) -> None:
        record.info[_RETURNED_AT] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        at = record.info.get(_RETURNED_AT)  # the pool clears ``info`` when it reconnects
        if at is None or time.monotonic() - at < PING_AFTER_IDLE:
            return
        if not engine.dialect._do_ping_w_event(dbapi_connection):  # SQLAlchemy's own pre-ping
            raise sa.exc.InvalidatePoolError()

    sa.event.listen(engine.pool, "checkin", returned)
    sa.event.listen(engine.pool, "checkout", checkout)


class Dialect:
    """Database-specific behaviour: column types, insert-if-absent, row claiming, notifications."""

    name: ClassVar[str] = "base"
    #: the last statement :meth:`blockers` built, with what it was built for
    _blockers_select: tuple[tuple[Any, ...], PreparedSelect] | None = None
    #: ``SELECT ... FOR UPDATE SKIP LOCKED`` is available, so several relays can share the table.
    supports_skip_locked: ClassVar[bool] = False
    #: several relay processes may run at once.
    supports_concurrent_relays: ClassVar[bool] = False
    #: LISTEN/NOTIFY wake-ups.
    supports_notify: ClassVar[bool] = False

    # --- column types -------------------------------------------------------------
    @staticmethod
    def type_variants() -> dict[str, sa.types.TypeEngine[Any]]:
        """Concrete types for the portable ``payload``, ``json``, ``uuid`` and ``timestamp`` kinds."""
        return {}

    @staticmethod
    def exact_string(length: int, dialect: sa.engine.Dialect) -> sa.types.TypeEngine[Any] | None:
        """The concrete type of an :class:`~outbox.types.ExactString`, or ``None`` for plain ``VARCHAR(length)``.

        Ids and keys compare byte for byte: case, accents and trailing spaces all count. Where the
        database's default text comparison is already that (PostgreSQL, SQLite) nothing is needed.
        """
        return None

    @staticmethod
    def byte_order_string(length: int, dialect: sa.engine.Dialect) -> sa.types.TypeEngine[Any] | None:
        """The concrete type of an ``ExactString(length, byte_order=True)`` where :meth:`exact_string`
        gives none: one that also sorts byte for byte, or ``None`` where that is already the case
        (SQLite's BINARY collation, the binary collations of :meth:`exact_string` on MySQL/MariaDB)."""
        return None

    # --- errors --------------------------------------------------------------------
    #: the driver returns JSON columns as text (parsed by the toolkit), not as Python objects
    json_as_text: ClassVar[bool] = True

    @staticmethod
    def readable_timestamp(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        """``column`` (a timestamp) as the relay reads it without the driver failing on any stored value.

        The default reads it raw: the drivers here hand over a value they cannot map (MariaDB's zero
        date) as text, which :func:`outbox._rows.decode_row` refuses for its row alone.
        """
        return sa.type_coerce(column, sa.types.NullType())

    def claim_timestamp(self, column: sa.ColumnElement[Any]) -> tuple[sa.ColumnElement[Any], sa.ColumnElement[Any]]:
        """How the claim reads ``column`` (``created_at``): two columns, the value and its text.

        A row's value is read in the first (:meth:`readable_timestamp` by default), or, where the
        driver would fail the whole claim on it, as text in the second (NULL otherwise):
        :func:`outbox._rows.decode_row` takes the one that is not NULL.
        """
        return self.readable_timestamp(column), sa.null()

    def error_kind(self, exc: sa.exc.DBAPIError) -> str | None:
        """``"transient"``, ``"permanent"`` or ``None`` (let the generic rules decide) for a driver error.

        See :mod:`outbox._dberrors`: this is where a database's own error codes are read.
        """
        return None

    # --- statements ----------------------------------------------------------------
    def insert_ignore(self, table: sa.Table) -> Insert:
        """An INSERT that silently skips rows violating a unique constraint."""
        raise NotImplementedError

    def insert_new_keys(
        self, connection: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]], key_column: str
    ) -> set[Any]:
        """Insert ``rows``, skipping those whose primary key exists; return the ``key_column`` values inserted.

        Used by the dedup consumers. One statement where the database has ``INSERT ... RETURNING``
        together with insert-if-absent (PostgreSQL ``ON CONFLICT DO NOTHING RETURNING``, MariaDB
        >= 10.5 ``INSERT IGNORE ... RETURNING``, SQLite >= 3.35). Elsewhere (MySQL) the existing keys
        are read first in the same transaction, the rest inserted with INSERT IGNORE and the affected
        row count checked; on a mismatch (a concurrent writer) each row is inserted on its own.
        Duplicates never raise, so a PostgreSQL transaction is never aborted. All rows must share
        the values of the primary-key columns other than ``key_column``.
        """
        if not rows:
            return set()
        key = table.c[key_column]
        if connection.dialect.insert_executemany_returning:
            # executemany + RETURNING: SQLAlchemy batches it into multi-row INSERTs (a cached statement)
            stmt = self.insert_ignore(table).returning(key)
            return set(connection.execute(stmt, [dict(r) for r in rows]).scalars())
        if connection.dialect.insert_returning:
            return {k for r in rows for k in connection.execute(self.insert_ignore(table).values(dict(r))
                                                                .returning(key)).scalars()}
        first = rows[0]
        others = [c for c in table.primary_key.columns if c.name != key_column]
        existing = set(
            connection.execute(
                sa.select(key).where(*(c == first[c.name] for c in others), key.in_([r[key_column] for r in rows]))
            ).scalars()
        )
        rest = [dict(r) for r in rows if r[key_column] not in existing]
        if not rest:
            return set()
        inserted = connection.execute(self.insert_ignore(table).values(rest)).rowcount
        if inserted == len(rest):
            return {r[key_column] for r in rest}
        return {r[key_column] for r in rest if connection.execute(self.insert_ignore(table).values(r)).rowcount == 1}

    def rows_by_keys(
        self, connection: Connection, table: sa.Table, columns: Sequence[sa.ColumnElement[Any]],
        where: Sequence[sa.ColumnElement[bool]], key_column: str, keys: Sequence[Any],
    ) -> list[sa.Row[Any]]:
        """``columns`` of the rows of ``table`` that match ``where`` and have one of ``keys`` in ``key_column``
        (``where`` plus ``key_column`` must be unique: at most one row a key). Used for the dedup
        consumers' stored results."""
        if not keys:
            return []
        key = table.c[key_column]
        return list(connection.execute(sa.select(*columns).where(*where, key.in_(list(keys)))).all())

    def insert_new_keys_reading(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        keys: Sequence[Any],
        values: Mapping[str, Any],
        read_column: str,
    ) -> tuple[set[Any], dict[Any, Any]]:
        """Insert one row per key of ``keys`` (distinct), each with the other columns' ``values``,
        skipping keys already there, as :meth:`insert_new_keys`; and read ``read_column`` of those.

        Returns ``(inserted keys, {existing key: its read_column})``: the dedup consumer's fast path
        (the new ids, and the stored results of the duplicates). Here: the insert, then one SELECT of
        the keys not inserted (none when every key was new). PostgreSQL does both in one statement.
        """
        new = self.insert_new_keys(connection, table, [{key_column: k, **values} for k in keys], key_column)
        if len(new) == len(keys):
            return new, {}
        return new, self.read_existing(connection, table, key_column, [k for k in keys if k not in new], values,
                                       read_column)

    def update_by_keys(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        values: Mapping[str, Any],
        column: str,
        by_key: Mapping[Any, Any],
    ) -> None:
        """Set ``column`` of the row of each key of ``by_key`` (and the other primary-key columns'
        ``values``) to that key's value: the dedup consumers' stored results. Here one UPDATE a row
        (executemany); PostgreSQL does them all in one statement."""
        if not by_key:
            return
        others = [c for c in table.primary_key.columns if c.name != key_column]
        stmt = (table.update()
                .where(*(c == sa.bindparam(f"_w_{c.name}", type_=c.type) for c in others),
                       table.c[key_column] == sa.bindparam("_w_key", type_=table.c[key_column].type))
                .values({column: sa.bindparam("_w_value", type_=table.c[column].type)}))
        fixed = {f"_w_{c.name}": values[c.name] for c in others}
        connection.execute(stmt, [{**fixed, "_w_key": k, "_w_value": v} for k, v in by_key.items()])

    def inserts_keys_at_end(self, connection: Connection, table: sa.Table) -> bool:
        """Whether the dedup consumer may read the seen keys of ``table`` first and insert the new
        ones at the end of the batch with :meth:`insert_keys` (a key a concurrent transaction
        inserted meanwhile then raises there, and the consumer redoes the batch inserting first).

        Not on SQLite: its writers are serialised, so inserting first costs nothing, and a
        transaction that reads first and writes later cannot always take the write lock."""
        return False

    def insert_keys(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        values: Mapping[str, Any],
        column: str,
        by_key: Mapping[Any, Any],
    ) -> None:
        """Insert one row per key of ``by_key``: the key, ``values`` and ``column`` = the key's value
        (``None``: SQL NULL). A plain INSERT: a key already there raises the unique violation."""
        if not by_key:
            return
        connection.execute(table.insert(), [{key_column: k, **values, column: v} for k, v in by_key.items()])

    def start_insert_keys(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        values: Mapping[str, Any],
        column: str,
        by_key: Mapping[Any, Any],
    ) -> Callable[[], None] | None:
        """Send :meth:`insert_keys`'s statement without waiting for it, where the driver can: return a
        callable that waits for it and raises what :meth:`insert_keys` would have raised, or ``None``
        (the default) when the statement cannot run apart; the caller then calls :meth:`insert_keys`.

        psycopg can (an asyncio task, or a worker thread for the sync driver): the caller goes on with
        its own work (the dedup consumer's flush of the handlers' rows) while the server runs the
        insert, and the connection's next statement waits for it. Until the callable returns, only
        statements of the same transaction may follow."""
        return None

    def read_existing(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        keys: Sequence[Any],
        values: Mapping[str, Any],
        read_column: str,
    ) -> dict[Any, Any]:
        """``{key: read_column}`` of the rows of ``keys`` (and the other primary-key columns' ``values``)
        that the table holds."""
        if not keys:
            return {}
        key = table.c[key_column]
        others = [c for c in table.primary_key.columns if c.name != key_column]
        found = self.rows_by_keys(connection, table, [key, table.c[read_column]],
                                  [c == values[c.name] for c in others], key_column, keys)
        return {r[0]: r[1] for r in found}

    def read_existing_in_parts(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        parts: Sequence[Sequence[Any]],
        values: Mapping[str, Any],
        read_column: str,
    ) -> Iterator[dict[Any, Any]]:
        """:meth:`read_existing` for ``parts`` of the keys, one dict a part, in order: the caller
        handles a part's messages before it asks for the next part's rows. Each dict holds rows of
        that part's keys or of an earlier part's (the caller keeps them all), so the default reads
        every key at once for the first part and yields an empty dict for each later one.

        Where the driver can send a statement without waiting for it (psycopg), the next part's
        read goes out before a part's rows are handed over, and the server looks its keys up while
        the caller works. Until the generator is exhausted or closed, only statements of the same
        transaction may follow (they wait for the read on the connection); close it when stopping
        early: it waits for a read still under way."""
        yield self.read_existing(connection, table, key_column, [k for p in parts for k in p], values, read_column)
        for _ in parts[1:]:
            yield {}

    def ensure_transaction(self, connection: Connection) -> None:
        """Make sure the database transaction has really begun, so that a first SAVEPOINT neither
        starts it nor, on its RELEASE, commits it (a no-op where the driver begins transactions itself)."""

    def lock_name(self, connection: Connection, name: bytes) -> None:
        """Hold ``name`` until this transaction ends: another transaction locking it waits till then.

        For an insert-if-absent without a unique key (a consumer's dead letter): the first one's
        row is committed, and seen, before the second one looks. The default does nothing: SQLite
        runs one write transaction at a time, and MySQL/MariaDB's locking read of the rows looked at
        (``SELECT ... FOR UPDATE``) waits for a concurrent insert into them.
        """

    def lock_rows(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """Apply the row-claiming lock to a SELECT (``FOR UPDATE SKIP LOCKED`` where available)."""
        return select

    def prepared_select(self, select: sa.Select[Any]) -> PreparedSelect:
        """``select`` as a function that runs it on a connection, with values for its named bind
        parameters if it has any, and returns its rows: for a statement built once and run in many
        relay rounds (the lease lock, the look-ups of delayed rows and blocked keys). A dialect may run
        it past ``Connection.execute``'s per-call set-up."""

        def run(connection: Connection, params: Mapping[str, Any] | None = None) -> Sequence[Sequence[Any]]:
            return connection.execute(select, dict(params or {})).all()

        return run

    def check_server(self, connection: Connection) -> None:
        """Raise :class:`~outbox.errors.UnsupportedDatabase` if the server is too old for the relay."""

    def notify(self, connection: Connection, channel: str) -> None:  # pragma: no cover - default no-op
        """Send a wake-up notification in the current transaction, where supported."""

    def lock_claim(self, select: sa.Select[Any], table: sa.Table) -> sa.Select[Any]:
        """Lock the outbox rows a relay claims (``select`` may join ``table`` to a subquery)."""
        return select

    def claim_by_quota(
        self, connection: Connection, table: sa.Table, columns: Sequence[sa.ColumnElement[Any]],
        partitions: Sequence[int], quotas: Sequence[int], due: Any, blocked: Sequence[Blocker],
        after: Mapping[int, int] | None = None, topics: Sequence[str] | None = None,
    ) -> Sequence[Sequence[Any]] | None:
        """Claim (lock and return, as rows of ``columns`` in id order) up to ``quotas[i]`` due rows of
        ``partitions[i]``, the rows :meth:`due_ids` picks, read and locked where they are found, with
        no join back by id and no LIMIT over the whole (the quotas add up to the batch). Rows are
        indexed by position. ``None`` where the database has no such form (the relay then joins
        :meth:`due_ids` back to the table)."""
        return None

    #: SKIP LOCKED may pass over rows of partitions this relay owns even outside a lease
    #: handover (a database whose claim takes gap or next-key locks reaching into neighbouring
    #: index ranges), so every claim must be checked for gaps, not only claims from freshly taken
    #: partitions. None of ours: InnoDB under the relay's READ COMMITTED takes no gap locks.
    skip_locked_reaches_neighbours: ClassVar[bool] = False
    #: whether a relay may claim its next batch in a second transaction while the previous
    #: batch's transaction still holds its row and lease locks (no gap locks that the previous
    #: batch's marking could wait on: PostgreSQL; InnoDB's next-key locks could deadlock it)
    supports_pipelined_claims: ClassVar[bool] = False

    def blockers(self, connection: Connection, table: sa.Table, partitions: Sequence[int], due: Any) -> list[Blocker]:
        """The :class:`Blocker` of every (topic, key) of ``partitions`` that has one (see :func:`blocking_rows`).

        The statement is built once per table, partitions and ``due`` (the last one is kept: a relay
        looks its blocked keys up every few rounds, for the same partitions) and run as
        :meth:`prepared_select` runs it.
        """
        key = (table, tuple(partitions), due)
        cached = self._blockers_select
        if cached is None or cached[0] != key:
            cached = self._blockers_select = (key, self.prepared_select(blocking_rows(table, due, partitions)))
        return [Blocker(*r) for r in cached[1](connection)]

    def due_ids(
        self, table: sa.Table, partitions: Sequence[int], per_partition: int, due: Any, blocked: Sequence[Blocker],
        after: Mapping[int, int] | None = None, topics: Sequence[str] | None = None,
    ) -> sa.Subquery:
        """``(id, partition)`` of up to ``per_partition`` due rows of each partition, in id order,
        starting after ``after[partition]`` (the last id this relay published there, if any), leaving
        out the rows that come after a :class:`Blocker` of their (topic, key), and only of ``topics``
        (see :meth:`topic_filter`) when given.

        Portable form: one UNION ALL branch per partition, each an index range read; each branch
        carries only its own partition's blockers, as bound parameters. Each partition's start id
        is the bind parameter ``claim_after_<partition>`` (valued from ``after``), so a caller may
        run the statement built once again with each round's ids (:meth:`due_ids_params`).
        """
        after = after or {}
        topic_clause = self.topic_filter(table, topics)
        by_partition: dict[int, list[Blocker]] = {}
        for b in blocked:
            by_partition.setdefault(b.partition, []).append(b)
        members = []
        for p in partitions:
            q = sa.select(table.c.id, table.c.partition).where(
                table.c.partition == p, table.c.status == "pending", table.c.available_at == due,
                table.c.id > sa.bindparam(f"claim_after_{p}", after.get(p, 0), type_=sa.BigInteger()))
            # --- relay group's topics (its own clause, independent of the blocked keys below)
            if topic_clause is not None:
                q = q.where(topic_clause)
            # --- rows behind a blocker of their (topic, key)
            mine = by_partition.get(p)
            if mine:
                behind = [sa.and_(table.c.topic == b.topic, table.c.key == b.key, table.c.id > b.id) for b in mine]
                keys = sorted({b.key for b in mine})  # cheap test first: most rows' keys block nothing
                q = q.where(sa.or_(table.c.key.is_(None), table.c.key.not_in(keys), sa.not_(sa.or_(*behind))))
            sub = q.order_by(table.c.id).limit(per_partition).subquery()
            members.append(sa.select(sub.c.id, sub.c.partition))
        if len(members) == 1:
            return members[0].subquery("claimable")
        return sa.union_all(*members).subquery("claimable")

    def due_ids_params(self, partitions: Sequence[int], after: Mapping[int, int]) -> dict[str, Any]:
        """The parameters that run a statement built on :meth:`due_ids` of ``partitions`` with
        other start ids (``after``) than it was built with.

        The relay builds its claim once and runs it every round with these: a dialect that
        overrides :meth:`due_ids` overrides this too (PostgreSQL's passes its ``claim_after`` array).
        """
        return {f"claim_after_{p}": after.get(p, 0) for p in partitions}

    @staticmethod
    def topic_filter(table: sa.Table, topics: Sequence[str] | None) -> sa.ColumnElement[bool] | None:
        """Rows whose topic matches one of ``topics``: exact names, or prefixes ending in ``*``.

        ``None`` (no filter) for ``None``, an empty list or ``*``. Patterns are bound parameters;
        a prefix is matched with ``LIKE`` with its ``%`` and ``_`` escaped.
        """
        if not topics or "*" in topics:
            return None
        exact = [t for t in topics if not t.endswith("*")]
        prefixes = [t[:-1] for t in topics if t.endswith("*")]
        clauses: list[sa.ColumnElement[bool]] = []
        if exact:
            clauses.append(table.c.topic.in_(exact))
        clauses.extend(table.c.topic.startswith(p, autoescape=True) for p in prefixes)
        return sa.or_(*clauses)

    def insert_rows(self, connection: Connection, insert: Insert, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` (dicts with the same keys) in ``connection``'s transaction: one ``executemany``."""
        connection.execute(insert, rows)

    def delete_ids(self, connection: Connection, table: sa.Table, ids: Sequence[int]) -> None:
        """Delete rows by primary key ``id``, touching (and locking) no other row."""
        connection.execute(table.delete().where(table.c.id.in_(ids)))

    def update_ids(self, connection: Connection, table: sa.Table, ids: Sequence[int], values: dict[str, Any]) -> None:
        """Update rows by primary key ``id``, touching (and locking) no other row."""
        connection.execute(table.update().where(table.c.id.in_(ids)).values(**values))

    def idle_transaction_statements(self, seconds: float, dialect: sa.engine.Dialect) -> list[str]:
        """Statements that make the server end a transaction of this session idle for ``seconds``.

        Run once per new connection of the relay's own engine (:meth:`relay_engine`), never on the
        application's connections. Empty where the database has no such bound (SQLite: no server).
        """
        return []

    def relay_session_statements(self) -> list[str]:
        """Further statements for each new connection of the relay's own engine (planner settings for
        the relay's queries); never run on the application's connections."""
        return []

    def relay_engine(self, engine: Engine, idle_transaction_timeout: float) -> Engine:
        """The relay's own engine: ``engine``'s URL, driver arguments and pool listeners, on a pool of
        its own whose new connections run :meth:`idle_transaction_statements`, and whose connections
        are pinged on checkout once they have been back in the pool for :data:`PING_AFTER_IDLE`
        seconds or more.

        A relay frozen inside its claim transaction (SIGSTOP, VM pause, a host gone without a TCP
        reset) would otherwise keep its lease rows locked, and so its partitions from every other
        relay, for as long as the freeze lasts. ``engine`` itself (the application's) is untouched.
        """
        statements = self.idle_transaction_statements(idle_transaction_timeout, engine.dialect)
        if not statements:
            return engine
        statements = [*statements, *self.relay_session_statements()]
        # same creator (URL, connect_args) and listeners; the pool's own settings; the ping below
        pool = engine.pool.recreate()
        pool._pre_ping = False
        own = sa.create_engine(engine.url, pool=pool)
        _ping_when_idle(own)

        def set_bound(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                for statement in statements:
                    cursor.execute(statement)
            finally:
                cursor.close()
            dbapi_connection.commit()  # PostgreSQL's SET is transactional: keep it past a first rollback

        sa.event.listen(pool, "connect", set_bound)
        return own

    def prepare_relay_engine(self, engine: Engine) -> Engine:
        """The engine the relay should use (e.g. WAL mode on SQLite)."""
        return engine

    def maintain_partitions(self, engine: Engine, tables: Any) -> None:
        """Create the partitioned retention layout's coming partitions, where the database has that layout."""

    def start_listener(
        self, engine: Engine, channel: str, on_wake: Callable[[], None], stop: threading.Event
    ) -> threading.Thread | None:
        """Start a background wake-up listener, where the database has one; ``None`` otherwise."""
        return None
