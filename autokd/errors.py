"""Error types shared by every module."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a flag, a file, a name).

    The CLI prints the message and exits with code 2. Messages say what was wrong, where, and what is valid.
    """
