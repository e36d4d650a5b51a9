"""The errors a user can cause and fix: each says what is wrong and names the file, folder or key.

Every one of them derives from :class:`UserError`, which ``byol_fast.runtime.cli.run_cli`` turns into
one line ``error: <message>`` on stderr and exit status 2 instead of a traceback. Raising code keeps
the built-in base it always had as a second base (``ValueError`` or ``RuntimeError``), so callers
that catch those still do. This module imports nothing of the project: every layer may raise these.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user gave (a config, a dataset, a file, a flag) that byol_fast cannot use."""


class ConfigError(UserError, ValueError):
    """A bad configuration file, key or value; the message names which."""


class DatasetError(UserError, ValueError):
    """A dataset the index cannot use (missing, empty, wrong layout); the message names the folder."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit this run; the message names the file."""


class ReadError(UserError, RuntimeError):
    """A batch that could not be read or decoded: the message names the files (or tar shards) it came
    from, in one line (a loader raises it in place of the reader's own trace)."""


class DivergedError(UserError, RuntimeError):
    """Too many non-finite steps in a row."""
