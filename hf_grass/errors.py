"""Exceptions for mistakes in what the user passed (flags, config files, data files).

A command-line front end (``scripts/finetune.py``) prints a `UsageError` as one line, without a
traceback, and exits with status 2, as argparse does for a bad flag; any other exception is a
fault in the program and keeps its traceback. Both are ordinary exceptions for library callers:
`UsageError` is a `ValueError` and `MissingFileError` also a `FileNotFoundError`.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user's mistake: a bad flag value, config file or data file. The message names the fix."""


class MissingFileError(UsageError, FileNotFoundError):
    """A path given by the user does not exist (or is not what it must be)."""
