"""Moved to :mod:`outbox.incoming`; this path keeps working (it is the same module object)."""

import sys

from outbox import incoming as _moved

sys.modules[__name__] = _moved
