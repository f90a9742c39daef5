"""Errors a user can cause, each rendered as one line that names the fix."""

from __future__ import annotations


class SheafdistError(Exception):
    """Base class: the CLI prints ``str(error)`` as one line."""

    exit_code = 1


class InputError(SheafdistError, ValueError):
    """Bad usage or bad input: names the argument, what arrived and the fix."""

    exit_code = 2

    def __init__(self, arg: str, got: object, fix: str):
        self.arg, self.got, self.fix = arg, got, fix
        super().__init__(f"{arg}: got {got}; {fix}")


class DivergenceError(SheafdistError):
    """The explicit scheme blew up; the message carries the stable bound."""


class RunError(SheafdistError):
    """A run that failed for a reason other than bad input (timeouts, lost actors)."""


def one_line(text: object, limit: int = 400) -> str:
    """Fold any text (an exception, a traceback line) into one short line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
