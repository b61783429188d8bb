"""Moved to :mod:`outbox.transports.kafka.runner`; this path keeps working (it is the same module object)."""

import sys

from outbox.transports.kafka import runner as _moved

sys.modules[__name__] = _moved
