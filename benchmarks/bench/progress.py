"""Progress lines of a run."""
from __future__ import annotations

import sys


def log(msg: str) -> None:
    """Progress, on stderr, so that stdout holds the results alone."""
    print(msg, file=sys.stderr, flush=True)
