"""docs/configuration.md is generated from the declared settings, and the declarations hold together.

Regenerate the page with ``python -m outbox.cli._reference > docs/configuration.md``.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from outbox.cli import _reference, build_parser, consume, relay
from outbox.cli._settings import COMMON_SETTINGS, GLOBAL_SETTINGS

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_md_is_generated_from_the_declarations() -> None:
    assert DOC.read_text(encoding="utf-8") == _reference.markdown(), (
        "docs/configuration.md is stale: run `python -m outbox.cli._reference > docs/configuration.md`")


def test_the_check_mode_fails_on_a_stale_file(tmp_path, capsys) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(_reference.markdown().replace("batch_size", "batch_sise", 1), encoding="utf-8")
    assert _reference.main(["--check", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert _reference.main(["--check", str(DOC)]) == 0


@pytest.mark.parametrize("command", [relay, consume], ids=["relay", "consume"])
def test_no_two_settings_of_a_command_share_a_flag_variable_or_key(command) -> None:
    settings = (*command.settings(), *COMMON_SETTINGS, *GLOBAL_SETTINGS)
    for what in ("flags", "env", "toml"):
        seen: dict[str, str] = {}
        for s in settings:
            values = getattr(s, what)
            for v in (values,) if isinstance(values, str) else (values or ()):
                assert v not in seen, f"{what} {v!r} declared by both {seen[v]} and {s.name}"
                seen[v] = s.name


@pytest.mark.parametrize("name", ["relay", "consume"])
def test_every_flag_of_the_daemons_is_documented(name) -> None:
    """A flag added by hand, outside the declarations, still shows up on the page."""
    parser = build_parser()
    child = parser._subparsers._group_actions[0].choices[name]
    text = _reference.markdown()
    for action in child._actions:
        for flag in action.option_strings:
            if flag in ("-h", "--help"):
                continue
            assert f"`{flag}`" in text, f"outbox {name} {flag} is missing from docs/configuration.md"


def test_the_shared_settings_are_one_declaration() -> None:
    relay_by_name = {s.name: s for s in relay.settings()}
    consume_by_name = {s.name: s for s in consume.settings()}
    for name in ("db", "table_prefix", "schema", "kafka", "rabbitmq"):
        assert relay_by_name[name] is consume_by_name[name]


def test_consumer_defaults_in_the_help_match_the_runners() -> None:
    """The consumer's defaults live in the runners; the help quotes them and must not drift."""
    from consumers import DedupConsumer
    from consumers.kafka import KafkaRunner
    from consumers.rabbitmq import RabbitMQRunner

    kafka = inspect.signature(KafkaRunner.__init__).parameters
    rabbit = inspect.signature(RabbitMQRunner.__init__).parameters
    by_name = {s.name: s for s in consume.CONSUMER_SETTINGS}
    m = re.search(r"default (\d+) on Kafka, (\d+) on RabbitMQ", by_name["batch_size"].help)
    assert m and (int(m[1]), int(m[2])) == (kafka["batch_size"].default, rabbit["batch_size"].default)
    m = re.search(r"default ([\d.]+)", by_name["batch_timeout"].help)
    assert m and float(m[1]) == kafka["batch_timeout"].default == rabbit["batch_timeout"].default
    assert f", {DedupConsumer.max_attempts})" in by_name["max_attempts"].help
    interval = by_name["requeue_interval"].default
    assert interval == kafka["requeue_interval"].default == rabbit["requeue_interval"].default
