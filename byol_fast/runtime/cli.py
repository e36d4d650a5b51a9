"""How an entry point ends: a user error becomes one line ``error: <message>``, exit status 2.

Every command's body runs inside :func:`run_cli`; anything derived from
:class:`byol_fast.errors.UserError` (and a missing file) is a mistake the user can fix, so it is
reported in one line rather than a traceback. The process group is torn down either way."""
from __future__ import annotations

import sys
from typing import Callable

from byol_fast.errors import UserError
from byol_fast.runtime import dist

# What a user can cause and fix: reported in one line, exit status 2.
USER_ERRORS = (UserError, FileNotFoundError)


def run_cli(body: Callable[[], int]) -> int:
    """``body()``'s exit status; a user error prints ``error: <message>`` and gives 2. The process
    group is torn down either way."""
    try:
        return body()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.teardown()
