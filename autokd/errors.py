"""Error types shared by every module."""
from __future__ import annotations

from typing import Iterable


def did_you_mean(value: object, valid: "Iterable[str]") -> str:
    """`` (did you mean 'x'?)`` for the closest of ``valid`` to ``value``, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(str(value), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class UserError(Exception):
    """Bad input from the user (a flag, a file, a name).

    The CLI prints the message and exits with code 2. Messages say what was wrong, where, and what is valid.
    """


class FatalSearchError(RuntimeError):
    """An error that would make every following trial fail too (e.g. the outputs directory is unwritable).

    The search stops; the CLI prints the message and exits with code 1.
    """


class Interrupted(BaseException):
    """Raised from the SIGTERM handler so that `finally` blocks run, like KeyboardInterrupt for Ctrl-C.

    The CLI exits with code 130.
    """
