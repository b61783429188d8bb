"""Moved to :mod:`outbox.transports.base`; this path keeps working (it is the same module object)."""

import sys

from outbox.transports import base as _moved

sys.modules[__name__] = _moved
