"""Moved to :mod:`outbox.transports.memory.publisher`; this path keeps working (it is the same module object)."""

import sys

from outbox.transports.memory import publisher as _moved

sys.modules[__name__] = _moved
