"""The in-memory transport: :class:`MemoryPublisher`, for tests and examples (no consumer runner)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigurationError
from ..base import Codec
from .publisher import MemoryPublisher, PublishedMessage

__all__ = ["TRANSPORT", "MemoryOptions", "MemoryPublisher", "MemoryTransport", "PublishedMessage"]


@dataclass(frozen=True)
class MemoryOptions:
    """``--broker memory`` takes no options."""


class MemoryTransport:
    """``--broker memory``: messages stay in the process (target ignored)."""

    name = "memory"
    binding = "kafka"
    options = MemoryOptions
    needs_target = False

    def publisher(self, target: str, settings: Mapping[str, str], *, codec: Codec, **relay_opts: Any) -> Any:
        if settings:
            raise ConfigurationError(f"the memory transport takes no -X options (got {', '.join(sorted(settings))})")
        return MemoryPublisher(codec=codec, **relay_opts)

    def runner(self, consumer: Any, *, engine: Any, target: str, settings: Mapping[str, str], codec: Codec,
               **opts: Any) -> Any:
        raise ConfigurationError("the memory transport has no consumer runner: use --broker kafka or rabbitmq")

    def identity(self, target: str) -> str:
        return "memory"

    def describe(self, target: str) -> str:
        return "memory"


TRANSPORT = MemoryTransport()
