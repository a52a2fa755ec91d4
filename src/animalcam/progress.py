"""Whether a person is watching: progress bars and redrawn lines only then."""

from __future__ import annotations

import sys


def quiet() -> bool:
    """True when stderr is not a terminal (CI logs, a pipe): no progress bars there."""
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return True
