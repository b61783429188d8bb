"""Pure-Python parts: ids, partitioning, serializers, identifiers, config, credential masking."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import re
import uuid

import pytest

from outbox import (
    ConfigurationError,
    DecodeError,
    InvalidIdentifier,
    JSONSerializer,
    Outbox,
    SerializationError,
    TableNames,
    partition_for,
    uuid7,
)
from outbox._redact import mask_secrets, mask_url
from outbox.config import RelayConfig
from outbox.ids import uuid_text
from outbox.leases import _ranges


@pytest.mark.parametrize("value", [uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1), uuid.UUID(int=1),
                                   uuid.UUID(int=1 << 127), *(uuid.uuid4() for _ in range(200)),
                                   *(uuid7() for _ in range(50))])
def test_uuid_text_is_str_of_the_uuid(value: uuid.UUID) -> None:
    assert uuid_text(value) == str(value)


def test_uuid7_is_version_7_and_sorts_in_creation_order() -> None:
    ids = [uuid7() for _ in range(10_000)]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    ms = ids[0].int >> 80
    now_ms = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    assert abs(now_ms - ms) < 5000


def test_partition_is_stable_and_spreads_keys() -> None:
    assert partition_for("order-1", uuid.uuid4(), 32) == partition_for("order-1", uuid.uuid4(), 32)
    parts = {partition_for(f"k{i}", uuid.uuid4(), 32) for i in range(1000)}
    assert parts == set(range(32))
    keyless = {partition_for(None, uuid.uuid4(), 8) for _ in range(200)}
    assert len(keyless) == 8


def test_json_serializer_shapes() -> None:
    s = JSONSerializer()

    @dataclasses.dataclass
    class D:
        a: int
        when: dt.date

    assert s.serialize(b"\x00\x01") == (b"\x00\x01", "application/octet-stream")
    assert s.serialize("héllo") == ("héllo".encode(), "text/plain; charset=utf-8")
    assert s.serialize(D(1, dt.date(2026, 1, 2))) == (b'{"a":1,"when":"2026-01-02"}', "application/json")
    assert s.serialize({"d": decimal.Decimal("1.10")})[0] == b'{"d":"1.10"}'
    with pytest.raises(SerializationError, match="'set'"):
        s.serialize({1, 2})
    with pytest.raises(SerializationError, match=r"nan|NaN|Out of range"):
        s.serialize(float("nan"))
    assert s.deserialize(b'{"a": 1}', "application/json") == {"a": 1}
    assert s.deserialize(b"hi", "text/plain; charset=utf-8") == "hi"
    with pytest.raises(DecodeError, match="application/json"):
        s.deserialize(b"{nope", "application/json")


@pytest.mark.parametrize("bad", ["", "1abc", "a-b", "x" * 64, "drop table;", None, 3])
def test_table_names_are_validated(bad) -> None:
    with pytest.raises(InvalidIdentifier, match="not a valid identifier"):
        TableNames(outbox=bad)


def test_table_names_must_differ_and_schema_is_checked() -> None:
    with pytest.raises(InvalidIdentifier, match="distinct"):
        TableNames(outbox="a", processed="a")
    with pytest.raises(InvalidIdentifier, match="schema"):
        TableNames(schema="public; drop")


def test_outbox_config_is_checked_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="partitions"):
        Outbox(partitions=0)
    with pytest.raises(ConfigurationError, match="max_payload_bytes"):
        Outbox(max_payload_bytes=-1)
    with pytest.raises(ConfigurationError, match="naive_datetimes"):
        Outbox(naive_datetimes="local")
    with pytest.raises(ConfigurationError, match="serializer"):
        Outbox(serializer=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="topic_pattern"):
        Outbox(topic_pattern="(")


def test_relay_config_validation_env_and_mapping() -> None:
    with pytest.raises(ConfigurationError, match="batch_size"):
        RelayConfig(batch_size=0)
    with pytest.raises(ConfigurationError, match="ordering"):
        RelayConfig(ordering="loose")
    with pytest.raises(ConfigurationError, match="min_poll_interval"):
        RelayConfig(min_poll_interval=5, poll_interval=1)
    with pytest.raises(ConfigurationError, match="unknown relay setting 'batchsize'"):
        RelayConfig.from_mapping({"batchsize": 3})
    cfg = RelayConfig.from_env({"OUTBOX_RELAY_BATCH_SIZE": "250", "OUTBOX_RELAY_NOTIFY": "yes"},
                               base={"ordering": "none"})
    assert (cfg.batch_size, cfg.notify, cfg.ordering) == (250, True, "none")
    with pytest.raises(ConfigurationError, match="not a valid int"):
        RelayConfig.from_env({"OUTBOX_RELAY_BATCH_SIZE": "many"})


def test_secrets_are_masked() -> None:
    assert mask_url("postgresql+psycopg://app:s3cret@db:5432/x") == "postgresql+psycopg://app:***@db:5432/x"
    text = mask_secrets("amqp://guest:hunter2@h:5672/%2F failed; sasl.password=topsecret, ssl.key.password: k3y")
    assert "hunter2" not in text and "topsecret" not in text and "k3y" not in text
    assert mask_url("mysql+pymysql://root@h/db") == "mysql+pymysql://root@h/db"


def test_ranges_are_compact() -> None:
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _ranges([]) == "-"


@pytest.mark.parametrize(
    ("version", "mariadb", "needed"),
    [((10, 5, 22), True, "MariaDB >= 10.6"), ((5, 7, 44), False, "MySQL >= 8.0.1")],
)
def test_old_mysql_servers_get_an_error_naming_the_version(version, mariadb, needed) -> None:
    from types import SimpleNamespace

    from outbox import UnsupportedDatabase
    from outbox.dialects import dialect_for

    conn = SimpleNamespace(dialect=SimpleNamespace(server_version_info=version, is_mariadb=mariadb))
    with pytest.raises(UnsupportedDatabase, match=re.escape(needed)):
        dialect_for("mysql").check_server(conn)  # type: ignore[arg-type]
    newer = SimpleNamespace(dialect=SimpleNamespace(server_version_info=(10, 11, 0) if mariadb else (8, 0, 36),
                                                    is_mariadb=mariadb))
    dialect_for("mariadb").check_server(newer)  # type: ignore[arg-type]


def test_unknown_dialect_is_refused_with_the_supported_list() -> None:
    from outbox import UnsupportedDatabase
    from outbox.dialects import dialect_for

    with pytest.raises(UnsupportedDatabase, match=re.escape("PostgreSQL, MySQL 8 / MariaDB >= 10.6 or SQLite")):
        dialect_for("oracle")


def test_relay_config_round_trips_through_a_mapping_with_its_optional_fields_unset() -> None:
    """The fault harness (and anyone) rebuilds a config from its own fields: None-valued optional
    fields (relay_id, ce_source, ...) mean "not set", not "an invalid string"."""
    import dataclasses

    cfg = RelayConfig(batch_size=7)
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    assert [k for k, v in values.items() if v is None], "no optional field is None: the test tests nothing"
    assert RelayConfig.from_mapping(values) == cfg
    assert RelayConfig.from_mapping({**values, "lease_ttl": "9"}).lease_ttl == 9.0
