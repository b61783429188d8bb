"""The jsonl publisher: one line per message, the codec's envelope as JSON."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from outbox.errors import BrokerUnavailable
from outbox.message import OutboxRecord
from outbox.transports.base import Codec, Outcome, PublishResult

__all__ = ["FILE_NAME", "JsonlPublisher", "read_lines"]

FILE_NAME = "messages.jsonl"


def _header(value: str | bytes) -> dict[str, str]:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    return {"s": value}


class JsonlPublisher:
    def __init__(self, directory: str, options: Any, codec: Codec) -> None:
        self.directory = Path(directory)
        self.options = options
        self.codec = codec
        self._files: dict[str, IO[str]] = {}
        self._started = False

    def start(self) -> None:
        if self._started:
            return
        if not self.directory.is_dir():
            # the options (with the token) are never part of an error
            raise BrokerUnavailable(f"jsonl transport: {self.directory} is not a directory")
        self._started = True

    def _file(self, topic: str) -> IO[str] | None:
        f = self._files.get(topic)
        if f is None:
            folder = self.directory / topic
            if not folder.is_dir():
                return None
            f = self._files[topic] = (folder / FILE_NAME).open("a", encoding="utf-8")
        return f

    def publish(self, records: Sequence[OutboxRecord], *, timeout: float = 30.0) -> list[PublishResult]:
        self.start()
        results: list[PublishResult] = []
        failed_keys: set[str] = set()
        for rec in records:
            if rec.key is not None and rec.key in failed_keys:
                results.append(PublishResult(rec.id, Outcome.RETRY, "held back: an earlier message with this key "
                                             "failed in the same batch", held=True))
                continue
            error = self._write(rec)
            if error is None:
                results.append(PublishResult(rec.id, Outcome.DELIVERED))
            else:
                results.append(PublishResult(rec.id, Outcome.FAILED, error))
                if rec.key is not None:
                    failed_keys.add(rec.key)
        self.flush(timeout)
        return results

    def _write(self, rec: OutboxRecord) -> str | None:
        env = self.codec.encode(rec, "kafka")
        if not env.topic or "/" in env.topic or "\\" in env.topic or env.topic in (".", ".."):
            return f"UNKNOWN_TOPIC: {env.topic!r} is not a topic name"
        if len(env.payload) > self.options.max_bytes:
            return f"message size {len(env.payload)} exceeds max_bytes {self.options.max_bytes}"
        f = self._file(env.topic)
        if f is None:
            return f"UNKNOWN_TOPIC: no folder {env.topic!r} in {self.directory}"
        key = env.key.decode("utf-8", "surrogateescape") if isinstance(env.key, bytes) else env.key
        line = {
            "key": key,
            "payload": base64.b64encode(env.payload).decode("ascii"),
            "headers": {k: _header(v) for k, v in env.headers.items()},
            "timestamp": None if env.timestamp is None else env.timestamp.isoformat(),
        }
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
        return None

    def flush(self, timeout: float = 30.0) -> None:
        for f in self._files.values():
            f.flush()
            if self.options.fsync:
                os.fsync(f.fileno())

    def idle(self, timeout: float) -> None:
        """Files have no connection to serve."""

    def close(self, timeout: float = 10.0) -> None:
        files, self._files = self._files, {}
        for f in files.values():
            f.flush()
            f.close()
        self._started = False


def read_lines(directory: str | Path, topic: str) -> list[dict[str, Any]]:
    """Every message in ``topic`` as written (payload and headers decoded); for readers and tests."""
    path = Path(directory) / topic / FILE_NAME
    if not path.exists():
        return []
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.endswith("}"):
            continue  # a line being written
        line = json.loads(raw)
        line["payload"] = base64.b64decode(line["payload"])
        line["headers"] = {k: v["s"] if "s" in v else base64.b64decode(v["b64"]).decode("utf-8", "replace")
                           for k, v in line["headers"].items()}
        out.append(line)
    return out
