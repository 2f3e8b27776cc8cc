"""The project's input errors: what the command line reports on one line (exit code 2) without a traceback.

A file, folder, table row, option or recipe key that cannot be used raises an :class:`InputError` whose message
names it and the fix. Every other exception is a bug and keeps its traceback. The subclasses are also the
builtin errors their callers used to catch (``FileNotFoundError``, ``FileExistsError``).
"""

from __future__ import annotations


class InputError(ValueError):
    """Input that cannot be used; the message names the file, row or option and how to fix it."""


class MissingInputError(InputError, FileNotFoundError):
    """A file, folder or package the user named or needs does not exist."""


class OutputInUseError(InputError, FileExistsError):
    """The output folder holds another job's files, or another process is writing to it."""


class ImageReadError(InputError):
    """An image that cannot be decoded; the message names the file and why."""
