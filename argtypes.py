"""Numeric command-line arguments, checked when parsed: the argparse ``type=`` of every
numeric option of every script, and the parser that reports a bad one in one line. Each checker's ``bounds`` is
``(lo, hi, lo_open, hi_open)``, for the tests that try every option's invalid values.

``--lr nan`` used to train to NaN weights and save them, ``--S 0`` to end in a traceback,
``test.py --iou 0`` to fail only after all inference was done. Each option now names its
range here and argparse refuses anything else before the script does any work:

    p = argtypes.ArgumentParser(...)
    p.add_argument("--lr", type=argtypes.positive_float)
    p.add_argument("--dropout", type=argtypes.fraction(0, 1, hi_open=True))

and a bad value ends with ``error: --lr must be a finite number, got 'nan'`` (exit 2).
Standard library only: evaluate.py (numpy only) uses it too.
"""
from __future__ import annotations

import argparse
import math
import re


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one ``error: ...`` line and exit code 2 (the
    project's convention for bad input: errors.run_cli) instead of usage + error."""

    def error(self, message: str):
        # "argument --lr: must be ..." (from the types below) reads "--lr must be ..."
        message = re.sub(r"^argument (\S+?)(?:/\S+)?: (must )", r"\1 \2", message)
        self.exit(2, f"error: {message}\n")


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    return _number(text, float)


finite_float.bounds = (None, None, False, False)


def at_least(lo: int):
    """An integer >= ``lo``."""
    def check(text: str) -> int:
        value = _number(text, int)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value
    check.__name__, check.bounds = f"int>={lo}", (lo, None, False, False)
    return check


positive_int = at_least(1)
nonneg_int = at_least(0)


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False):
    """A finite float in [lo, hi] (either end open, or absent)."""
    def check(text: str) -> float:
        value = _number(text, float)
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and (value >= hi if hi_open else value > hi)
        if low_bad or high_bad:
            raise argparse.ArgumentTypeError(f"must be {describe(lo, hi, lo_open, hi_open)}, got {text}")
        return value
    check.__name__, check.bounds = describe(lo, hi, lo_open, hi_open), (lo, hi, lo_open, hi_open)
    return check


def describe(lo, hi, lo_open, hi_open) -> str:
    if hi is None:
        return "positive" if (lo, lo_open) == (0, True) else f"{'greater than' if lo_open else 'at least'} {lo:g}"
    if lo is None:
        return f"{'less than' if hi_open else 'at most'} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


positive_float = float_range(0, lo_open=True)
nonneg_float = float_range(0)


def fraction(lo: float = 0.0, hi: float = 1.0, *, lo_open: bool = False, hi_open: bool = False):
    """A probability, IoU or threshold: a finite float in [lo, hi] (ends open on request)."""
    return float_range(lo, hi, lo_open=lo_open, hi_open=hi_open)
