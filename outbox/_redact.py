"""Keep credentials out of logs, errors and CLI output."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["forget_secret_words", "mask_secrets", "mask_url", "remember_secret_words"]

# scheme://user:password@host  ->  scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<prefix>[A-Za-z][A-Za-z0-9+.\-]*:/{1,3}[^:/@\s]*:)(?P<pw>[^\s/]+)(?P<at>@)")
# librdkafka style settings: sasl.password=..., ssl.key.password=...
_KV_PASSWORD = re.compile(
    r"(?P<k>(?:password|passwd|pwd|secret|token)[\w.]*['\"]?\s*[=:]\s*['\"]?)(?P<v>[^'\"\s,;&}]+)", re.I
)
# a setting written without '=' (``-X "sasl.password PW"``): a dotted or snake_case key, a space, the value
_SPACED_PASSWORD = re.compile(
    r"(?P<k>\b[\w-]+[._](?:password|passwd|secret|token)\b['\"]?\s+['\"]?)(?P<v>[^'\"\s,;&}]+)", re.I
)

# a word that names a secret and stops before its value: ``sasl.password``, ``sasl.password=``, ``-Xssl.key.password:``
_SECRET_NAME = re.compile(r"[\w.-]*(?:password|passwd|pwd|secret|token)[\w.-]*['\"]?\s*[=:]?\s*", re.I)

#: words of the current command line that are secrets on their own (see remember_secret_words)
_secret_words: set[str] = set()


def remember_secret_words(argv: Iterable[object]) -> None:
    """Note the words of a command line that follow a secret's name without being part of it.

    ``outbox relay -X sasl.password PW`` (the quotes forgotten) makes ``PW`` a word of its own, which
    argparse then quotes ("unrecognized arguments: PW") and nothing in it says it is a password. Such
    words are masked by :func:`mask_secrets` wherever they appear, until :func:`forget_secret_words`.
    """
    _secret_words.clear()
    after_name = False
    for item in argv:
        word = str(item)
        if after_name and word.strip() in ("", "=", ":"):
            continue
        if after_name:
            _secret_words.add(word)
        after_name = _SECRET_NAME.fullmatch(word) is not None


def forget_secret_words() -> None:
    _secret_words.clear()


def _mask_words(text: str) -> str:
    for word in sorted(_secret_words, key=len, reverse=True):
        text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", "***", text)
    return text


def mask_url(url: object) -> str:
    """``postgresql://app:s3cret@db/x`` -> ``postgresql://app:***@db/x``. Works on any text."""
    return _URL_PASSWORD.sub(r"\g<prefix>***\g<at>", str(url))


def mask_secrets(text: object) -> str:
    """Mask passwords in URLs and ``password=...`` style settings anywhere in ``text``."""
    masked = _SPACED_PASSWORD.sub(r"\g<k>***", _KV_PASSWORD.sub(r"\g<k>***", mask_url(text)))
    return _mask_words(masked) if _secret_words else masked
