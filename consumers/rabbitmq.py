"""Moved to :mod:`outbox.transports.rabbitmq.runner`; this path keeps working (it is the same module object)."""

import sys

from outbox.transports.rabbitmq import runner as _moved

sys.modules[__name__] = _moved
