"""Error types shared by every module, the close-name hints their messages give, and where each is raised.

Which error where:

- :class:`UserError` (the CLI's exit 2) only where user input is read: the CLI and its commands, the settings
  (``config``, ``search.run``), search-space files (``model.space``, ``spaces``), datasets (``model.data``'s
  loading), teacher names and checkpoints, study storage and names, devices, the latency settings
  (``LatencyMeter``, ``--latency-precision``), latency servers, tracking URIs, export choices and files. Its
  message names the flag, file or name and what is valid.
- ``ValueError`` (a value outside what is accepted, an unknown name) and ``TypeError`` (a value of the wrong type,
  such as a bool or a string where a number belongs) from the pure layers, which never know of flags or exit
  codes: ``select`` (front, picks, pruning), the training loop (``model.train``), losses, student layouts,
  training views, the latency protocol, report rendering. The library is usable on its own through them.
- A pure layer's error caused by user input becomes a UserError at the boundary that read that input, with the
  same message (:func:`as_user_error`): ``autokd ...`` still exits 2 and says what the pure layer said.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator


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


@contextlib.contextmanager
def as_user_error(prefix: str = "") -> Iterator[None]:
    """Turn a ValueError or TypeError raised inside into a UserError with ``prefix`` + the same message.

    For the boundary that hands user input to a pure layer; wrap only the calls that check that input, so that
    a bug deeper down stays a traceback.
    """
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise UserError(f"{prefix}{exc}") from exc


class FatalSearchError(RuntimeError):
    """An error that would make every following trial fail too (e.g. the outputs directory is unwritable).

    The search stops; the CLI prints the message and exits with code 1.
    """


class Interrupted(BaseException):
    """Raised from the SIGTERM handler so that `finally` blocks run, like KeyboardInterrupt for Ctrl-C.

    The CLI exits with code 130.
    """
