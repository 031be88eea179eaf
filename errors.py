"""Bad user input: the one error class, its one-line message and the command-line wrapper.

Every script reports a mistake in the user's input (a file, an argument) as one line naming
the file (and line) or the argument, and exits with code 2; never a traceback. This module
imports the standard library only, so that ``evaluate.py`` (numpy only) shares it;
``utils.py`` re-exports it for the rest of the project.
"""
from __future__ import annotations

import math
import sys


class UserError(Exception):
    """A mistake in the user's input (file, argument): reported as one line, exit 2."""


class Interrupted(Exception):
    """A run stopped on a signal after saving its state: reported as one line, exit 0."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its type's name if it has none).

    An error raised in a DataLoader worker comes back with the worker's traceback folded
    into its message ("Caught UserError in DataLoader worker process 0 ..."); its last line
    holds the original ``module.UserError: message``.
    """
    text = str(err).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1]
        text = text.split(": ", 1)[1] if text.split(": ", 1)[0].endswith(type(err).__name__) else text
    return " ".join(text.split()) or type(err).__name__


def finite_number(text, what: str, where: str) -> float:
    """A number read from a user's file (``text``: str or bytes), or a one-line UserError
    naming the place and the field: ``where: what is not a number: '...'``. NaN and
    infinities are refused: no file the project reads has a use for them."""
    try:  # float() reads "1_0" as 10 (PEP 515 grouping): a typo, never a number in these files
        value = float(text) if "_" not in _shown(text) else float("x")
    except ValueError:
        raise UserError(f"{where}: {what} is not a number: {_shown(text)[:40]!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{where}: {what} must be a finite number, got {_shown(text)[:40]}")
    return value


def _shown(text) -> str:
    return text.decode(errors="replace") if isinstance(text, bytes) else str(text)


def run_cli(main, argv=None):
    """Run ``main(argv)``: a UserError becomes a one-line message and exit code 2, an
    Interrupted run (state saved) a one-line note and exit code 0."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as note:
        print(f"interrupted: {note}", file=sys.stderr)
        sys.exit(0)
    except KeyboardInterrupt:  # Ctrl-C before training started (or a second Ctrl-C): no state to save
        print("interrupted: Ctrl-C", file=sys.stderr)
        sys.exit(130)
