"""Relay settings: keyword-only, checked at construction, loadable from TOML and environment."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .schema import ALL_TOPICS, DEFAULT_GROUP, GROUP_LENGTH, TOPIC_LENGTH, TOPIC_PATTERNS_LENGTH
from .writer import DEFAULT_PARTITIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ORDERING_MODES", "RelayConfig", "load_toml", "parse_topic_patterns"]

ORDERING_MODES = ("strict", "none")
_GROUP_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{GROUP_LENGTH - 1}}}")

#: longest interval setting: a retry scheduled further out would overflow the datetime columns
MAX_SECONDS = 365 * 86400


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """How a relay claims, publishes and retries. Every field has a production-sane default."""

    batch_size: int = 1000
    """Rows claimed and published per round."""
    poll_interval: float = 1.0
    """Longest idle wait between claims (seconds). Busy relays claim again at once."""
    min_poll_interval: float = 0.01
    """First idle wait; doubles up to ``poll_interval`` while nothing is found."""
    max_attempts: int = 12
    """Publish attempts before a row is marked dead."""
    backoff_initial: float = 1.0
    """Seconds before the first retry of a row; doubles per attempt, with jitter."""
    backoff_max: float = 300.0
    ordering: str = "strict"
    """``strict``: a failing or dead message holds back later messages of the same key.
    ``none``: later messages pass it."""
    delete_published: bool = True
    """Delete rows once published (default). False keeps them as ``published`` (audit mode)."""
    partitions: int = DEFAULT_PARTITIONS
    """Partition count of the writers; relays extend it if they find rows of higher partitions."""
    lease_ttl: float = 15.0
    """A relay that has not renewed its leases for this long loses them."""
    publish_timeout: float = 30.0
    """Longest wait for the broker's verdict on one batch."""
    shutdown_timeout: float = 30.0
    """On SIGTERM/SIGINT, longest wait for outstanding confirms before leaving."""
    notify: bool = False
    """Wake up on PostgreSQL NOTIFY (the writer must use ``Outbox(notify=True)``)."""
    relay_id: str | None = None
    """Stable name of this relay in ``outbox status`` (default host:pid:random)."""
    progress_interval: float = 10.0
    """Seconds between progress log lines (0 disables them)."""
    group: str = DEFAULT_GROUP
    """Relay group. The relays of a group share the partitions among themselves, publish to one
    broker and must all be given the same ``topics``; each group leases the partitions on its own."""
    topics: tuple[str, ...] = (ALL_TOPICS,)
    """Topics this relay's group publishes: exact names, or prefixes ending in ``*`` (``orders.*``);
    ``*`` (the default) is every topic. A comma-separated string is accepted too."""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive_int("batch_size", self.batch_size, 1, 100_000)
        _positive_int("max_attempts", self.max_attempts, 1, 1_000_000)
        _positive_int("partitions", self.partitions, 1, 32767)
        for name in ("poll_interval", "min_poll_interval", "backoff_initial", "backoff_max", "lease_ttl",
                     "publish_timeout", "shutdown_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= MAX_SECONDS:
                raise ConfigurationError(f"{name} must be a positive number of seconds up to {MAX_SECONDS:,} "
                                         f"(one year), got {v!r}")
        if self.min_poll_interval > self.poll_interval:
            raise ConfigurationError(
                f"min_poll_interval ({self.min_poll_interval}) must not exceed poll_interval ({self.poll_interval})"
            )
        if self.ordering not in ORDERING_MODES:
            raise ConfigurationError(f"ordering must be one of {ORDERING_MODES}, got {self.ordering!r}")
        if self.lease_ttl < 1.0:
            raise ConfigurationError(f"lease_ttl must be at least 1 s, got {self.lease_ttl}")
        if self.relay_id is not None:
            _relay_id(self.relay_id)
        if not isinstance(self.group, str) or not _GROUP_RE.fullmatch(self.group):
            raise ConfigurationError(
                f"group must be 1-{GROUP_LENGTH} letters, digits, '.', '_' or '-' (starting with a letter or "
                f"digit), got {self.group!r}"
            )
        object.__setattr__(self, "topics", parse_topic_patterns(self.topics))

    @property
    def renew_interval(self) -> float:
        return self.lease_ttl / 3.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RelayConfig:
        """Build from a mapping (TOML ``[relay]`` table, env vars); unknown keys are an error."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigurationError(f"unknown relay setting {key!r}; known: {', '.join(sorted(known))}")
            kwargs[name] = _coerce(name, raw, known[name].type)
        return cls(**kwargs)

    @classmethod
    def env_values(cls, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The ``OUTBOX_RELAY_<FIELD>`` variables that are set, by field name (not yet validated)."""
        env = os.environ if environ is None else environ
        out = {}
        for f in dataclasses.fields(cls):
            var = f"OUTBOX_RELAY_{f.name.upper()}"
            if var in env:
                out[f.name] = env[var]
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, base: Mapping[str, Any] | None = None) -> RelayConfig:
        """``OUTBOX_RELAY_BATCH_SIZE=500`` style variables override ``base``."""
        return cls.from_mapping({**dict(base or {}), **cls.env_values(environ)})


def parse_topic_patterns(value: object) -> tuple[str, ...]:
    """Validate and normalise topic patterns: exact names, or prefixes ending in ``*``.

    Accepts a comma-separated string or a sequence of strings. Returns them sorted and without
    duplicates; ``("*",)`` when ``*`` (every topic) is among them.
    """
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise ConfigurationError(f"topics must be a comma-separated string or a list of strings, got {value!r}")
    patterns = sorted({v.strip() for v in items})
    if not patterns or patterns == [""]:
        raise ConfigurationError("topics must name at least one topic or prefix* (or * for every topic)")
    for pat in patterns:
        name = pat[:-1] if pat.endswith("*") else pat
        if not pat or "*" in name or len(pat) > TOPIC_LENGTH or any(c.isspace() or c == "," for c in pat):
            raise ConfigurationError(
                f"topic pattern {pat!r} is not a topic name or a prefix ending in '*' (no spaces, at most "
                f"{TOPIC_LENGTH} characters, '*' only at the end)"
            )
    if ALL_TOPICS in patterns:
        return (ALL_TOPICS,)
    if len(",".join(patterns)) > TOPIC_PATTERNS_LENGTH:
        raise ConfigurationError(f"topics are longer than {TOPIC_PATTERNS_LENGTH} characters in all; use prefixes")
    return tuple(patterns)


def _positive_int(name: str, v: object, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigurationError(f"{name} must be an int between {lo} and {hi}, got {v!r}")


#: the relays and leases tables hold relay ids in String(255) columns
RELAY_ID_LENGTH = 255


def _relay_id(v: object) -> None:
    if not isinstance(v, str):
        raise ConfigurationError(f"relay_id must be a str, got {type(v).__name__}")
    if not v.strip():
        raise ConfigurationError("relay_id must not be empty (omit it for the default host:pid:random)")
    if len(v) > RELAY_ID_LENGTH:
        raise ConfigurationError(f"relay_id must be at most {RELAY_ID_LENGTH} characters, got {len(v)}")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in v):
        raise ConfigurationError(f"relay_id must not contain control characters, got {v!r}")


def _coerce(name: str, raw: Any, annotation: object) -> Any:
    if not isinstance(raw, str):
        return raw
    ann = str(annotation)
    try:
        if ann == "int":
            return int(raw)
        if ann == "float":
            return float(raw)
        if ann == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ConfigurationError(f"relay setting {name} = {raw!r} is not a valid {ann}") from None
    return raw


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file; errors name the file and the problem."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigurationError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {p} is not valid TOML: {exc}") from None
