"""The jsonl consumer runner: reads ``<topic>/messages.jsonl`` from the group's committed line,
and commits past a batch (an atomic rename of ``<topic>/<group>.offset``) only after the database
commit of its effects, as every runner must."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from consumers import DedupConsumer
from consumers._runner import RunnerCore
from outbox.incoming import IncomingMessage, id_text
from outbox.transports.base import MESSAGE_ID_HEADER, Codec, Envelope

from .publisher import read_lines

__all__ = ["JsonlRunner"]


class JsonlRunner(RunnerCore):
    def __init__(self, consumer: DedupConsumer, *, engine: sa.Engine, directory: str, topic: str, group: str,
                 codec: Codec, batch_size: int = 100, batch_timeout: float = 0.2,
                 requeue_interval: float | None = None) -> None:
        super().__init__(consumer, engine=engine, batch_size=batch_size, batch_timeout=batch_timeout,
                         requeue_interval=requeue_interval)
        self.directory = Path(directory)
        self.topic = topic
        self.codec = codec
        self.offset_file = self.directory / topic / f"{group}.offset"
        self._attempts: dict[int, tuple[int, dt.datetime | None]] = {}

    def committed(self) -> int:
        """The first line not yet settled by the group."""
        return int(self.offset_file.read_text()) if self.offset_file.exists() else 0

    def _commit(self, offset: int) -> None:
        tmp = self.offset_file.with_suffix(".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self.offset_file)

    def _message(self, line: dict[str, Any], offset: int) -> IncomingMessage:
        env = Envelope(self.topic, line["key"], line["payload"], dict(line["headers"]), partition=0, offset=offset,
                       raw=line)
        msg = self.codec.decode(env, "kafka")
        raw_id = line["headers"].get(MESSAGE_ID_HEADER)
        msg.id = id_text(raw_id) if raw_id else None
        msg.broker = "jsonl"
        msg.ordered_by_partition = True  # one file, one lane: a retry holds back what follows
        if offset in self._attempts:
            msg.attempt, msg.first_failed_at = self._attempts[offset]
        return msg

    def run(self) -> None:
        offset = self.committed()
        retry_at = 0.0
        while not self.stopping:
            self.maybe_process_requeued()
            lines = read_lines(self.directory, self.topic)[offset:offset + self.batch_size]
            if not lines or time.monotonic() < retry_at:
                self._stop.wait(self.batch_timeout)  # a file has no event to wait for: poll it
                continue
            outcomes = self.process([self._message(line, offset + i) for i, line in enumerate(lines)])
            if outcomes is None:
                break  # stopped before the commit: nothing settled
            settled = 0
            for o in outcomes:
                if not o.done:
                    m = o.message
                    self._attempts[offset + settled] = (m.attempt + 1, m.first_failed_at)
                    retry_at = time.monotonic() + (o.retry_in or 0.0)
                    break
                self._attempts.pop(offset + settled, None)
                settled += 1
            if settled:
                offset += settled
                self._commit(offset)  # after the database commit, never before
