"""The one error type the command line formats, and the exit codes it maps to.

Library code raises these; `cratemae.commands` prints them as one line (no traceback unless
`--debug`) and exits with `exit_code`.
"""

from __future__ import annotations

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# A run stopped by SIGTERM/SIGUSR1 after saving a checkpoint: requeue the job to resume it.
EXIT_REQUEUE = 3

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_REQUEUE",
    "BadInputError",
    "CrateMAEError",
]


class CrateMAEError(Exception):
    """An error that the command line reports as one line, with its own exit code."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class BadInputError(CrateMAEError):
    """The user's input is wrong: a recipe, a data path, a checkpoint, an option."""

    exit_code = EXIT_BAD_INPUT
