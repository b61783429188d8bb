"""docs/configuration.md, generated from the declared settings (:class:`~outbox.config.Setting`).

Regenerate it after changing a setting::

    python -m outbox.cli._reference > docs/configuration.md

``python -m outbox.cli._reference --check docs/configuration.md`` exits 1 when the file is stale;
``tests/unit/test_config_reference.py`` runs the same comparison.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config import Setting
from . import consume, relay
from ._settings import (
    BROKER_SETTINGS,
    COMMON_SETTINGS,
    CONNECTION_SETTINGS,
    FILE_TABLES,
    GLOBAL_SETTINGS,
)

__all__ = ["Section", "command_line_only", "markdown", "sections"]


@dataclass(frozen=True)
class Section:
    title: str
    intro: str
    settings: tuple[Setting, ...]


def sections() -> tuple[Section, ...]:
    """The settings of both commands, the shared ones once."""
    shared = {s.name for s in (*CONNECTION_SETTINGS, *BROKER_SETTINGS)}
    relay_own = tuple(s for s in relay.settings() if s.name not in shared)
    consume_own = tuple(s for s in consume.settings() if s.name not in shared)
    return (
        Section("Global options", "Options of the `outbox` command itself, accepted before or after the "
                "sub-command (`outbox --log-level DEBUG relay ...` or `outbox relay ... --log-level DEBUG`).",
                GLOBAL_SETTINGS),
        Section("Shared by `outbox relay` and `outbox consume`",
                "The database and the broker mean the same for both daemons and are declared once. In a "
                "`--config` file they go in the command's own table (`[relay]` or `[consume]`).",
                (*CONNECTION_SETTINGS, *BROKER_SETTINGS, *COMMON_SETTINGS)),
        Section("`outbox relay` (TOML table `[relay]`)",
                "The fields of `outbox.config.RelayConfig`; a service that embeds the relay passes the same "
                "names to `RelayConfig(...)`.", relay_own),
        Section("`outbox consume MODULE:CLASS` (TOML table `[consume]`)",
                "The consumer class is the positional argument; everything else is a setting.", consume_own),
    )


def command_line_only() -> dict[str, list[tuple[str, str]]]:
    """Flags of each daemon that no :class:`Setting` declares (no environment variable, no TOML key)."""
    parser = argparse.ArgumentParser(prog="outbox")
    sub = parser.add_subparsers()
    relay.register(sub)
    consume.register(sub)
    declared = {f for s in (*relay.settings(), *consume.settings(), *COMMON_SETTINGS, *GLOBAL_SETTINGS)
                for f in (*s.flags, *s.negation)}
    out: dict[str, list[tuple[str, str]]] = {}
    for name, child in sub.choices.items():
        for action in child._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            if set(action.option_strings) & declared:
                continue
            out.setdefault(name, []).append((", ".join(action.option_strings), action.help or ""))
    return out


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(items: Iterable[str]) -> str:
    items = [i for i in items if i]
    return "<br>".join(f"`{i}`" for i in items) if items else "-"


def _type(s: Setting) -> str:
    kind = {"list": "list of str", "any": "table"}.get(s.kind, s.kind)
    limits = []
    if s.choices:
        limits.append(" \\| ".join(f"`{c}`" for c in s.choices))
    if s.positive:
        limits.append("> 0")
    if s.minimum is not None:
        limits.append(f"≥ {_number(s.minimum)}")
    if s.maximum is not None:
        limits.append(f"≤ {_number(s.maximum)}")
    return kind + (f" ({', '.join(limits)})" if limits else "")


def _number(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:g}"


def _default(s: Setting) -> str:
    if s.default is None or s.default == ():
        return "-"
    if isinstance(s.default, bool):
        return f"`{str(s.default).lower()}`"
    if isinstance(s.default, tuple):
        return "`" + ",".join(s.default) + "`"
    return f"`{s.default}`"


def _flags(s: Setting) -> list[str]:
    flags = list(s.flags)
    if s.kind == "bool":  # argparse.BooleanOptionalAction adds the --no- form of each
        flags += [f"--no-{f[2:]}" for f in s.flags if f.startswith("--")]
    return [*flags, *s.negation]


def _table(settings: Sequence[Setting]) -> list[str]:
    lines = ["| Setting | Flag | Environment | TOML key | Type | Default | Description |",
             "|---|---|---|---|---|---|---|"]
    for s in settings:
        env = list(s.env[:1]) + [f"{e} (old name)" for e in s.env[1:]]
        lines.append("| " + " | ".join([
            f"`{s.name}`", _code(_flags(s)), _code(env), _code([s.toml] if s.toml else []),
            _type(s), _default(s), _cell(s.help or "-"),
        ]) + " |")
    return lines


def markdown() -> str:
    """The whole of docs/configuration.md."""
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by `python -m outbox.cli._reference > docs/configuration.md`; do not edit by hand -->",
        "",
        "Every option of `outbox relay` and `outbox consume` is declared once (`outbox.config.Setting`: type, "
        "default, help, environment variables, TOML key, flags). This page is generated from those "
        "declarations, and `tests/unit/test_config_reference.py` fails when it is stale.",
        "",
        "Precedence, the same for both commands: **command line**, then **environment**, then the command's "
        "table of the **`--config` TOML file**, then the **default**. An empty environment variable counts "
        "as unset. Unknown tables and keys in the file are errors that list the known ones; an old "
        "environment name still works, with a warning. Values are checked the same way whatever their "
        "source, and an error names where the bad value came from.",
        "",
        "Examples: [`examples/relay.toml`](../examples/relay.toml) and "
        "[`examples/consume.toml`](../examples/consume.toml). Keep passwords out of the file: set "
        "`OUTBOX_DB_URL` and `OUTBOX_RABBITMQ_URL` (or `-X sasl.password=...` from a secret) in the "
        "environment instead (see [deployment.md](deployment.md)).",
        "",
        "## Tables of a `--config` file",
        "",
        "| Table | Holds |",
        "|---|---|",
        *(f"| `[{name}]` | {_cell(what)} |" for name, what in sorted(FILE_TABLES.items())),
        "",
        "`[kafka]` keys are librdkafka properties (`\"security.protocol\" = \"SASL_SSL\"`), passed as they "
        "are; `-X KEY=VALUE` overrides them. `[rabbitmq]` keys are the relay's `RabbitMQPublisher` options.",
        "",
    ]
    for section in sections():
        out += [f"## {section.title}", "", section.intro, "", *_table(section.settings), ""]
        if section.settings and section.settings[-1] is COMMON_SETTINGS[-1]:
            out += ["`outbox consume` also accepts `--consumer-config`, the old spelling of `-X`.", ""]
    extra = command_line_only()
    if extra:
        out += ["## Command-line only", "", "Flags that have no environment variable or TOML key.", "",
                "| Command | Flag | Description |", "|---|---|---|"]
        for command, flags in sorted(extra.items()):
            out += [f"| `outbox {command}` | `{flag}` | {_cell(text)} |" for flag, text in flags]
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m outbox.cli._reference", description=__doc__.splitlines()[0])
    p.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the generated text")
    args = p.parse_args(argv)
    text = markdown()
    if args.check:
        with open(args.check, encoding="utf-8") as fh:
            if fh.read() != text:
                print(f"{args.check} is stale: run `python -m outbox.cli._reference > {args.check}`",
                      file=sys.stderr)
                return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
