"""Relay settings: keyword-only, checked at construction, loadable from TOML and environment."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import os
import re
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .schema import ALL_TOPICS, DEFAULT_GROUP, GROUP_LENGTH, TOPIC_LENGTH, TOPIC_PATTERNS_LENGTH
from .writer import DEFAULT_PARTITIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ORDERING_MODES", "RelayConfig", "Setting", "load_toml", "parse_topic_patterns", "relay_settings",
           "settings_of"]

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
    """Longest wait between two retries of a row (seconds): the doubling stops here."""
    ordering: str = field(default="strict", metadata={"choices": ORDERING_MODES})
    """``strict``: a failing or dead message holds back later messages of the same key.
    ``none``: later messages pass it."""
    delete_published: bool = field(default=True, metadata={"negation": ("--audit",)})
    """Delete rows once published (default). False keeps them as ``published`` (audit mode)."""
    partitions: int = DEFAULT_PARTITIONS
    """Partition count of the writers; relays extend it if they find rows of higher partitions."""
    lease_ttl: float = 15.0
    """A relay that has not renewed its leases for this long loses them."""
    publish_timeout: float = 30.0
    """Longest wait for the broker's verdict on one batch."""
    shutdown_timeout: float = 30.0
    """On SIGTERM/SIGINT, longest wait for outstanding confirms before leaving."""
    pipeline: bool = True
    """Claim the next batch while the broker acknowledges the previous one (PostgreSQL, with a
    publisher that has ``begin_publish``: Kafka's and RabbitMQ's), on a second connection of the
    relay's pool: an engine with ``pool_size=1, max_overflow=0`` gets no pipelining (and a warning).
    Off: one batch at a time."""
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
    codec: str = "native"
    """Wire format of the published messages: ``native`` (outboxkit's headers), ``cloudevents``
    (CloudEvents 1.0 binary mode), ``debezium`` (Debezium's outbox event router layout), or another
    registered codec. ``outbox relay`` builds its publisher with it; a publisher made in code takes
    ``codec=`` itself (the relay refuses a config whose codec differs from its publisher's)."""
    ce_source: str | None = None
    """CloudEvents ``source`` of rows that name none (``cloudevents`` codec): a URI-reference such
    as ``/orders-service``; default ``/outboxkit``."""
    extra: Mapping[str, Any] = field(default_factory=dict, metadata={"flags": (), "env": ()})
    """Free-form table kept on the config for the application that embeds the relay; the relay itself
    does not read it."""

    def __post_init__(self) -> None:
        _positive_int("batch_size", self.batch_size, 1, 100_000)
        _positive_int("max_attempts", self.max_attempts, 1, 1_000_000)
        _positive_int("partitions", self.partitions, 1, 32767)
        for name in ("poll_interval", "min_poll_interval", "backoff_initial", "backoff_max", "lease_ttl",
                     "publish_timeout", "shutdown_timeout"):
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or not 0 < v <= MAX_SECONDS):
                raise ConfigurationError(f"{name} must be a positive, finite number of seconds up to {MAX_SECONDS:,} "
                                         f"(one year), got {v!r}")
        if self.min_poll_interval > self.poll_interval:
            raise ConfigurationError(
                f"min_poll_interval ({self.min_poll_interval}) must not exceed poll_interval ({self.poll_interval})"
            )
        if self.ordering not in ORDERING_MODES:
            raise ConfigurationError(f"ordering must be one of {ORDERING_MODES}, got {self.ordering!r}")
        if not isinstance(self.progress_interval, (int, float)) or isinstance(self.progress_interval, bool) or (
            not math.isfinite(self.progress_interval) or self.progress_interval < 0
        ):
            raise ConfigurationError(f"progress_interval must be a finite number >= 0, got {self.progress_interval!r}")
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
        _codec_settings(self.codec, self.ce_source)

    @property
    def renew_interval(self) -> float:
        return self.lease_ttl / 3.0

    @property
    def idle_transaction_timeout(self) -> float:
        """Seconds a relay transaction may sit idle on the database server before the server ends it.

        ``publish_timeout + lease_ttl``: the longest legitimate idle inside a batch transaction is
        the wait for the broker's verdict (``publish_timeout``); ``lease_ttl`` is the margin. Set on
        the relay's own connections (see :meth:`outbox.dialects.Dialect.relay_session_setup`), so a
        relay frozen inside its claim transaction (SIGSTOP, VM pause, a host gone without a TCP
        reset) cannot keep its lease rows locked, and its partitions from every other relay, for
        longer than this.
        """
        return self.publish_timeout + self.lease_ttl

    @property
    def stale_claim_age(self) -> float:
        """Seconds after its claim statement returned that a batch may still be handed to the publisher.

        Older (the relay was frozen or starved in between), the server may already have ended the
        transaction and another relay may own the partitions: the batch is rolled back unpublished.
        Half the margin of :attr:`idle_transaction_timeout`, so that a publish started in time
        (at most ``publish_timeout`` long) ends before the server can end the transaction.
        """
        return self.lease_ttl / 2.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "relay setting") -> RelayConfig:
        """Build from a mapping (TOML ``[relay]`` table, env vars); unknown keys are an error.

        A ``None`` value means "not set": the field keeps its default (``dataclasses.asdict`` of a
        config round-trips, optional fields included).
        """
        known = {s.name: s for s in relay_settings()}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigurationError(f"unknown relay setting {key!r}; known: {', '.join(sorted(known))}")
            if raw is None:
                continue
            kwargs[name] = known[name].parse(raw, f"{source} {name}")
        return cls(**kwargs)

    @classmethod
    def env_values(cls, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The ``OUTBOX_RELAY_<FIELD>`` variables that are set, by field name (not yet validated)."""
        env = os.environ if environ is None else environ
        out = {}
        for s in relay_settings():
            for var in s.env:
                if env.get(var, "") != "":
                    out[s.name] = env[var]
                    break
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


def _codec_settings(codec: object, ce_source: object) -> None:
    """``codec`` names a registered codec; ``ce_source`` is a usable CloudEvents source."""
    from .transports.codecs import codec_names

    if not isinstance(codec, str) or codec not in codec_names():
        raise ConfigurationError(f"codec must be one of {', '.join(codec_names())}, got {_short(codec)}")
    if ce_source is not None:
        from .transports._cloudevents import check_source

        check_source(ce_source, "ce_source")


def _positive_int(name: str, v: object, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigurationError(f"{name} must be an int between {lo} and {hi}, got {_short(v)}")


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


# --------------------------------------------------------------------------- declared settings

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
KINDS = ("int", "float", "bool", "str", "list", "any")


def _short(v: object) -> str:
    """``repr`` of a value for an error message: masked, and cut short (a huge int has 4,300 digits)."""
    from ._redact import mask_secrets

    text = mask_secrets(repr(v))
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class Setting:
    """One option, declared once: its type, default, help, environment names, TOML key and CLI flags.

    ``env`` lists the environment variables that set it, the current name first; later names are
    old spellings that still work (the command line warns about them). ``toml`` is the key in the
    command's table of a ``--config`` file. Values are parsed and checked by :meth:`parse`, whatever
    their source: strings from flags and the environment, typed values from TOML.
    """

    name: str
    kind: str = "str"
    default: Any = None
    help: str = ""
    env: tuple[str, ...] = ()
    toml: str | None = None
    flags: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    metavar: str | None = None
    negation: tuple[str, ...] = ()
    """Flags that set a ``bool`` setting to False (``--audit`` for ``delete_published``)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigurationError(f"setting {self.name}: kind must be one of {KINDS}, got {self.kind!r}")

    def parse(self, raw: Any, source: str | None = None) -> Any:
        """``raw`` as this setting's type, checked; errors name ``source`` (a flag, variable or file key)."""
        where = self.name if source is None else source

        def bad(what: str) -> ConfigurationError:
            prefix = f"{where} = " if where else ""
            return ConfigurationError(f"{prefix}{_short(raw)} is not a valid {kind}: must be {what}")

        def out_of_range(what: str) -> ConfigurationError:
            prefix = f"{where} " if where else ""
            return ConfigurationError(f"{prefix}must be {what}, got {_short(value)}")

        kind = self.kind
        if kind == "any":
            return raw
        if kind == "list":
            items = raw.split(",") if isinstance(raw, str) else raw
            if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
                raise bad("a list of strings (comma-separated)")
            if not all(isinstance(i, str) for i in items):
                raise bad("a list of strings")
            value: Any = tuple(i.strip() for i in items if i.strip())
            if self.choices is not None:
                for i in value:
                    if i not in self.choices:
                        raise bad(f"a list of {', '.join(self.choices)}")
            return value
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.strip().lower() in _TRUE + _FALSE:
                return raw.strip().lower() in _TRUE
            raise bad("true or false (also 1/0, yes/no, on/off)")
        if kind == "str":
            if not isinstance(raw, str):
                raise bad("a string")
            value = raw.strip()
            if not value:
                raise bad("a non-empty string")
            if self.choices is not None and value not in self.choices:
                raise out_of_range(f"one of {', '.join(self.choices)}")
            return value
        if isinstance(raw, bool):
            raise bad("a number" if kind == "float" else "an integer")
        if kind == "int":
            if isinstance(raw, str):
                try:
                    value = int(raw.strip())
                except ValueError:
                    raise bad("an integer") from None
            elif isinstance(raw, int):
                value = raw
            else:
                raise bad("an integer")
        else:
            if isinstance(raw, str):
                try:
                    value = float(raw.strip())
                except ValueError:
                    raise bad("a number") from None
            elif isinstance(raw, (int, float)):
                value = float(raw)
            else:
                raise bad("a number")
            if not math.isfinite(value):
                raise bad("a finite number")
        if self.positive and value <= 0:
            raise out_of_range("more than 0")
        if self.minimum is not None and value < self.minimum:
            raise out_of_range(f"at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise out_of_range(f"at most {self.maximum:g}")
        return value


def _kind_of(annotation: Any) -> str:
    """``int``, ``float | None``, ``tuple[str, ...]`` ... -> the kind of :class:`Setting` that parses it."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind_of(args[0])
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    if annotation is str:
        return "str"
    if origin in (tuple, list, Sequence, typing.Sequence) and args and all(a in (str, Ellipsis) for a in args):
        return "list"
    return "any"


@cache
def _field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (it becomes the option's help)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (frozen app): no help texts
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for prev, node in itertools.pairwise(body):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def relay_settings() -> tuple[Setting, ...]:
    """The :class:`Setting` of every :class:`RelayConfig` field, derived from the field itself.

    A plain field needs nothing more: its type gives the parser, its docstring the help, and its
    name the flag (``--batch-size``), the variable (``OUTBOX_RELAY_BATCH_SIZE``) and the TOML key
    (``batch_size`` in ``[relay]``). ``field(metadata=...)`` overrides any of ``flags``, ``env``,
    ``toml``, ``choices``, ``negation`` and ``help``. Ranges and cross-field rules stay in ``__post_init__``.
    """
    return settings_of(RelayConfig)


@cache
def settings_of(cls: type, env_prefix: str = "OUTBOX_RELAY_") -> tuple[Setting, ...]:
    """The :class:`Setting` of every field of the dataclass ``cls`` (see :func:`relay_settings`)."""
    hints = typing.get_type_hints(cls)
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_field_docs(klass))
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = meta.get("kind") or _kind_of(hints.get(f.name, Any))
        default = f.default if f.default is not dataclasses.MISSING else None
        exposed = kind != "any"
        out.append(Setting(
            name=f.name, kind=kind, default=default, help=str(meta.get("help", docs.get(f.name, ""))),
            env=tuple(meta.get("env", (f"{env_prefix}{f.name.upper()}",) if exposed else ())),
            toml=meta.get("toml", f.name),
            flags=tuple(meta.get("flags", ("--" + f.name.replace("_", "-"),) if exposed else ())),
            choices=meta.get("choices"), negation=tuple(meta.get("negation", ())),
        ))
    return tuple(out)


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file; errors name the file (as given) and the problem."""
    p = Path(path)
    shown = str(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigurationError(f"config file {shown} does not exist") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise ConfigurationError(f"cannot read config file {shown}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"config file {shown} is not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {shown} is not valid TOML: {exc}") from None
