"""Moved to :mod:`outbox.transports.kafka.publisher`; this path keeps working (it is the same module object)."""

import sys

from outbox.transports.kafka import publisher as _moved

sys.modules[__name__] = _moved
