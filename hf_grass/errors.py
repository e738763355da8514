"""Exceptions for mistakes in what the user passed (flags, config files, data files).

A command-line front end (``scripts/finetune.py``) prints a `UsageError` as one line, without a
traceback, and exits with status 2, as argparse does for a bad flag; any other exception is a
fault in the program and keeps its traceback. Both are ordinary exceptions for library callers:
`UsageError` is a `ValueError` and `MissingFileError` also a `FileNotFoundError`.

A cache entry that cannot be read (a truncated file, say) is built again where the code can build
it (`discard_unreadable_cache`), and otherwise named with the fix, like a user's mistake.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """A user's mistake: a bad flag value, config file or data file. The message names the fix."""


class MissingFileError(UsageError, FileNotFoundError):
    """A path given by the user does not exist (or is not what it must be)."""


def describe(err: Exception, limit: int = 300) -> str:
    """``"TypeName: message"`` of ``err`` on one line, cut to ``limit`` characters, for a message
    that must stay one line."""
    return " ".join(f"{type(err).__name__}: {err}".split())[:limit]


def discard_unreadable_cache(target: Path, what: str, err: Exception) -> None:
    """Remove the cache entry ``target`` (the cached ``what``) that could not be read, so that
    the caller builds it again; say so in one log line. A folder that cannot be removed stops the
    run with one line naming it (a `UsageError`)."""
    problem = describe(err)
    logger.warning(
        "The cached %s in %s is unreadable (%s); building it again", what, target, problem
    )
    try:
        shutil.rmtree(target)
    except OSError as rm_err:
        raise UsageError(
            f"The cached {what} in {target} is unreadable ({problem}) and cannot be removed "
            f"({rm_err.strerror or rm_err}): delete that folder and run again."
        ) from err
