"""Keep credentials out of logs, errors and CLI output."""

from __future__ import annotations

import re

__all__ = ["mask_secrets", "mask_url"]

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


def mask_url(url: object) -> str:
    """``postgresql://app:s3cret@db/x`` -> ``postgresql://app:***@db/x``. Works on any text."""
    return _URL_PASSWORD.sub(r"\g<prefix>***\g<at>", str(url))


def mask_secrets(text: object) -> str:
    """Mask passwords in URLs and ``password=...`` style settings anywhere in ``text``."""
    return _SPACED_PASSWORD.sub(r"\g<k>***", _KV_PASSWORD.sub(r"\g<k>***", mask_url(text)))
