"""Moved to :mod:`outbox.transports.rabbitmq.publisher`; this path keeps working (it is the same module object)."""

import sys

from outbox.transports.rabbitmq import publisher as _moved

sys.modules[__name__] = _moved
