"""outbox._rows.decode_row on values no schema of ours lets in, but an older or hand-made one might."""

from __future__ import annotations

import dataclasses
import uuid
from types import SimpleNamespace

import pytest

from outbox._rows import RowError, decode_row
from outbox.message import OutboxRecord

MID = uuid.uuid4()


def raw(**over: object) -> SimpleNamespace:
    base = {"id": 7, "message_id": MID.hex, "topic": "orders", "key": "k", "payload": b"{}",
            "headers": '{"a": "b"}', "content_type": "application/json", "partition": 3, "attempts": 0}
    return SimpleNamespace(**{**base, **over})


def test_a_good_row_decodes_on_text_and_parsed_json_drivers() -> None:
    text = decode_row(raw(), json_as_text=True)
    parsed = decode_row(raw(headers={"a": "b"}, message_id=MID, payload=memoryview(b"{}")), json_as_text=False)
    assert text == parsed
    assert text.message_id == MID and text.headers == {"a": "b"} and text.payload == b"{}"


def test_a_decoded_row_is_an_ordinary_frozen_record() -> None:
    """decode_row builds records through a cheaper path than the frozen init: the result must be the same."""
    rec = decode_row(raw(), json_as_text=True)
    assert type(rec) is OutboxRecord
    assert rec == OutboxRecord(7, MID, "orders", "k", b"{}", {"a": "b"}, "application/json", 3, 0, None)
    assert [f.name for f in dataclasses.fields(rec)] == [f.name for f in dataclasses.fields(OutboxRecord)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.id = 8  # type: ignore[misc]
    assert dataclasses.replace(rec, id=8).id == 8 and rec.id == 7


@pytest.mark.parametrize("over, fragment", [
    ({"payload": None}, "payload must be binary data, got NULL"),
    ({"message_id": None}, "message_id must be a UUID, got None"),
    ({"message_id": b"\xff\xfe"}, "message_id must be a UUID, got binary data"),
    ({"topic": None}, "topic must be non-empty text, got NULL"),
    ({"partition": None}, "partition must be an integer between 0 and 32767, got NULL"),
    ({"attempts": True}, "attempts must be an integer"),
    ({"attempts": 1.5}, "attempts must be an integer"),
    ({"headers": b"\x80 not utf-8"}, "got invalid JSON"),
    ({"headers": '{"": "x"}'}, "empty header name"),
    ({"headers": '{"a": true}'}, "got a JSON boolean for header 'a'"),
    ({"content_type": "x" * 128}, "content_type must be at most 127 characters"),
])
def test_bad_values_name_the_row_and_the_problem(over: dict[str, object], fragment: str) -> None:
    with pytest.raises(RowError) as err:
        decode_row(raw(**over), json_as_text=True)
    assert str(err.value).startswith("row 7: ")
    assert fragment in str(err.value)


def test_parsed_json_string_is_not_parsed_again() -> None:
    """On psycopg a str in headers is a JSON string, not JSON text to parse."""
    with pytest.raises(RowError, match="got a JSON string"):
        decode_row(raw(headers='{"a": "b"}', message_id=MID), json_as_text=False)


def test_attributes_decode_on_text_and_parsed_json_drivers_and_null_is_empty() -> None:
    from outbox.message import NO_ATTRIBUTES

    assert decode_row(raw(), json_as_text=True).attributes is NO_ATTRIBUTES  # a row from before 0004
    assert decode_row(raw(attributes=None), json_as_text=True).attributes is NO_ATTRIBUTES
    text = decode_row(raw(attributes='{"type": "t", "traceparent": "00-a-b-01"}'), json_as_text=True)
    parsed = decode_row(raw(attributes={"type": "t", "traceparent": "00-a-b-01"}, headers={"a": "b"}),
                        json_as_text=False)
    assert text.attributes == parsed.attributes == {"type": "t", "traceparent": "00-a-b-01"}


@pytest.mark.parametrize("value, fragment", [
    ('{"type": 1}', "attributes must be a JSON object of strings, got a JSON number for 'type'"),
    ('["t"]', "attributes must be a JSON object of strings, got a JSON array"),
    ("{not json", "attributes must be a JSON object of strings, got invalid JSON"),
    ('{"": "x"}', "got an empty name"),
    ('{"subject": "' + "s" * 2049 + '"}', "attribute 'subject' must be at most 2048 characters"),
])
def test_bad_attributes_name_the_row_and_the_problem(value: str, fragment: str) -> None:
    with pytest.raises(RowError) as err:
        decode_row(raw(attributes=value), json_as_text=True)
    assert str(err.value).startswith("row 7: ") and fragment in str(err.value)


def test_created_at_as_microseconds_since_1970_is_that_instant_in_utc() -> None:
    """MySQL/MariaDB's claim reads created_at as an integer (``TIMESTAMPDIFF(MICROSECOND, ...)``)."""
    import datetime as dt

    for when in (dt.datetime(2026, 12, 4, 19, 40, 1, 123456, tzinfo=dt.timezone.utc),
                 dt.datetime(1000, 1, 1, tzinfo=dt.timezone.utc),
                 dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc)):
        micros = (when - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)
        got = decode_row(raw(created_at=micros), json_as_text=True).created_at
        assert got == when and got is not None and got.utcoffset() == dt.timedelta(0), when


def test_created_at_is_aware_utc_whatever_zone_the_driver_used() -> None:
    import datetime as dt
    import zoneinfo

    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    for value in (when.astimezone(zoneinfo.ZoneInfo("Etc/UTC")), when.astimezone(zoneinfo.ZoneInfo("Europe/Paris")),
                  when.replace(tzinfo=None), when.isoformat()):
        got = decode_row(raw(created_at=value), json_as_text=True).created_at
        assert got == when and got is not None and got.utcoffset() == dt.timedelta(0), value


@pytest.mark.parametrize("value, fragment", [
    ("infinity", "created_at must be a date and time between the years 1 and 9999, got 'infinity'"),
    ("10000-01-01 00:00:00+00", "got '10000-01-01 00:00:00+00'"),
    ("0000-00-00 00:00:00", "got '0000-00-00 00:00:00'"),
    (b"\xff", "got b'\\xff'"),
    (12345.5, "created_at must be a date and time, got a number"),
    (10**20, "got 100000000000000000000 microseconds from 1970"),
])
def test_unreadable_created_at_refuses_its_row_naming_the_value(value: object, fragment: str) -> None:
    """A value no datetime holds is refused (the row goes dead), not sent with the send time instead."""
    with pytest.raises(RowError) as err:
        decode_row(raw(created_at=value), json_as_text=True)
    assert str(err.value).startswith("row 7: ") and fragment in str(err.value)


def test_created_at_absent_or_null_is_no_timestamp() -> None:
    assert decode_row(raw(), json_as_text=True).created_at is None
    assert decode_row(raw(created_at=None), json_as_text=True).created_at is None
