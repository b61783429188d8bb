"""``--broker jsonl``: a transport that appends messages to JSON-lines files, one folder per topic.

The example third-party transport of docs/transports.md: everything it needs is in this folder,
and one entry point line (``pyproject.toml`` next to it) registers it. The target is a directory;
a topic is a subdirectory of it that must exist (as a Kafka topic or an AMQP exchange must), and
each message is a line of ``<topic>/messages.jsonl``. Its consumer runner reads a topic's file as a
group, whose committed position is ``<topic>/<group>.offset``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from outbox.errors import ConfigurationError
from outbox.transports.base import Codec

from .publisher import JsonlPublisher

__all__ = ["TRANSPORT", "JsonlOptions", "JsonlPublisher", "JsonlTransport", "parse_options"]


@dataclass(frozen=True)
class JsonlOptions:
    """``-X key=value`` settings of ``--broker jsonl``: every one declared, typed and validated."""

    max_bytes: int = field(default=1_000_000, metadata={"help": "largest payload accepted; bigger is FAILED"})
    fsync: bool = field(default=False, metadata={"help": "fsync each file after every batch"})
    token: str | None = field(default=None, metadata={"help": "an access token (never shown in any output)",
                                                      "secret": True})


def parse_options(settings: Mapping[str, str]) -> JsonlOptions:
    known = JsonlOptions.__dataclass_fields__
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigurationError(f"unknown -X option(s) for --broker jsonl: {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    if "max_bytes" in settings:
        raw = str(settings["max_bytes"])
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigurationError(f"-X max_bytes must be a positive integer, got {raw!r}")
        values["max_bytes"] = int(raw)
    if "fsync" in settings:
        raw = str(settings["fsync"]).strip().lower()
        if raw not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigurationError(f"-X fsync must be true or false, got {raw!r}")
        values["fsync"] = raw in ("true", "1", "yes")
    if "token" in settings:
        values["token"] = str(settings["token"])
    return JsonlOptions(**values)


class JsonlTransport:
    name = "jsonl"
    binding = "kafka"  # headers-only: the codec puts the message id and content type in headers
    options = JsonlOptions
    consume_requires = ("topics", "group")

    def publisher(self, target: str, settings: Mapping[str, str], *, codec: Codec, **relay_opts: Any) -> JsonlPublisher:
        return JsonlPublisher(target, parse_options(settings), codec)

    def runner(self, consumer: Any, *, engine: Any, target: str, settings: Mapping[str, str], codec: Codec,
               topics: Any = None, group_id: str | None = None, batch_size: int = 100, batch_timeout: float = 0.2,
               **opts: Any) -> Any:
        from .runner import JsonlRunner

        if settings:
            raise ConfigurationError(f"the jsonl consumer takes no -X options (got {', '.join(sorted(settings))})")
        topic_list = [topics] if isinstance(topics, str) else list(topics or [])
        if len(topic_list) != 1 or not group_id:
            raise ConfigurationError("the jsonl consumer reads one topic as one group: give --topic and --group")
        return JsonlRunner(consumer, engine=engine, directory=target, topic=topic_list[0], group=group_id,
                           codec=codec, batch_size=batch_size, batch_timeout=batch_timeout)

    def identity(self, target: str) -> str:
        return f"jsonl:{target}"[:255]

    def describe(self, target: str) -> str:
        return f"JSON-lines files in {target}"


TRANSPORT = JsonlTransport()
