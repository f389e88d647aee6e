"""Error types shared by every module, and the close-name hints their messages give."""
from __future__ import annotations

from typing import Iterable


def close_matches(value: object, valid: "Iterable[str]", n: int = 3) -> list[str]:
    """Up to ``n`` names of ``valid`` close to ``value``, closest first (difflib's similarity, cutoff 0.6)."""
    import difflib

    return difflib.get_close_matches(str(value), list(valid), n=n)


def did_you_mean(value: object, valid: "Iterable[str]", prefix: bool = False) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``valid`` to ``value``, or '' when none is close.

    With ``prefix``, a name of ``valid`` that is the only one starting with ``value`` counts as close too (an
    abbreviation such as ``temp`` for ``temperature``).
    """
    names = list(valid)
    close = close_matches(value, names, n=1)
    if not close and prefix and value:
        close = [name for name in names if name.startswith(str(value))]
    return f" (did you mean {close[0]!r}?)" if len(close) == 1 else ""


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
